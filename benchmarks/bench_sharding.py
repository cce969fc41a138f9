"""Benchmark: the MMFR sharder against `tar -cf` of the same files.

    .venv/bin/python benchmarks/bench_sharding.py [--image-size 128 512] [--repeats 3]
        [--train-images 1600] [--eval-per-generator 40]
        [--large-train-images 200] [--large-eval-per-generator 4] [--gen-workers N]

Builds one synthetic MMFR per --image-size in a temporary folder: the first
(default 128 px, ~17 KB images) with --train-images + 10 x --eval-per-generator
images (>= 2,000 by default), each further one (default 512 px: PNG fakes of
~0.45 MB like DiffusionDB's; the synthetic JPEG reals stay ~30 KB, smaller than
LAION's ~0.1 MB) with --large-train-images +
10 x --large-eval-per-generator images, as generating big images is slow.
For each dataset it warms the page cache, then times, in the same run and with
the same files: `tar -cf` of the dataset root (the baseline), and the sharder
CLI (`python -m sharding.shard_mmfr`, image validation on, default options)
with 1 and 2 workers. The three commands take turns, --repeats rounds, and the
best wall time of each is kept (wall time of the whole command, interpreter
start-up included; every sharder run writes into a fresh output folder). One
run with --fsync follows, and --repeats runs without a bytecode cache.

Bytecode: like any installed package, the sharder normally runs from cached
.pyc files. This machine's environment sets PYTHONDONTWRITEBYTECODE=1, which
would make every run recompile the sharder's modules (~0.1 s of the wall time
here), so the timed runs use a bytecode cache in the temporary folder
(PYTHONPYCACHEPREFIX; nothing is written into the checkout), filled by one
untimed run per dataset. The row "no .pyc (compiles)" shows the same command
with PYTHONDONTWRITEBYTECODE=1 and no cache, as measured before this option. Prints one table for all sizes: images/s, MB/s
(image bytes) and the ratio to tar, then checks the goals per size: sharder
wall time <= 1.5 x tar, 2 workers faster than 1, and byte-identical output for
every sharder run of a dataset (the exit status is 1 if outputs differ).
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _run(cmd: list[str], before=None, env=None) -> float:
    if before:
        before()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=env)
    return time.perf_counter() - t0


def _env(pycache: Path | None) -> dict[str, str]:
    """The sharder's environment: with a bytecode cache under `pycache`, or none at all."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b, ignore=[".sharder", "summary.json"])

    def walk(c) -> bool:
        if c.left_only or c.right_only or c.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        return not mismatch and not errors and all(walk(s) for s in c.subdirs.values())
    return walk(cmp)


