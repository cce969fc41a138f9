"""The learning-rate schedule: linear warm-up, then cosine to the floor."""
from __future__ import annotations

import math

import pytest

from pipeline.training.lr_schedule import LRSchedule, build_schedule


def test_warmup_is_linear_and_never_zero():
    s = LRSchedule(total_steps=100, warmup_steps=4)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)


def test_cosine_reaches_the_floor_at_the_end():
    s = LRSchedule(total_steps=10, warmup_steps=0, min_ratio=0.1)
    assert s(0) == pytest.approx(1.0)
    mid = s(5)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(10) == pytest.approx(0.1)
    assert s(50) == pytest.approx(0.1), "past the horizon the rate stays at the floor"
    values = [s(i) for i in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine decay is monotone"


def test_cosine_matches_the_formula_after_warmup():
    s = LRSchedule(total_steps=103, warmup_steps=3)
    for step in (3, 20, 60, 102):
        progress = (step - 3) / 100
        assert s(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))


def test_constant_schedule():
    s = LRSchedule(total_steps=10, warmup_steps=2, kind="constant")
    assert [s(i) for i in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_build_schedule_uses_the_paper_ratio():
    s = build_schedule(total_steps=1000, warmup_ratio=0.03, warmup_steps=None, kind="cosine", min_ratio=0.0)
    assert s.warmup_steps == 30
    s = build_schedule(total_steps=1000, warmup_ratio=0.03, warmup_steps=7, kind="cosine", min_ratio=0.0)
    assert s.warmup_steps == 7
    s = build_schedule(total_steps=5, warmup_ratio=0.0, warmup_steps=50, kind="cosine", min_ratio=0.0)
    assert s.warmup_steps == 5, "warm-up is capped at the run length"


@pytest.mark.parametrize("kwargs", [dict(total_steps=0, warmup_steps=0), dict(total_steps=5, warmup_steps=6),
                                    dict(total_steps=5, warmup_steps=1, kind="linear")])
def test_bad_schedules_are_refused(kwargs):
    with pytest.raises(ValueError):
        LRSchedule(**kwargs)


def test_lambda_lr_follows_the_schedule():
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(total_steps=6, warmup_steps=2))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:2] == [0.5, 1.0]
    assert seen[2] == pytest.approx(1.0) and seen[-1] < 0.2
