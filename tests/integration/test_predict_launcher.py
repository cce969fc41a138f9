"""fakereasoning-predict under the real `deepspeed` launcher with 2 ranks: every
input scored by exactly one rank, rank 0 writes one file in input order, the same
records as one process; a second launch resumes (nothing scored again)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.local_run import cpu_env, deepspeed_executable, free_port

REPO = Path(__file__).resolve().parents[2]


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_two_ranks_score_disjoint_shares_and_match_one_process(tmp_path):
    from launch.tiny_models import build_tiny_model

    model = build_tiny_model(str(tmp_path / "model"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(9):
        arr = np.random.default_rng(i).integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(imgs / f"{i:02d}.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    args = ["--checkpoint", model, str(imgs), "--batch-size", "2", "--max-new-tokens", "6", "--num-workers", "1",
            "--no-progress"]
    env = cpu_env()
    one = subprocess.run([sys.executable, "-m", "pipeline.inference", *args, "--out", str(tmp_path / "one.jsonl")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert one.returncode == 0, one.stderr[-3000:]
    two_cmd = [deepspeed_executable(), "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", "pipeline.inference", *args, "--out", str(tmp_path / "two.jsonl")]
    two = subprocess.run(two_cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "scored 9, failed 1" in two.stderr and "broken.png" in two.stderr
    r1, r2 = _records(tmp_path / "one.jsonl"), _records(tmp_path / "two.jsonl")
    assert [r["path"] for r in r2] == sorted(str(p) for p in imgs.iterdir())  # input order, each once
    assert [r["path"] for r in r1] == [r["path"] for r in r2]
    for a, b in zip(r1, r2):
        assert a["status"] == b["status"] and a.get("answer") == b.get("answer")
        if a["status"] == "ok":
            assert a["p_fake"] == pytest.approx(b["p_fake"], abs=1e-5)
    # A second launch finds everything done: nothing is scored twice, the file is unchanged.
    again = subprocess.run(two_cmd[:4] + [str(free_port())] + two_cmd[5:], env=env, capture_output=True,
                           text=True, timeout=600, cwd=str(REPO))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "scored 0, failed 1" in again.stderr and "9 already in the output" in again.stderr
    assert [r["path"] for r in _records(tmp_path / "two.jsonl")] == [r["path"] for r in r2]
    assert sum(r["status"] == "ok" for r in _records(tmp_path / "two.jsonl")) == 9