def bench_size(tmp: Path, size: int, train: int, per_gen: int, args) -> dict:
    """Generate one dataset and time tar and the sharder on it; returns the figures."""
    root = tmp / f"mmfr{size}"
    t0 = time.perf_counter()
    generate_mmfr(root, train, per_gen, seed=0, image_size=size, workers=args.gen_workers)
    gen_s = time.perf_counter() - t0
    files = [f for f in root.rglob("*") if f.is_file()]
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    img_mb = sum(f.stat().st_size for f in images) / 1e6
    all_mb = sum(f.stat().st_size for f in files) / 1e6
    for f in files:  # warm the page cache so that both sides read from memory
        f.read_bytes()
    print(f"synthetic MMFR at {size} px: {len(images)} images, {img_mb:.1f} MB of images "
          f"({all_mb:.1f} MB with annotations, mean image {img_mb / len(images) * 1e3:.0f} KB), "
          f"generated in {gen_s:.1f} s", flush=True)

    def sharder(out: Path, workers: int, *extra: str) -> tuple[list[str], object]:
        cmd = [sys.executable, "-m", "sharding.shard_mmfr", str(root), str(out), "--workers", str(workers),
               "--no-progress", *extra]
        return cmd, (lambda: shutil.rmtree(out, ignore_errors=True))

    cached, uncached = _env(tmp / "pycache"), _env(None)
    _run(*sharder(tmp / f"out{size}_warm", 1), env=cached)  # untimed: fills the bytecode cache
    runs = {"tar": (["tar", "-cf", str(tmp / "baseline.tar"), "-C", str(root), "."], None, None),
            1: (*sharder(tmp / f"out{size}_1", 1), cached), 2: (*sharder(tmp / f"out{size}_2", 2), cached),
            "nopyc": (*sharder(tmp / f"out{size}_nopyc", 2), uncached)}
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):  # taking turns: a burst of load hits all of them alike
        for k, (cmd, before, env) in runs.items():
            best[k] = min(best[k], _run(cmd, before, env))
    cmd, before = sharder(tmp / f"out{size}_fsync", 2, "--fsync")
    fsync_s = _run(cmd, before, cached)
    identical = all(_same_tree(tmp / f"out{size}_1", tmp / f"out{size}_{k}") for k in ("2", "nopyc", "fsync"))
    for k in ("warm", "1", "2", "nopyc", "fsync"):  # keep the disk use of the temporary folder small
        shutil.rmtree(tmp / f"out{size}_{k}", ignore_errors=True)
    return {"size": size, "n": len(images), "mb": img_mb, "tar": best["tar"], 1: best[1], 2: best[2],
            "fsync": fsync_s, "nopyc": best["nopyc"], "identical": identical}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, nargs="+", default=[128, 512],
                   help="base side(s) of the synthetic images, one dataset each (default: 128 512)")
    p.add_argument("--train-images", type=int, default=1600, help="training images at the first size")
    p.add_argument("--eval-per-generator", type=int, default=40,
                   help="evaluation images per generator at the first size (even)")
    p.add_argument("--large-train-images", type=int, default=200, help="training images at further sizes")
    p.add_argument("--large-eval-per-generator", type=int, default=4,
                   help="evaluation images per generator at further sizes (even)")
    p.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1,
                   help="processes generating the synthetic images (does not change them)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_sharding_"))
    try:
        rows = []
        for i, size in enumerate(args.image_size):
            train, per_gen = ((args.train_images, args.eval_per_generator) if i == 0
                              else (args.large_train_images, args.large_eval_per_generator))
            rows.append(bench_size(tmp, size, train, per_gen, args))
        assert rows[0]["n"] >= 2000 or args.train_images + 10 * args.eval_per_generator < 2000, rows[0]

        print(f"{'size':>5} {'images':>6} {'run':<38} {'wall s':>8} {'images/s':>10} {'MB/s':>8} {'x tar':>7}")
        for r in rows:
            lead = f"{r['size']:>5} {r['n']:>6}"
            print(f"{lead} {'tar -cf (baseline)':<38} {r['tar']:>8.3f} {r['n'] / r['tar']:>10.0f} "
                  f"{r['mb'] / r['tar']:>8.1f} {1:>7.2f}")
            for name, sec in (("sharder, 1 worker, validation on", r[1]),
                              ("sharder, 2 workers, validation on", r[2]),
                              ("sharder, 2 workers, --fsync", r["fsync"]),
                              ("sharder, 2 workers, no .pyc (compiles)", r["nopyc"])):
                print(f"{lead} {name:<38} {sec:>8.3f} {r['n'] / sec:>10.0f} {r['mb'] / sec:>8.1f} "
                      f"{sec / r['tar']:>7.2f}")
        for r in rows:
            best = min(r[1], r[2])
            print(f"{r['size']} px: goal sharder <= 1.5 x tar: {'MET' if best <= 1.5 * r['tar'] else 'NOT MET'} "
                  f"(best {best / r['tar']:.2f}x); goal 2 workers faster than 1: "
                  f"{'MET' if r[2] < r[1] else 'NOT MET'} ({r[1] / r[2]:.2f}x speed-up); "
                  f"outputs of all runs byte-identical: {r['identical']}")
        print(f"CPUs: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.2f} "
              f"(best of {args.repeats}; wall times on a shared machine)")
        return 0 if all(r["identical"] for r in rows) else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
