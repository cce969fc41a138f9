"""Synthetic MMFR shards for the benchmark scripts (shared, so each script does not
carry its own copy of the generator and sharder calls)."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_synthetic_shards(work: str, train_images: int, image_size: int, samples_per_shard: int) -> str:
    """`python -m sharding.synthetic` then `python -m sharding.shard_mmfr` under `work`;
    returns the shard root (with train/ and eval/). Reuses what an earlier run left."""
    root, shards = os.path.join(work, "mmfr"), os.path.join(work, "shards")
    env = {**os.environ, "PYTHONPATH": REPO}
    if not os.path.isfile(os.path.join(root, "forgery_reasoning_cot.json")):
        subprocess.run([sys.executable, "-m", "sharding.synthetic", "--out", root, "--train-images",
                        str(train_images), "--eval-images-per-generator", "2", "--image-size", str(image_size),
                        "--seed", "0", "--quiet"], check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    if not os.path.isfile(os.path.join(shards, "train", "sizes.json")):
        subprocess.run([sys.executable, "-m", "sharding.shard_mmfr", root, shards, "--max-samples-per-shard",
                        str(samples_per_shard), "--workers", "1", "--no-progress"], check=True, cwd=REPO,
                       env=env, stdout=subprocess.DEVNULL)
    return shards
