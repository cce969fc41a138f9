"""Checkpoint completeness: a tag counts only after its marker, whatever was interrupted."""
from __future__ import annotations

import os

import pytest

from pipeline.training import checkpointing as ckpt
from pipeline.training.checkpointing import TrainState


def _tag(root, step: int, complete: bool) -> str:
    tag = ckpt.tag_for(step)
    os.makedirs(root / tag, exist_ok=True)
    (root / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    if complete:
        ckpt.mark_complete(str(root), tag, TrainState(global_step=step))
    return tag


def test_incomplete_newer_tag_is_ignored(tmp_path):
    _tag(tmp_path, 10, complete=True)
    _tag(tmp_path, 20, complete=False)  # killed mid-save: files but no marker
    (tmp_path / "latest").write_text("global_step20")  # DeepSpeed's own pointer is not trusted
    assert ckpt.newest_complete(str(tmp_path)) == "global_step10"
    assert ckpt.resolve_resume("auto", str(tmp_path)) == (str(tmp_path), "global_step10")


def test_marker_then_pointer(tmp_path):
    _tag(tmp_path, 5, complete=True)
    assert (tmp_path / "latest_complete").read_text() == "global_step5"
    marker = (tmp_path / "global_step5" / ckpt.COMPLETE).read_text()
    assert '"global_step": 5' in marker and "zero_pp_rank_0_mp_rank_00_model_states.pt" in marker


def test_stale_or_lost_pointer_falls_back_to_the_highest_complete_step(tmp_path):
    _tag(tmp_path, 2, complete=True)
    _tag(tmp_path, 11, complete=True)
    # Killed between the marker and the pointer update: the pointer is one behind.
    (tmp_path / "latest_complete").write_text("global_step2")
    assert ckpt.newest_complete(str(tmp_path)) == "global_step11"
    os.remove(tmp_path / "latest_complete")
    assert ckpt.newest_complete(str(tmp_path)) == "global_step11"
    (tmp_path / "latest_complete").write_text("garbage")
    assert ckpt.newest_complete(str(tmp_path)) == "global_step11"


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert ckpt.resolve_resume("auto", str(tmp_path / "nothing")) is None
    assert ckpt.resolve_resume(None, str(tmp_path)) is None
    _tag(tmp_path, 3, complete=False)
    assert ckpt.resolve_resume("auto", str(tmp_path)) is None


def test_explicit_resume_must_be_complete(tmp_path):
    tag = _tag(tmp_path, 4, complete=False)
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        ckpt.resolve_resume(str(tmp_path / tag), str(tmp_path))
    ckpt.mark_complete(str(tmp_path), tag, TrainState(global_step=4))
    assert ckpt.resolve_resume(str(tmp_path / tag) + "/", "unused") == (str(tmp_path), tag)


def test_prune_keeps_the_newest_and_drops_leftovers(tmp_path):
    for s in (1, 2, 3):
        _tag(tmp_path, s, complete=True)
    _tag(tmp_path, 0, complete=False)  # leftover of an interrupted save older than the newest
    _tag(tmp_path, 9, complete=False)  # a save in progress (newer): must survive
    removed = ckpt.prune(str(tmp_path), keep_last=2)
    assert sorted(removed) == ["global_step0", "global_step1"]
    assert ckpt.complete_tags(str(tmp_path)) == ["global_step2", "global_step3"]
    assert (tmp_path / "global_step9").is_dir()


def test_train_state_round_trips_as_client_state():
    st = TrainState(global_step=7, epoch=1, batch_in_epoch=3, samples_seen=112, data_seed=5,
                    wandb_run_id="abc", world_size=2, extra={"stream": {"seed": 5}})
    client = st.to_client_state({"optim": {"lr": 1.0}})
    assert client["train_state"]["config"] == {"optim": {"lr": 1.0}}
    assert TrainState.from_client_state(client) == st
    with pytest.raises(ValueError, match="train_state"):
        TrainState.from_client_state({})
