"""Resumable evaluation (pipeline/evaluation/resume.py) in one process: per-batch
partial files, cut lines ignored, fingerprint mismatches named, batches done by
one world size resumed by another with the uninterrupted run's rows, --restart.

The ranks of a W-rank run are played one after another here, with a fake scorer
whose answer records the batch's seed (runner.batch_seed): a batch cut at another
position would change it. The real model and launcher: tests/integration/test_eval_resume.py.
"""
from __future__ import annotations

import io
import json
import os
import re

import pytest
import torch

from pipeline.evaluation import resume
from pipeline.evaluation.config import EvalConfig
from pipeline.evaluation.data import enumerate_items
from pipeline.evaluation.runner import batch_seed, score_items

IDENTITY = {"sha256": "ab" * 32}
N_IMAGES, BATCH = 11, 2  # 6 global batches, the last of one image; image 4 is undecodable


class FakeScorer:
    """Scorer's interface without a model: the answer names the batch's seed and
    the image's pixel sum, forwards count 1 per image."""

    def __init__(self, cfg):
        self.cfg, self.images, self.forwards = cfg, 0, 0

    def score_batch(self, pixel_values, samples):
        seed = batch_seed(self.cfg.seed, samples[0])
        self.images += len(samples)
        self.forwards += len(samples)
        return [{"key": s["key"], "set": s["set"], "generator": s["generator"], "label": s["label"],
                 "pred": s["label"], "parse_status": "ok", "p_fake": 0.5, "reasoning": "", "reference": "",
                 "answer": f"{seed}/{s['key']}/{float(px.sum()):.3f}", "relpath": s["relpath"],
                 "shard": s["shard"], "index": s["index"], "video": None}
                for s, px in zip(samples, pixel_values)]


class Killed(Exception):
    """Stands for SIGKILL after a number of batches."""


def _processor(image):
    return torch.tensor([float(torch.tensor(list(image.convert("L").tobytes())).sum()) / 1000.0])


@pytest.fixture
def shard(tmp_path):
    from PIL import Image

    from sharding.tar_writer import TarWriter

    d = tmp_path / "set"
    d.mkdir()
    w = TarWriter(str(d / "shard-000000.tar"))
    for i in range(N_IMAGES):
        buf = io.BytesIO()
        Image.new("RGB", (8, 6), (20 * i, 90, 200 - 10 * i)).save(buf, "PNG")
        w.add(f"k{i:02d}.png", b"broken" if i == 4 else buf.getvalue())
        w.add(f"k{i:02d}.json", json.dumps({"label": i % 2, "generator": "g", "reference": "", "relpath": f"{i}.png",
                                            "image_ext": "png"}).encode())
    w.commit()
    (d / "sizes.json").write_text(json.dumps({"shard-000000.tar": N_IMAGES}))
    return str(d)


def _cfg(tmp_path, shard, **kw):
    kw = {"batch_size": BATCH, "num_workers": 0, "perturb": ["jpeg:50"], **kw}
    return EvalConfig(checkpoint="ckpt", out=str(tmp_path / "out"), shards=shard, **kw)


def _play(cfg, items, world, kill_after=None, restart=False):
    """One attempt of a `world`-rank run, ranks one after another; a rank stops
    (as if killed) after `kill_after` batches. Returns (state, this attempt's records)."""
    state = resume.prepare(cfg, items, IDENTITY, restart=restart)
    remaining = resume.remaining_starts(len(items), cfg.batch_size, state.done)
    records = []
    for rank in range(world):
        mine = resume.items_of(items, resume.split_starts(remaining, rank, world), cfg.batch_size)
        writer = resume.PartialWriter(resume.partial_dir(cfg.out), state.attempt, rank, world, items, cfg.batch_size)

        def hook(*args, writer=writer):
            writer(*args)
            if kill_after is not None and len(writer.records) >= kill_after:
                raise Killed

        try:
            score_items(FakeScorer(cfg), mine, _processor, cfg, False, perturbed=[], on_batch=hook)
        except Killed:
            pass
        finally:
            writer.close()
        records += writer.records
    return state, records


def _final(state, records):
    rows, failures, perturbed, forwards, scored = resume.merge(list(state.done.values()) + records)
    for f in failures:  # PIL names the BytesIO object's address ("<_io.BytesIO object at 0x7f...>")
        f["reason"] = f["error"] = re.sub(r" at 0x[0-9a-f]+", "", f["reason"])
    return {"rows": rows, "failures": failures, "perturbed": perturbed, "forwards": forwards, "scored": scored}


@pytest.fixture
def uninterrupted(tmp_path, shard):
    cfg = _cfg(tmp_path / "plain", shard)
    items = enumerate_items(cfg.sets())
    state, records = _play(cfg, items, 1)
    assert not state.done and len(records) == 6
    return _final(state, records)


def test_every_batch_is_one_fsynced_line_with_its_rows_failures_and_sweep(tmp_path, shard, uninterrupted):
    cfg = _cfg(tmp_path, shard)
    items = enumerate_items(cfg.sets())
    _play(cfg, items, 1)
    (path,) = resume.part_files(resume.partial_dir(cfg.out))
    assert os.path.basename(path) == "attempt1-rank0-of-1.jsonl"
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert [d["start"] for d in lines] == [0, 2, 4, 6, 8, 10]
    assert [len(d["rows"]) + len(d["failures"]) for d in lines] == [2, 2, 2, 2, 2, 1]
    assert [f["key"] for f in lines[2]["failures"]] == ["k04"] and "reason" in lines[2]["failures"][0]
    assert [r["perturbation"] for r in lines[0]["perturbed"]] == ["jpeg:50", "jpeg:50"]
    assert lines[0]["forwards"] == lines[0]["scored"] == 4  # clean + perturbed
    assert len(uninterrupted["rows"]) == 10 and len(uninterrupted["perturbed"]) == 10
    fp = json.loads(open(os.path.join(resume.partial_dir(cfg.out), resume.FINGERPRINT_FILE)).read())
    assert fp == resume.fingerprint(cfg, items, IDENTITY) and fp["checkpoint_sha256"] == IDENTITY["sha256"]


