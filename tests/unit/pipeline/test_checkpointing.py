"""Checkpoint completeness: a tag counts only after its marker, whatever was interrupted."""
from __future__ import annotations

import os

import pytest

from pipeline.training import checkpoint_tags as tags
from pipeline.training.checkpointing import TrainState, mark_complete
from pipeline.training.resume import ResumePoint, resolve_resume


def _tag(root, step: int, complete: bool) -> str:
    tag = tags.tag_for(step)
    os.makedirs(root / tag, exist_ok=True)
    (root / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    if complete:
        mark_complete(str(root), tag, TrainState(global_step=step))
    return tag


def test_incomplete_newer_tag_is_ignored(tmp_path):
    _tag(tmp_path, 10, complete=True)
    _tag(tmp_path, 20, complete=False)  # killed mid-save: files but no marker
    (tmp_path / "latest").write_text("global_step20")  # DeepSpeed's own pointer is not trusted
    assert tags.newest_complete(str(tmp_path)) == "global_step10"
    assert resolve_resume("auto", str(tmp_path)) == ResumePoint(str(tmp_path), "global_step10", False)


def test_marker_then_pointer(tmp_path):
    _tag(tmp_path, 5, complete=True)
    assert (tmp_path / "latest_complete").read_text() == "global_step5"
    marker = (tmp_path / "global_step5" / tags.COMPLETE).read_text()
    assert '"global_step": 5' in marker and "zero_pp_rank_0_mp_rank_00_model_states.pt" in marker


def test_stale_or_lost_pointer_falls_back_to_the_highest_complete_step(tmp_path):
    _tag(tmp_path, 2, complete=True)
    _tag(tmp_path, 11, complete=True)
    # Killed between the marker and the pointer update: the pointer is one behind.
    (tmp_path / "latest_complete").write_text("global_step2")
    assert tags.newest_complete(str(tmp_path)) == "global_step11"
    os.remove(tmp_path / "latest_complete")
    assert tags.newest_complete(str(tmp_path)) == "global_step11"
    (tmp_path / "latest_complete").write_text("garbage")
    assert tags.newest_complete(str(tmp_path)) == "global_step11"


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert resolve_resume("auto", str(tmp_path / "nothing")) is None
    assert resolve_resume(None, str(tmp_path)) is None
    _tag(tmp_path, 3, complete=False)
    assert resolve_resume("auto", str(tmp_path)) is None


def test_explicit_resume_must_be_complete(tmp_path):
    tag = _tag(tmp_path, 4, complete=False)
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        resolve_resume(str(tmp_path / tag), str(tmp_path))
    mark_complete(str(tmp_path), tag, TrainState(global_step=4))
    assert resolve_resume(str(tmp_path / tag) + "/", "unused") == ResumePoint(str(tmp_path), tag, False)


def test_prune_keeps_the_newest_and_drops_leftovers(tmp_path):
    for s in (1, 2, 3):
        _tag(tmp_path, s, complete=True)
    _tag(tmp_path, 0, complete=False)  # leftover of an interrupted save older than the newest
    _tag(tmp_path, 9, complete=False)  # a save in progress (newer): must survive
    removed = tags.prune(str(tmp_path), keep_last=2)
    assert sorted(removed) == ["global_step0", "global_step1"]
    assert tags.complete_tags(str(tmp_path)) == ["global_step2", "global_step3"]
    assert (tmp_path / "global_step9").is_dir()


def test_train_state_round_trips_as_client_state():
    st = TrainState(global_step=7, epoch=1, batch_in_epoch=3, samples_seen=112, data_seed=5,
                    wandb_run_id="abc", world_size=2, extra={"stream": {"seed": 5}})
    client = st.to_client_state({"optim": {"lr": 1.0}})
    assert client["train_state"]["config"] == {"optim": {"lr": 1.0}}
    assert TrainState.from_client_state(client) == st
    with pytest.raises(ValueError, match="train_state"):
        TrainState.from_client_state({})


# --------------------------------------------------------------------------- universal checkpoints

def _universal(src, dst):
    """What `ds_to_universal --input_folder src --output_folder dst` leaves: the
    parameter fragments under zero/ and the source's model states, copied."""
    (dst / "zero" / "llm.lora_A.weight").mkdir(parents=True)
    (dst / "zero" / "llm.lora_A.weight" / "fp32.pt").write_bytes(b"w")
    for f in src.glob("*_model_states.pt"):
        (dst / f.name).write_bytes(f.read_bytes())
    (dst.parent / "latest_universal").write_text(dst.name)
    return dst


def _two_rank_tag(root, step, complete=True):
    tag = _tag(root, step, complete=False)
    (root / tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"y" * 12)
    (root / tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 30)
    if complete:
        mark_complete(str(root), tag, TrainState(global_step=step))
    return tag


def test_universal_folder_next_to_its_complete_source_resumes_with_load_universal(tmp_path):
    tag = _two_rank_tag(tmp_path, 4)
    uni = _universal(tmp_path / tag, tmp_path / f"{tag}_universal")
    assert resolve_resume(str(uni), "unused") == ResumePoint(str(tmp_path), f"{tag}_universal", True)
    # `auto` never picks a universal folder, and pruning never deletes one.
    _two_rank_tag(tmp_path, 6)
    assert resolve_resume("auto", str(tmp_path)) == ResumePoint(str(tmp_path), "global_step6", False)
    tags.prune(str(tmp_path), keep_last=1)
    assert uni.is_dir() and not (tmp_path / tag).exists()


def test_universal_folder_of_an_incomplete_source_is_refused(tmp_path):
    tag = _two_rank_tag(tmp_path, 4, complete=False)  # killed mid-save, then converted
    uni = _universal(tmp_path / tag, tmp_path / f"{tag}_universal")
    with pytest.raises(FileNotFoundError, match=f"universal.*{tag} has no COMPLETE"):
        resolve_resume(str(uni), "unused")


def test_universal_folder_converted_before_the_save_finished_is_refused(tmp_path):
    tag = _tag(tmp_path, 4, complete=False)  # rank 1's files not written yet
    uni = _universal(tmp_path / tag, tmp_path / f"{tag}_universal")
    (tmp_path / tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"y" * 12)
    mark_complete(str(tmp_path), tag, TrainState(global_step=4))  # the save completed later
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_1_mp_rank_00_model_states.pt.*convert"):
        resolve_resume(str(uni), "unused")


def test_universal_folder_elsewhere_needs_its_sources_marker(tmp_path):
    src = tmp_path / "run" / "checkpoints"
    src.mkdir(parents=True)
    tag = _two_rank_tag(src, 4)
    uni = _universal(src / tag, tmp_path / "moved")  # not next to the source, not named *_universal
    with pytest.raises(FileNotFoundError, match="source tag is unknown.*copy its COMPLETE"):
        resolve_resume(str(uni), "unused")
    (uni / tags.COMPLETE).write_text((src / tag / tags.COMPLETE).read_text())
    assert resolve_resume(str(uni), "unused") == ResumePoint(str(tmp_path), "moved", True)
    # The copied marker must be the source's: another checkpoint's marker does not fit.
    other = _tag(src, 8, complete=True)
    (uni / tags.COMPLETE).write_text((src / other / tags.COMPLETE).read_text())
    with pytest.raises(FileNotFoundError, match="differ"):
        resolve_resume(str(uni), "unused")
