"""Writes that must not follow symbolic links, and an export that is never deleted
before its replacement exists (common/atomic_files.py and its callers).

Each test plants what an attacker sharing a scratch folder (or an unlucky `ln -s`)
could: a link at a final name, a link at the temporary name the old code used,
a linked checkpoint tag. The link's target is a "victim" file or folder outside
the run, which must come out untouched."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from common.atomic_files import RefusedLink, remove_tree, replace_dir, write_atomic
from pipeline.training import checkpoint_tags as tags
from pipeline.training import preemption
from pipeline.training.export import export_final


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    return path


def _untouched(victim) -> bool:
    return victim.read_text() == "precious"


def test_a_link_at_the_final_name_is_replaced_not_written_through(tmp_path, victim):
    from pipeline.evaluation.report import write_predictions

    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").symlink_to(victim)
    write_predictions(str(out / "predictions.jsonl"), [])
    assert _untouched(victim) and not (out / "predictions.jsonl").is_symlink()
    (out / "x.json").symlink_to(victim)
    write_atomic(out / "x.json", "{}")
    assert _untouched(victim) and (out / "x.json").read_text() == "{}"
    assert stat.S_IMODE(os.stat(out / "x.json").st_mode) == 0o644
    assert sorted(os.listdir(out)) == ["predictions.jsonl", "x.json"]  # no temporary left


@pytest.mark.parametrize("planted", ["PREEMPTED.tmp", "PREEMPTED"])
def test_the_preemption_marker_never_writes_through_a_planted_link(tmp_path, victim, planted):
    (tmp_path / planted).symlink_to(victim)  # the old code's fixed temporary name, or the final one
    path = preemption.write_marker(str(tmp_path), {"global_step": 3})
    assert _untouched(victim)
    assert json.loads(open(path).read())["global_step"] == 3


def test_prune_refuses_to_delete_through_a_linked_tag(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    elsewhere = tmp_path / "elsewhere" / "global_step1"
    elsewhere.mkdir(parents=True)
    (elsewhere / "COMPLETE").write_text("{}")
    (elsewhere / "weights.pt").write_bytes(b"w")
    ckpt_dir.mkdir()
    (ckpt_dir / "global_step1").symlink_to(elsewhere, target_is_directory=True)
    for step in (2, 3):
        (ckpt_dir / f"global_step{step}").mkdir()
        (ckpt_dir / f"global_step{step}" / "COMPLETE").write_text("{}")
    removed = tags.prune(str(ckpt_dir), keep_last=1)
    assert removed == ["global_step2"]
    assert (elsewhere / "COMPLETE").exists() and (elsewhere / "weights.pt").exists()
    assert (ckpt_dir / "global_step1").is_symlink()


def test_remove_tree_and_replace_dir_refuse_links(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_text("x")
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    with pytest.raises(RefusedLink, match="symbolic link"):
        remove_tree(tmp_path / "link")
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(RefusedLink, match="symbolic link"):
        replace_dir(new, tmp_path / "link")
    assert (target / "f").read_text() == "x"


def test_eval_restart_refuses_a_linked_partial_folder(tmp_path):
    from types import SimpleNamespace

    from pipeline.evaluation import resume

    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, resume.partial_dir(str(out)))
    with pytest.raises(RefusedLink):
        resume.prepare(SimpleNamespace(out=str(out), batch_size=1), [], {}, restart=True)
    assert (target / "keep").exists()


# --------------------------------------------------------------------------- the export
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from modeling.checkpoints.checkpoint import load_pretrained

    from launch.tiny_models import build_tiny_model

    torch.set_num_threads(1)
    path = build_tiny_model(str(tmp_path_factory.mktemp("m") / "model"))
    return load_pretrained(path)


class _FullDisk:
    """A tokenizer whose save fails, as on a full disk: the merged export fails after
    the trainable folder and the merged weights are written."""

    def save_pretrained(self, directory):
        raise OSError(28, "No space left on device (test)")


def _export(model, tokenizer, out, saved_tokenizer=None):
    from modeling.model import FakeReasoningModel

    return export_final(model, lambda: FakeReasoningModel.from_config(model.config, tokenizer),
                             saved_tokenizer or tokenizer, str(out), rank=0)


def test_a_failed_export_leaves_the_previous_one_whole(tmp_path, tiny):
    model, tokenizer = tiny
    out = tmp_path / "export"
    _export(model, tokenizer, out)
    before = {sub: sorted(os.listdir(out / sub)) for sub in ("trainable", "merged")}
    assert "config.json" in before["merged"]
    with pytest.raises(OSError, match="No space left"):
        _export(model, tokenizer, out, saved_tokenizer=_FullDisk())
    assert {sub: sorted(os.listdir(out / sub)) for sub in ("trainable", "merged")} == before
    assert sorted(os.listdir(out)) == ["merged", "trainable"]  # no staging folder left behind
    _export(model, tokenizer, out)  # and a later export replaces both
    assert sorted(os.listdir(out)) == ["merged", "trainable"]


def test_the_export_refuses_a_linked_folder(tmp_path, tiny, victim):
    model, tokenizer = tiny
    out = tmp_path / "export"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.txt").write_text("precious")
    (out / "merged").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(RefusedLink, match="merged"):
        _export(model, tokenizer, out)
    assert os.listdir(elsewhere) == ["victim.txt"]
