"""Two evaluations into one --out: the second stops at once naming the first
(exit status 2), instead of picking the same attempt number and appending to
the same partial files. The lock is the training's (sharding/dir_lock.py); the
test holds it as a live evaluation would, and runs the real command."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from PIL import Image


@pytest.mark.slow
def test_a_second_evaluation_into_the_same_out_is_refused(tmp_path, eval_shard):
    from launch.tiny_models import build_tiny_model
    from sharding.dir_lock import LOCK_FILE, acquire

    model = build_tiny_model(str(tmp_path / "model"))
    shards = eval_shard(tmp_path / "set", [("a.png", Image.new("RGB", (20, 20)), 0, "g")])
    out = tmp_path / "out"
    out.mkdir()
    lock = acquire(str(out / LOCK_FILE), "evaluation")  # a live evaluation (this process) holds it
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH"))
                                                           if p)}
        env.pop("RANK", None)
        with socket.socket() as probe:  # a free port: the default 29511 may be taken by another run
            probe.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(probe.getsockname()[1])
        proc = subprocess.run([sys.executable, "-m", "pipeline.evaluation", "--checkpoint", model, "--shards", shards,
                               "--out", str(out), "--num-workers", "0", "--no-progress", "--no-plots",
                               "--wandb-mode", "disabled", "--max-new-tokens", "2"],
                              capture_output=True, text=True, timeout=300, env=env)
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"pid {os.getpid()}" in proc.stderr or str(os.getpid()) in proc.stderr
    assert not (out / "partial").exists() and not (out / "results.json").exists()
