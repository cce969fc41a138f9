"""Pieces the benchmark scripts share: synthetic MMFR shards and the results files
(so each script does not carry its own copy)."""
from __future__ import annotations

import json
import os
import platform
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


def machine_description() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def write_results(out: str, args, results, render) -> str:
    """<out>.json ({args, machine, results}) and <out>.md (render(results, args, machine)); returns the text."""
    machine = machine_description()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "machine": machine, "results": results}, f, indent=1)
    text = render(results, args, machine)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    return text
