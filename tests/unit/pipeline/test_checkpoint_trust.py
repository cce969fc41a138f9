"""Resuming unpickles DeepSpeed's files, so a checkpoint is loaded only when its
marker's sha256 of every file still holds, and only from a folder that nobody
else could have written (pipeline/training/checkpoint_trust.py)."""
from __future__ import annotations

import json
import os

import pytest

from pipeline.training.checkpoint_tags import tag_for
from pipeline.training.checkpoint_trust import UntrustedCheckpoint, verify_files
from pipeline.training.checkpointing import TrainState, mark_complete, restore_train_state
from pipeline.training.resume import ResumePoint, resolve_resume


def _saved(root, step=5, umask_mode=0o775):
    """A tag as DeepSpeed leaves it under a 002 umask, then completed by rank 0."""
    tag = tag_for(step)
    d = root / tag
    d.mkdir(parents=True)
    for name, data in (("mp_rank_00_model_states.pt", b"m" * 300), ("zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                                      b"o" * 500)):
        (d / name).write_bytes(data)
        os.chmod(d / name, umask_mode & 0o666)
    os.chmod(d, umask_mode)
    mark_complete(str(root), tag, TrainState(global_step=step))
    return tag


class _Engine:
    """Records whether DeepSpeed's load was reached."""

    global_steps = 5

    def __init__(self):
        self.loaded = False

    def load_checkpoint(self, directory, tag, **kw):
        self.loaded = True
        return directory, {"train_state": {"global_step": 5}}


def test_the_marker_lists_every_files_sha256_and_a_swapped_file_is_never_loaded(tmp_path):
    tag = _saved(tmp_path)
    marker = json.loads((tmp_path / tag / "COMPLETE").read_text())
    assert set(marker["sha256"]) == set(marker["files"]) == {"mp_rank_00_model_states.pt",
                                                             "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert verify_files(str(tmp_path), tag) is None
    assert restore_train_state(_Engine(), str(tmp_path), tag).global_step == 5
    # Same size, other bytes: what a swapped pickle would be.
    (tmp_path / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 500)
    engine = _Engine()
    with pytest.raises(UntrustedCheckpoint, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256 differs"):
        restore_train_state(engine, str(tmp_path), tag)
    assert not engine.loaded
    # The ranks share the reading: rank 1 of 2 checks the second file only.
    assert "optim_states" in verify_files(str(tmp_path), tag, rank=1, world_size=2)
    assert verify_files(str(tmp_path), tag, rank=0, world_size=2) is None


def test_a_marker_without_hashes_or_an_extra_file_is_refused(tmp_path):
    tag = _saved(tmp_path)
    (tmp_path / tag / "planted.pt").write_bytes(b"p")
    assert "files not in its marker: ['planted.pt']" in verify_files(str(tmp_path), tag)
    os.remove(tmp_path / tag / "planted.pt")
    marker = tmp_path / tag / "COMPLETE"
    old = json.loads(marker.read_text())
    del old["sha256"]  # the marker format before this check
    marker.write_text(json.dumps(old))
    assert "lists no sha256" in verify_files(str(tmp_path), tag)


def test_own_checkpoints_are_trusted_whatever_the_umask(tmp_path):
    tag = _saved(tmp_path, umask_mode=0o777)
    for p in (tmp_path, tmp_path / tag, *(tmp_path / tag).iterdir()):
        assert not os.stat(p).st_mode & 0o022, p  # mark_complete removed group/other write
    assert resolve_resume("auto", str(tmp_path)) == ResumePoint(str(tmp_path), tag, False)


@pytest.mark.parametrize("tamper,why", [
    (lambda d: os.chmod(d, 0o775), "writable by group"),
    (lambda d: os.chmod(d / "mp_rank_00_model_states.pt", 0o646), "writable by others"),
    (None, "is owned by uid"),
])
def test_a_checkpoint_others_could_write_is_refused_unless_trusted(tmp_path, monkeypatch, tamper, why):
    tag = _saved(tmp_path)
    if tamper is None:  # files of another user: seen from another uid (chown would need root)
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 4242)
    else:
        tamper(tmp_path / tag)
    with pytest.raises(UntrustedCheckpoint, match=why + r".*trust_foreign=true"):
        resolve_resume("auto", str(tmp_path))
    with pytest.raises(UntrustedCheckpoint, match=why):
        resolve_resume(str(tmp_path / tag), str(tmp_path))
    assert resolve_resume("auto", str(tmp_path), trust_foreign=True).tag == tag


def test_a_linked_tag_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    tag = _saved(elsewhere)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / tag).symlink_to(elsewhere / tag, target_is_directory=True)
    with pytest.raises(UntrustedCheckpoint, match="symbolic link"):
        resolve_resume("auto", str(ckpt_dir))


def test_deepspeeds_files_are_hashed_as_they_are_written(tmp_path):
    import torch

    from pipeline.distributed.engine import _hashing_engine_class
    from sharding.shard_set import file_digest

    engine = _hashing_engine_class()(None)
    path = str(tmp_path / "global_step1" / "x_optim_states.pt")
    os.makedirs(os.path.dirname(path))
    engine.save({"w": torch.arange(1000.0), "step": 3}, path)
    size, digest = engine.digests[os.path.abspath(path)]
    assert (size, digest) == (os.path.getsize(path), file_digest(path))
    assert torch.load(path, weights_only=False)["step"] == 3
