"""Grow MMFR end to end, with the real commands: a small folder of new-generator
images -> `fakereasoning-annotate requests` -> `run` against a local
OpenAI-compatible server -> `collect` -> `bash launch/shard_mmfr.sh` ->
`fakereasoning-eval` on a tiny checkpoint. Nothing in between is hand-made."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit" / "sharding"))  # the annotate test helpers
from _annotate_fixtures import ChatServer, answer, write_images  # noqa: E402

PY = sys.executable


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_SILENT="true")


def _run(cmd: list[str], ok=(0,), timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode in ok, f"{cmd[:4]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _annotate(*args: str, ok=(0,)) -> str:
    return _run([PY, "-m", "sharding.annotate", *args], ok)


@pytest.mark.slow
def test_a_new_generator_goes_from_a_folder_to_evaluation(tmp_path):
    from launch.tiny_models import build_tiny_clip_text, build_tiny_model

    fakes = write_images(tmp_path / "new" / "fake", 6, size=(32, 32))
    reals = write_images(tmp_path / "new" / "real", 4, fmt="JPEG", ext="jpg", size=(32, 32), start=20)
    (tmp_path / "new" / "fake" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    req, journal, mmfr = tmp_path / "req", tmp_path / "journal.jsonl", tmp_path / "mmfr"
    out = _annotate("requests", "--images", str(tmp_path / "new" / "fake"), "--label", "fake", "--generator",
                    "newgen", "--out", str(req), "--model", "local-vlm", "--no-progress")
    assert "requests        6" in out and "broken.png: bad_image" in out
    _annotate("requests", "--images", str(tmp_path / "new" / "real"), "--label", "real", "--generator", "newgen",
              "--out", str(req), "--model", "local-vlm", "--no-progress")

    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in fakes + reals}
    table = {sha[p.name]: answer(1, caption=f"A square of colour number {i}.") for i, p in enumerate(fakes)}
    table.update({sha[p.name]: "Here you go:\n```json\n" + answer(0) + "\n```" for p in reals})
    table[sha["img5.png"]] = json.dumps({"Answer": "Cannot determine."})
    with ChatServer(table, {sha["img1.png"]: ["429"]}) as server:
        out = _annotate("run", str(req), "--endpoint", server.url, "--journal", str(journal), "--concurrency", "3",
                        "--backoff", "0.05", "--no-progress")
    assert "sending 10" in out and "answered 10, failed 0" in out

    table_text = _annotate("collect", str(journal), "--requests", str(req), "--out", str(mmfr), "--conversations")
    report = json.loads((mmfr / "annotate_report.json").read_text())
    groups = {g["label"]: g for g in report["groups"]}
    assert (groups["1_fake"]["kept"], groups["1_fake"]["rejected"]) == (5, {"cannot_determine": 1})
    assert (groups["0_real"]["kept"], groups["0_real"]["conversations"]) == (4, 4)
    assert "cannot_determine 1" in table_text
    (tmp_path / "collect_table.txt").write_text(table_text)

    shards = tmp_path / "shards"
    _run(["bash", str(REPO / "launch" / "shard_mmfr.sh"), str(mmfr), str(shards), "--workers", "1", "--no-progress"])
    manifest = json.loads((shards / "eval" / "newgen" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 9 and manifest["counts"]["by_label"] == {"0": 4, "1": 5}

    model = build_tiny_model(str(tmp_path / "model"))
    clip = build_tiny_clip_text(str(tmp_path / "clip"))
    evaluate = Path(PY).parent / "fakereasoning-eval"
    cmd = [str(evaluate)] if evaluate.exists() else [PY, "-m", "pipeline.evaluation"]
    _run(cmd + ["--checkpoint", model, "--shards", str(shards / "eval"), "--out", str(tmp_path / "eval"),
                "--css-model", clip, "--batch-size", "5", "--max-new-tokens", "8", "--num-workers", "1",
                "--no-progress", "--no-plots", "--wandb-mode", "disabled"], timeout=600)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["counts"]["expected"] == results["counts"]["scored"] == 9
    avg = results["sets"]["mmfr"]["generators"]["newgen"]
    assert (avg["n"], avg["n_real"], avg["n_fake"], avg["n_text"]) == (9, 4, 5, 9)  # every image has a reference
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    refs = {p["relpath"]: p["reference"] for p in preds}
    assert refs["evaluation_sets/newgen/1_fake/img0.png"].startswith("Evidence for anomalous image texture.")
