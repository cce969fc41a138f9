"""End-to-end evaluation: a 2-rank run through the `deepspeed` launcher gives the
same per-image predictions as a 1-process run, every image is scored exactly
once, and the outputs agree with each other. Tiny random model, few images,
real sharder, real launcher, W&B offline (nothing mocked)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch.wandb_readback import read_offline_run

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                WANDB_SILENT="true", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
                # a world of one still binds MASTER_PORT: never the default other tests use
                MASTER_PORT=str(_free_port()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import io

    from PIL import Image

    from launch.tiny_models import build_tiny_setup
    from sharding.eval_sets.cli import main as shard_benchmark

    root = tmp_path_factory.mktemp("eval")
    s = build_tiny_setup(str(root), eval_images_per_generator=2)
    bench = root / "chameleon"
    for i, folder in enumerate(["0_real", "1_fake", "1_fake"]):
        (bench / folder).mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (i * 60, 90, 200)).save(buf, "PNG")
        (bench / folder / f"{i}.png").write_bytes(buf.getvalue())
    assert shard_benchmark(["chameleon", str(bench), str(root / "bench"), "--workers", "1", "--no-progress"]) == 0
    return s, str(root / "bench")


def _eval_args(s, bench, out) -> list[str]:
    return ["--checkpoint", s.model, "--shards", s.shards, "--benchmark", f"chameleon={bench}", "--out", str(out),
            "--css-model", s.clip_text, "--batch-size", "3", "--max-new-tokens", "8", "--num-workers", "1",
            "--no-progress", "--perturb", "jpeg:50", "--calibrate-on", "chameleon"]


def _predictions_of(out, name: str) -> list[dict]:
    with open(os.path.join(out, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _predictions(out) -> list[dict]:
    return _predictions_of(out, "predictions.jsonl")


@pytest.mark.slow
def test_two_ranks_match_one_process(setup, tmp_path):
    from pipeline.evaluation.metrics import set_metrics

    s, bench = setup
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([PY, str(REPO / "launch" / "eval.py"), *_eval_args(s, bench, one),
                          "--wandb-mode", "offline", "--wandb-dir", str(tmp_path / "wb")],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "| stablediffusion |" in res.stdout  # the results table is printed
    deepspeed = shutil.which("deepspeed") or str(Path(PY).parent / "deepspeed")
    res = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()),
                          str(REPO / "launch" / "eval.py"), *_eval_args(s, bench, two), "--wandb-mode", "disabled"],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    card = (Path(s.model) / "README.md").read_text()
    assert "## Evaluation" in card  # the eval refreshed the export's model card
    assert r1["run"]["world_size"] == 1 and r2["run"]["world_size"] == 2
    # 23 images in 8 batches of 3 (the last of 2), split into whole batches, no padding
    assert [p["images"] for p in r2["run"]["per_rank"]] == [12, 11]
    total = s.images + 3
    for r in (r1, r2):
        assert r["counts"]["expected"] == r["counts"]["scored"] == total and r["counts"]["failed"] == 0
        assert r["counts"]["per_set"] == {"mmfr": {"expected": 20, "scored": 20, "failed": 0},
                                          "chameleon": {"expected": 3, "scored": 3, "failed": 0}}
        assert r["checkpoint"]["sha256"] == r1["checkpoint"]["sha256"]

    p1, p2 = _predictions(one), _predictions(two)
    keys = [(p["set"], p["key"]) for p in p2]
    assert len(keys) == len(set(keys)) == total  # every image exactly once
    assert [(p["set"], p["key"]) for p in p1] == keys
    for a, b in zip(p1, p2):
        for field in ("generator", "label", "answer", "pred", "parse_status", "reasoning", "reference"):
            assert a[field] == b[field], (a["key"], field)
        assert a["p_fake"] == pytest.approx(b["p_fake"], abs=1e-5)
        assert a["css"] == pytest.approx(b["css"], abs=1e-5) if a["css"] is not None else b["css"] is None

    # Outputs consistent with each other: every table number follows from predictions.jsonl.
    for out, r, preds in ((one, r1, p1), (two, r2, p2)):
        for name in ("mmfr", "chameleon"):
            recomputed = json.loads(json.dumps(set_metrics([p for p in preds if p["set"] == name])))
            assert recomputed == r["sets"][name]
        md = (out / "results.md").read_text()
        # 2 conventions + calibration per set
        assert "## mmfr" in md and "## chameleon" in md and md.count("**Average**") == 6
        assert "**mmfr: jpeg** (JPEG quality)" in md and "| chameleon (in-sample) |" in md
        for png in ("accuracy_mmfr.png", "roc_mmfr.png", "accuracy_chameleon.png", "roc_chameleon.png",
                    "reliability_mmfr.png", "robustness_mmfr.png"):
            assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # The JPEG sweep: every image once more, gathered from both ranks, the same answers.
    s1, s2 = (_predictions_of(out, "predictions_perturbed.jsonl") for out in (one, two))
    assert len(s1) == total and [(p["key"], p["perturbation"], p["answer"]) for p in s1] == [
        (p["key"], p["perturbation"], p["answer"]) for p in s2]
    assert r1["robustness"]["mmfr"]["jpeg"][0]["cpm_acc"] == r1["sets"]["mmfr"]["average"]["cpm_acc"]
    assert r1["threshold"]["set"] == "chameleon" == r2["threshold"]["set"]
    # detection-only benchmark: no text metrics; MMFR has references
    assert r1["sets"]["chameleon"]["average"]["bleu1"] is None
    assert r1["sets"]["mmfr"]["average"]["n_text"] == 20
    # W&B offline run of the 1-process eval, read back with W&B's own CLI
    logs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(logs) == 1
    summary = read_offline_run(logs[0])["summary"]
    assert summary["eval/counts"]["scored"] == total
    assert summary["eval/mmfr/average/n"] == 20
    assert summary["eval/predictions"]["nrows"] == min(32, total) and summary["eval/mmfr/reference"]["nrows"] == 12


@pytest.mark.slow
def test_reference_protocol_samples_the_same_answers_on_two_ranks(setup, tmp_path):
    """--protocol reference samples (temperature 0.2); per-batch seeds and batches cut
    at fixed positions make a 2-rank run give the 1-process answers."""
    s, _ = setup
    args = ["--checkpoint", s.model, "--shards", s.shards, "--protocol", "reference", "--max-per-class", "1",
            "--css-model", s.clip_text, "--batch-size", "3", "--max-new-tokens", "8", "--num-workers", "1",
            "--no-progress", "--no-plots", "--wandb-mode", "disabled"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([PY, str(REPO / "launch" / "eval.py"), *args, "--out", str(one)],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    deepspeed = shutil.which("deepspeed") or str(Path(PY).parent / "deepspeed")
    res = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()),
                          str(REPO / "launch" / "eval.py"), *args, "--out", str(two)],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    for out in (one, two):
        r = json.loads((out / "results.json").read_text())
        assert r["protocol"]["name"] == "reference" and r["protocol"]["generation"]["temperature"] == 0.2
        assert r["selection"]["mmfr"]["selected"] == r["counts"]["expected"] == 20  # 1 real + 1 fake x 10
        assert "Protocol: **reference" in (out / "results.md").read_text()
    p1, p2 = _predictions(one), _predictions(two)
    assert [(p["key"], p["answer"], p["parse_status"]) for p in p1] == [(p["key"], p["answer"], p["parse_status"])
                                                                         for p in p2]
