"""Shared, session-scoped inputs of the integration tests.

One synthetic MMFR and one shard set serve every test of the session (the
training tests, the demo-like checks, evaluation tests), because generating
and sharding even a small dataset costs seconds that would otherwise be paid
per test. Both are made by the project's own command lines, exactly as a user
makes them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# 150 training images at 64 per shard -> shards of 64, 64 and 22 samples: with
# 2 ranks one rank reads 2 shards and the other 1, the uneven case that hangs
# ZeRO-3 when ranks disagree on the number of batches.
TRAIN_IMAGES = 150
EVAL_PER_GENERATOR = 8
SAMPLES_PER_SHARD = 64


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session", autouse=True)
def deepspeed_cpu_ops() -> None:
    """Compile DeepSpeed's CPU ops once before any launcher test.

    On a fresh machine the first `deepspeed` job compiles two C++ ops for about
    2.5 minutes (longer on a loaded machine); paid inside whichever test runs
    first, that would eat its launch timeout and fail it for the wrong reason.
    """
    from launch.local_run import build_cpu_ops

    build_cpu_ops(timeout=1800)


@pytest.fixture(scope="session")
def synthetic_mmfr(tmp_path_factory) -> Path:
    """A synthetic MMFR root (python -m sharding.synthetic)."""
    root = tmp_path_factory.mktemp("data") / "mmfr"
    _run([sys.executable, "-m", "sharding.synthetic", "--out", str(root), "--train-images", str(TRAIN_IMAGES),
          "--eval-images-per-generator", str(EVAL_PER_GENERATOR), "--seed", "3", "--quiet"], "synthetic MMFR")
    return root


@pytest.fixture(scope="session")
def mmfr_shards(synthetic_mmfr: Path) -> Path:
    """Shards of `synthetic_mmfr` (python -m sharding.shard_mmfr): train/ and eval/<generator>/."""
    out = synthetic_mmfr.parent / "shards"
    _run([sys.executable, "-m", "sharding.shard_mmfr", str(synthetic_mmfr), str(out),
          "--max-samples-per-shard", str(SAMPLES_PER_SHARD), "--workers", "1", "--no-progress"], "shard_mmfr")
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == TRAIN_IMAGES, sizes
    return out
