"""modeling.costs.memory's activation formula against the peak of a real forward and
backward under FakeTensorMode + MemTracker (modeling.costs.fake_step), on the CPU.

CI runs a reduced but realistic shape (the paper's 576 image tokens at 336 px,
LoRA r=128 with dropout on every linear, the 32,000-token vocabulary, 1,600
positions; a narrower, two-layer LLM and two-layer towers); the 13B paper shape
itself is benchmarks/plan_check.py (minutes on a CPU). The formula counts the
CPU's kernels here (device="cpu": dropout masks in bf16, the fusion's float32
math attention); the plan counts CUDA's.
"""
from __future__ import annotations

import pytest

from benchmarks.plan_check import shape_config
from modeling.config import ModelConfig
from modeling.costs.fake_step import measure
from modeling.costs.memory import activation_bytes, activation_terms

# Measured agreement at this shape (benchmarks/plan_check.py --shape reduced --positions 1600):
# the formula is within 8 bytes of the fake step's peak at micro-batch 1 and within 8,184
# bytes at 8 (ratio 1 +- 1.2e-6), with and without gradient checkpointing.
TOLERANCE = 1e-5


def reduced_paper_shape() -> ModelConfig:
    return shape_config("reduced")


# Two of the four cases (each a few seconds of fake ops); benchmarks/plan_check.py runs all four.
@pytest.mark.parametrize("micro_batch, ckpt", [(1, False), (8, True)])
def test_formula_matches_the_fake_step_peak(micro_batch, ckpt):
    cfg = reduced_paper_shape()
    positions = 1600
    measured = measure(cfg, micro_batch, positions, ckpt)
    formula = activation_bytes(cfg, micro_batch, positions, ckpt, device="cpu")
    err = formula / measured.step - 1
    assert abs(err) < TOLERANCE, (formula, measured.step, err)
    # The logits' share is the fake step's Temp at its peak plus the kept float32 log-probabilities.
    assert measured.by_category["Temp"] == 10 * cfg.llm.vocab_size * positions * micro_batch


def test_terms_scale_as_stated():
    cfg = reduced_paper_shape()
    one = {t.name: t.bytes for t in activation_terms(cfg, 1, 1000, False)}
    eight = {t.name: t.bytes for t in activation_terms(cfg, 8, 1000, False)}
    assert all(eight[k] == 8 * one[k] for k in one if k != "rotary cos/sin")
    assert one["logits"] == 14 * 32000 * 1000
    cfg.llm.num_layers = 4
    assert activation_terms(cfg, 1, 1000, False)[0].bytes == 2 * one["decoder layers"]
    # flash_attention_2 builds no float mask: a.L^2 less per layer and sample.
    cfg.llm.attn_implementation = "flash_attention_2"
    assert activation_terms(cfg, 1, 1000, False)[0].bytes == 2 * one["decoder layers"] - 4 * 2 * 1000 ** 2
    with pytest.raises(ValueError, match="frozen towers"):
        cfg.clip.freeze = False
        activation_terms(cfg, 1, 1000, False)