def test_a_cut_last_line_is_ignored_counted_and_announced(tmp_path, shard, capsys):
    cfg = _cfg(tmp_path, shard)
    items = enumerate_items(cfg.sets())
    _play(cfg, items, 1, kill_after=3)
    (path,) = resume.part_files(resume.partial_dir(cfg.out))
    whole = open(path, encoding="utf-8").read()
    with open(path, "a", encoding="utf-8") as f:  # killed in the middle of writing a 4th line
        f.write(whole.splitlines()[-1][:57])
    capsys.readouterr()
    state = resume.prepare(cfg, items, IDENTITY)
    assert sorted(state.done) == [0, 2, 4] and state.ignored_lines == 1 and state.attempt == 2
    assert state.resumed_images == 6
    err = capsys.readouterr().err
    assert f"resuming: 6 of {N_IMAGES} images already scored in {state.directory}" in err and "1 cut" in err
    # A line that parses but does not fit the plan (wrong batch size) is not taken either.
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"start": 6, "rows": [], "failures": [], "perturbed": [], "forwards": 0,
                                   "scored": 0}) + "\n")
    done, ignored = resume.load_done(state.directory, len(items), BATCH)
    assert sorted(done) == [0, 2, 4] and ignored == 2


@pytest.mark.parametrize("change, field", [
    ({"max_new_tokens": 7}, "generation.max_new_tokens"), ({"seed": 3}, "seed"), ({"batch_size": 3}, "batch_size"),
    ({"perturb": []}, "perturb"), ({"protocol": "reference"}, "protocol"), ({"dtype": "bfloat16"}, "dtype"),
])
def test_a_fingerprint_mismatch_names_the_folder_and_the_field(tmp_path, shard, change, field):
    cfg = _cfg(tmp_path, shard, max_new_tokens=6)
    items = enumerate_items(cfg.sets())
    _play(cfg, items, 1, kill_after=1)
    with pytest.raises(resume.ResumeMismatch, match="--restart") as e:
        resume.prepare(_cfg(tmp_path, shard, **{"max_new_tokens": 6, **change}), items, IDENTITY)
    assert field in str(e.value) and resume.partial_dir(cfg.out) in str(e.value)
    with pytest.raises(resume.ResumeMismatch, match="checkpoint_sha256"):
        resume.prepare(cfg, items, {"sha256": "cd" * 32})
    with pytest.raises(resume.ResumeMismatch, match="items_sha256"):
        resume.prepare(cfg, items[:-1], IDENTITY)
    assert resume.fingerprint_diff({"a": 1, "g": {"t": 0}}, {"a": 1, "g": {"t": 1}, "b": 2}) == ["b", "g.t"]


@pytest.mark.parametrize("world_before, world_after", [(2, 1), (2, 3), (1, 2), (3, 2)])
def test_batches_done_under_one_world_size_resume_under_another(tmp_path, shard, uninterrupted,
                                                                world_before, world_after):
    cfg = _cfg(tmp_path, shard)
    items = enumerate_items(cfg.sets())
    _, first = _play(cfg, items, world_before, kill_after=1)  # every rank killed after its first batch
    assert len(first) == world_before
    state, records = _play(cfg, items, world_after)
    assert sorted(state.done) == sorted(r.start for r in first)
    assert sorted(r.start for r in records) == resume.remaining_starts(len(items), BATCH, state.done)
    assert _final(state, records) == uninterrupted  # rows, failures, sweep and counts, in list order
    # A third run finds everything done and scores nothing.
    state, records = _play(cfg, items, world_after)
    assert len(state.done) == 6 and records == [] and _final(state, records) == uninterrupted


def test_restart_clears_the_partial_output(tmp_path, shard, uninterrupted):
    cfg = _cfg(tmp_path, shard)
    items = enumerate_items(cfg.sets())
    _play(cfg, items, 2, kill_after=1)
    other = _cfg(tmp_path, shard, seed=5)
    state, records = _play(other, items, 1, restart=True)
    assert not state.done and state.attempt == 1 and len(records) == 6
    files = sorted(os.listdir(resume.partial_dir(cfg.out)))
    assert files == ["attempt1-rank0-of-1.jsonl", resume.FINGERPRINT_FILE]
    assert json.loads(open(os.path.join(state.directory, resume.FINGERPRINT_FILE)).read())["seed"] == 5
    assert _final(state, records)["rows"] != uninterrupted["rows"]  # other seeds, other answers
    # Partial files without a fingerprint are not trusted.
    os.remove(os.path.join(state.directory, resume.FINGERPRINT_FILE))
    with pytest.raises(resume.ResumeMismatch, match="no fingerprint.json"):
        resume.prepare(other, items, IDENTITY)


def test_split_of_remaining_batches_is_rank_slice_when_nothing_is_done(shard):
    from pipeline.evaluation.data import rank_slice

    items = enumerate_items({"s": shard})
    for world in (1, 2, 3, 4, 7):
        starts = resume.remaining_starts(len(items), BATCH, set())
        for rank in range(world):
            assert resume.items_of(items, resume.split_starts(starts, rank, world), BATCH) == \
                rank_slice(items, rank, world, BATCH)
