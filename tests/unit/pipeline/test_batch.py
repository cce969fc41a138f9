"""loop.global_batch: the accumulation derived from the world size, the errors
naming the numbers and the nearest valid choices, and what a resume logs."""
from __future__ import annotations

import pytest

from common.config_loading import ConfigError
from pipeline.training.batch import (BatchPlan, batch_plan, launcher_world_size, nearest_choices, plan_for,
                                     resume_note)
from pipeline.training.cli import main
from pipeline.training.config import load_train_config
from .test_input_paths import shard_set


def test_accumulation_is_derived_from_the_world_size():
    assert batch_plan(128, None, 8, 8) == BatchPlan(8, 2, 8, "loop.global_batch")
    assert batch_plan(128, None, 8, 16).grad_accum == 1
    assert batch_plan(128, None, 4, 2).grad_accum == 16
    assert batch_plan(128, 2, 8, 8).global_batch == 128  # both set and agreeing
    # Without a global batch the accumulation is the field's (1 when null) and the global batch follows.
    assert batch_plan(None, 3, 4, 2) == BatchPlan(4, 3, 2, "loop.grad_accum")
    assert batch_plan(None, None, 4, 2).global_batch == 8


def test_a_global_batch_that_does_not_divide_names_the_numbers_and_the_nearest_choices():
    with pytest.raises(ConfigError) as e:
        batch_plan(128, None, 8, 6)
    msg = str(e.value)
    assert "loop.global_batch=128" in msg and "data.batch_size=8" in msg and "6 rank(s) = 48" in msg
    # 96 and 144 are the multiples of 8 x 6 around 128; 128/6 is no integer, so no micro-batch helps;
    # 4 and 8 ranks divide 128/8 = 16.
    assert "loop.global_batch=96 or 144" in msg and msg.endswith("choices: loop.global_batch=96 or 144; ranks=4 or 8")
    assert nearest_choices(128, 6, 8) == {"loop.global_batch": [96, 144], "data.batch_size": [4, 8]}
    assert nearest_choices(96, 8, 8) == {"loop.global_batch": [64, 128], "data.batch_size": [6, 12],
                                         "ranks": [6, 12]}


def test_both_set_must_agree():
    with pytest.raises(ConfigError, match=r"loop.grad_accum=4 disagrees with loop.global_batch=128.*"
                                          r"needs accumulation 2 \(global batch 256 with 4\)"):
        batch_plan(128, 4, 8, 8)


def test_load_time_checks():
    for bad, field in ((["loop.global_batch=0"], "loop.global_batch"), (["loop.grad_accum=0"], "loop.grad_accum")):
        with pytest.raises(ConfigError, match=field):
            load_train_config("tiny-cpu", bad)
    # A global batch that no world size can reach is refused at load time, with the neighbours.
    with pytest.raises(ConfigError, match=r"loop.global_batch: 100 is not a multiple of data.batch_size=8.*"
                                          r"loop.global_batch=96 or 104, or data.batch_size=5 or 10"):
        load_train_config("fakereasoning-13b", ["loop.global_batch=100", "data.batch_size=8"])
    cfg = load_train_config("fakereasoning-13b")
    assert plan_for(cfg, 8).record() == {"global_batch": 128, "micro_batch": 8, "grad_accum": 2, "world_size": 8,
                                         "grad_accum_from": "loop.global_batch"}


def test_launcher_world_size():
    assert launcher_world_size({"WORLD_SIZE": "16"}) == 16
    assert launcher_world_size({}) == 1 and launcher_world_size({"WORLD_SIZE": "x"}) == 1


def test_the_cli_stops_before_anything_starts_on_the_launchers_world_size(tmp_path, monkeypatch, capsys):
    shards = f"data.train_shards={shard_set(tmp_path / 'train')}"
    args = ["--config", "tiny-cpu", "--check", shards, "data.batch_size=2", "loop.global_batch=8",
            "loop.grad_accum=null"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(args) == 0
    monkeypatch.setenv("WORLD_SIZE", "3")  # what each rank of `deepspeed --num_gpus 3` sees
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: loop.global_batch=8 is not a multiple of data.batch_size=2 x 3 rank(s) = 6" in err
    assert "loop.global_batch=6 or 12" in err and "ranks=2 or 4" in err


def test_resume_notes():
    plan16 = BatchPlan(8, 1, 16, "loop.global_batch")
    same = BatchPlan(8, 2, 8, "loop.global_batch").record()
    assert resume_note(same, 8, BatchPlan(8, 2, 8, "loop.global_batch")) is None
    warn, msg = resume_note(same, 8, plan16)
    assert not warn and msg == ("resuming on 16 rank(s) a checkpoint written by 8: global batch 128 kept "
                                "(loop.global_batch); micro-batch 8 x accumulation 1 x 16 (was 8 x 2 x 8)")
    warn, msg = resume_note(same, 8, BatchPlan(8, 2, 16, "loop.grad_accum"))
    assert warn and "global batch changes on resume: 128" in msg and "-> global batch 256" in msg
    assert "set loop.global_batch=128 to keep it" in msg
    assert resume_note(None, 8, plan16)[1].startswith("resuming on 16 rank(s) a checkpoint written by 8")
    assert resume_note(None, 16, plan16) is None
