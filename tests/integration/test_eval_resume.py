"""Resumable evaluation end to end: a 2-rank run under the real `deepspeed`
launcher, SIGKILLed mid-way, resumed by one process (python launch/eval.py),
ends with the results of an uninterrupted run; a rerun with another generation
setting stops with exit status 2 naming it; --restart starts over.

The kill cannot come too early or too late: the run's process group is
frozen (SIGSTOP) as soon as each rank has a batch line in the partial files, well before
the last of its 20 batches (24 new tokens per answer, a JPEG sweep: ~0.2 s a
batch) and seconds before results.json (text metrics, gather, report); what
the files hold then is what the resume must find, and the group is SIGKILLed.
Tiny random model, synthetic shards, W&B disabled, nothing mocked.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
IMAGES, BATCH = 40, 2  # 10 generators x 4 images: 20 batches, 10 per rank of 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                WANDB_SILENT="true", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                MASTER_PORT=str(_free_port()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from launch.tiny_models import build_tiny_setup

    s = build_tiny_setup(str(tmp_path_factory.mktemp("eval_resume")), eval_images_per_generator=4)
    assert s.images == IMAGES
    return s


def _args(s, out, *more) -> list[str]:
    return ["--checkpoint", s.model, "--shards", s.shards, "--out", str(out), "--css-model", s.clip_text,
            "--batch-size", str(BATCH), "--max-new-tokens", "24", "--num-workers", "1", "--no-progress",
            "--perturb", "jpeg:50", "--wandb-mode", "disabled", *more]


def _eval(args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(REPO / "launch" / "eval.py"), *args], env=_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO))


def _lines(partial: Path) -> tuple[list[dict], int]:
    """(the batch records in the partial files, lines that are not one: cut by the kill)."""
    records, bad = [], 0
    for path in sorted(partial.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    bad += 1
    return records, bad


def _killed_two_rank_run(s, out: Path, log: Path) -> None:
    """Start the 2-rank run; freeze its process group once each rank wrote a batch line, then SIGKILL it."""
    deepspeed = shutil.which("deepspeed") or str(Path(PY).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), str(REPO / "launch" / "eval.py"),
           *_args(s, out)]
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len({d["start"] * 2 // IMAGES for d in _lines(out / "partial")[0]}) < 2:  # a batch of each rank
            assert proc.poll() is None, f"the run ended ({proc.returncode}) before the kill:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no batch line in time:\n{log.read_text()[-4000:]}"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGSTOP)
        assert not (out / "results.json").exists()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


def _strip_run(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "run"}


def _same(a, b, path="") -> None:
    """Equal JSON values, floats to 1e-5 (p(fake) and CSS of other batchings)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5, nan_ok=True), path
    elif isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _outputs(out: Path) -> tuple[dict, list, list]:
    def lines(name):
        return [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]

    return json.loads((out / "results.json").read_text()), lines("predictions.jsonl"), \
        lines("predictions_perturbed.jsonl")


@pytest.mark.slow
def test_killed_run_resumes_with_the_uninterrupted_results(setup, tmp_path):
    s = setup
    plain, out = tmp_path / "plain", tmp_path / "out"
    res = _eval(_args(s, plain))
    assert res.returncode == 0, res.stderr[-4000:]
    expected = _outputs(plain)
    assert expected[0]["run"]["resumed_images"] == 0 and expected[0]["counts"]["scored"] == IMAGES

    # Killed mid-way with 2 ranks.
    _killed_two_rank_run(s, out, tmp_path / "killed.log")
    parts = sorted(p.name for p in (out / "partial").iterdir())
    assert parts == ["attempt1-rank0-of-2.jsonl", "attempt1-rank1-of-2.jsonl", "fingerprint.json"]
    # Killed while writing: a cut line at the end of a file is ignored, not fatal.
    with open(out / "partial" / "attempt1-rank1-of-2.jsonl", "a", encoding="utf-8") as f:
        f.write('\n{"start": 38, "rows": [{"key": "cut')
    done, bad = _lines(out / "partial")
    assert 1 <= len(done) < IMAGES // BATCH and bad >= 1, (len(done), bad)
    resumed = sum(len(d["rows"]) + len(d["failures"]) for d in done)

    # Another generation setting: refused, naming the field and the folder; nothing deleted.
    res = _eval(_args(s, out, "--max-new-tokens", "9"))
    assert res.returncode == 2, (res.stdout + res.stderr)[-4000:]
    assert "generation.max_new_tokens: 24 before, 9 now" in res.stderr and "--restart" in res.stderr
    assert str(out / "partial") in res.stderr and not (out / "results.json").exists()
    assert len(_lines(out / "partial")[0]) == len(done)

    # Same arguments, one process: only the remaining images are scored.
    res = _eval(_args(s, out))
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resuming: {resumed} of {IMAGES} images already scored in {out / 'partial'}" in res.stderr
    assert f"{bad} cut or unusable line(s) ignored" in res.stderr
    got = _outputs(out)
    run = got[0]["run"]
    assert run["world_size"] == 1 and run["resumed_images"] == resumed
    assert run["per_rank"][0]["images"] == IMAGES - resumed
    assert run["forwards_per_image"] == expected[0]["run"]["forwards_per_image"]
    # The one difference besides "run": the results folder in "config" (and plot paths, if any).
    uninterrupted = json.loads((plain / "results.json").read_text().replace(str(plain), str(out)))
    _same(_strip_run(got[0]), _strip_run(uninterrupted))
    _same(got[1], expected[1])
    _same(got[2], expected[2])
    assert "## mmfr" in (out / "results.md").read_text()

    # --restart with the other setting: the partial output is discarded, all scored again.
    res = _eval(_args(s, out, "--max-new-tokens", "9", "--restart"))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming" not in res.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["run"]["resumed_images"] == 0 and r["protocol"]["generation"]["max_new_tokens"] == 9
    assert r["counts"]["scored"] == IMAGES
    assert sorted(p.name for p in (out / "partial").iterdir()) == ["attempt1-rank0-of-1.jsonl", "fingerprint.json"]
