"""Benchmark: the MMFR sharder against `tar -cf` of the same files.

    .venv/bin/python benchmarks/bench_sharding.py [--train-images 1600] [--eval-per-generator 40]
                                                  [--image-size 128] [--repeats 3]

Builds a synthetic MMFR (>= 2,000 images by default) in a temporary folder,
warms the page cache, then times, in the same run and with the same files:
`tar -cf` of the dataset root (the baseline), and the sharder CLI
(`python -m sharding.shard_mmfr`, image validation on, default options) with 1
and 2 workers, each the best of --repeats runs into a fresh output folder
(wall time of the whole command, interpreter start-up included). Prints
images/s, MB/s (image bytes) and the ratio to tar, and checks the goals:
sharder wall time <= 1.5 x tar, 2 workers faster than 1, and byte-identical
output for 1 and 2 workers.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sharding.synthetic import generate_mmfr  # noqa: E402


def _timed(cmd: list[str], repeats: int, before=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b, ignore=[".sharder", "summary.json"])

    def walk(c) -> bool:
        if c.left_only or c.right_only or c.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        return not mismatch and not errors and all(walk(s) for s in c.subdirs.values())
    return walk(cmp)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-images", type=int, default=1600)
    p.add_argument("--eval-per-generator", type=int, default=40)
    p.add_argument("--image-size", type=int, default=128, help="base side of the synthetic images")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_sharding_"))
    try:
        root = tmp / "mmfr"
        t0 = time.perf_counter()
        s = generate_mmfr(root, args.train_images, args.eval_per_generator, seed=0, image_size=args.image_size)
        gen_s = time.perf_counter() - t0
        files = [f for f in root.rglob("*") if f.is_file()]
        images = [f for f in files if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
        img_mb = sum(f.stat().st_size for f in images) / 1e6
        all_mb = sum(f.stat().st_size for f in files) / 1e6
        for f in files:  # warm the page cache so that both sides read from memory
            f.read_bytes()
        print(f"synthetic MMFR: {len(images)} images, {img_mb:.1f} MB of images ({all_mb:.1f} MB with "
              f"annotations), generated in {gen_s:.1f} s (seed 0, image size {args.image_size})")
        assert len(images) >= 2000 or args.train_images + 10 * args.eval_per_generator < 2000, s

        tar_s = _timed(["tar", "-cf", str(tmp / "baseline.tar"), "-C", str(root), "."], args.repeats)
        results = {}
        for w in (1, 2):
            out = tmp / f"out{w}"
            cmd = [sys.executable, "-m", "sharding.shard_mmfr", str(root), str(out), "--workers", str(w),
                   "--no-progress"]
            results[w] = _timed(cmd, args.repeats, before=lambda o=out: shutil.rmtree(o, ignore_errors=True))
        out_f = tmp / "out_fsync"
        fsync_s = _timed([sys.executable, "-m", "sharding.shard_mmfr", str(root), str(out_f), "--workers", "2",
                          "--no-progress", "--fsync"], 1,
                         before=lambda: shutil.rmtree(out_f, ignore_errors=True))

        n = len(images)
        print(f"{'run':<34} {'wall s':>8} {'images/s':>10} {'MB/s':>8} {'x tar':>7}")
        print(f"{'tar -cf (baseline)':<34} {tar_s:>8.3f} {n / tar_s:>10.0f} {img_mb / tar_s:>8.1f} {1:>7.2f}")
        for w, sec in results.items():
            print(f"{f'sharder, {w} worker(s), validation on':<34} {sec:>8.3f} {n / sec:>10.0f} "
                  f"{img_mb / sec:>8.1f} {sec / tar_s:>7.2f}")
        print(f"{'sharder, 2 workers, --fsync':<34} {fsync_s:>8.3f} {n / fsync_s:>10.0f} "
              f"{img_mb / fsync_s:>8.1f} {fsync_s / tar_s:>7.2f}")
        best = min(results.values())
        identical = _same_tree(tmp / "out1", tmp / "out2")
        print(f"goal sharder <= 1.5 x tar: {'MET' if best <= 1.5 * tar_s else 'NOT MET'} "
              f"(best {best / tar_s:.2f}x)")
        print(f"goal 2 workers faster than 1: {'MET' if results[2] < results[1] else 'NOT MET'} "
              f"({results[1] / results[2]:.2f}x speed-up)")
        print(f"1- and 2-worker outputs byte-identical: {identical}")
        print(f"CPUs: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.2f}")
        return 0 if identical else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
