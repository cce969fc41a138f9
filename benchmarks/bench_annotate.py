"""Benchmark: peak memory of `fakereasoning-annotate requests` for 10,000 small
images against 1,000 (the baseline, measured in the same run).

    .venv/bin/python benchmarks/bench_annotate.py [--sizes 1000 10000] [--image-size 32] [--work-dir DIR]

Writes one folder of distinct small PNGs per size (reused when --work-dir
already holds it), then runs `python -m sharding.annotate requests` on each in
a fresh interpreter and reads two peaks from that process: the peak resident
set size (ru_maxrss: interpreter, Pillow, numpy and everything allocated) and
the peak of Python allocations after start-up (tracemalloc, which sees the
growth directly). Streaming means both stay flat: the goal is a ratio of the
10,000-image peak to the 1,000-image peak near 1 (<= 1.25 for RSS), not 10.
For contrast the same run measures what holding every request in memory
before writing (the habit this command avoids) would take for the same
folders. Results: benchmarks/results/bench_annotate.{json,md}.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench_common import write_results  # noqa: E402 - the script's own folder is on sys.path

# Runs in the child: the command's own main(), then its peaks as one JSON line on stderr.
CHILD = r"""
import json, resource, sys, tracemalloc
tracemalloc.start()
from sharding.annotate.cli import main
tracemalloc.reset_peak()
base = tracemalloc.get_traced_memory()[0]
mode, args = sys.argv[1], sys.argv[2:]
if mode == "command":
    rc = main(args)
else:  # the habit avoided: every request built and held before anything is written
    import base64, os
    from sharding.annotate.prompts import load_prompts
    prompt, held = load_prompts().fake, []
    for name in sorted(os.listdir(args[0])):
        with open(os.path.join(args[0], name), "rb") as fh:
            held.append(json.dumps({"custom_id": name, "body": {"text": prompt, "url": "data:image/png;base64,"
                                    + base64.b64encode(fh.read()).decode()}}))
    rc = 0
peak = tracemalloc.get_traced_memory()[1] - base
sys.stderr.write(json.dumps({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                             "traced_peak_bytes": peak}) + "\n")
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000],
                   help="folder sizes; the first is the baseline (default 1000 10000)")
    p.add_argument("--image-size", type=int, default=32, help="side of the PNG images in pixels (default 32)")
    p.add_argument("--work-dir", default=None, help="image and output folder (default: a temporary one, removed)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bench_annotate"),
                   help="results prefix: writes <out>.md and <out>.json")
    return p.parse_args(argv)


def make_folder(folder: str, n: int, side: int) -> None:
    from PIL import Image

    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buf, "PNG")
        with open(os.path.join(folder, f"img{i:06d}.png"), "wb") as fh:
            fh.write(buf.getvalue())
    open(done, "w").close()


def measure(mode: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    res = json.loads(proc.stderr.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "maxrss_mib": round(res["maxrss_kib"] / 1024, 1),
            "traced_peak_mib": round(res["traced_peak_bytes"] / 2**20, 2)}


def render(results, args, machine) -> str:
    lines = ["# Peak memory of `fakereasoning-annotate requests`", "",
             f"Machine: {machine}. Images: distinct {args.image_size}x{args.image_size} PNGs. "
             f"Baseline: the {args.sizes[0]}-image folder, same run. "
             "RSS = peak resident set of the whole process; traced = peak of Python allocations "
             "after start-up (tracemalloc).", "",
             "| images | requests bytes | wall s | peak RSS MiB | RSS ratio | traced peak MiB | traced ratio | "
             "holding all: traced MiB |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['images']} | {r['request_bytes']} | {r['command']['wall_s']} | "
                     f"{r['command']['maxrss_mib']} | {r['rss_ratio']:.3f} | {r['command']['traced_peak_mib']} | "
                     f"{r['traced_ratio']:.3f} | {r['holding_all']['traced_peak_mib']} |")
    lines += ["", f"Goal: peak RSS ratio {args.sizes[-1]} / {args.sizes[0]} images <= 1.25: "
                  f"{'met' if results['goal_met'] else 'NOT met'} ({results['rows'][-1]['rss_ratio']:.3f}).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_annotate_")
    rows = []
    try:
        for n in args.sizes:
            folder = os.path.join(work, f"images_{n}")
            make_folder(folder, n, args.image_size)
            out = os.path.join(work, f"req_{n}")
            cmd = measure("command", ["requests", "--images", folder, "--label", "fake", "--generator", "bench",
                                      "--out", out, "--no-progress"])
            held = measure("holding_all", [folder])
            size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".jsonl"))
            rows.append({"images": n, "request_bytes": size, "command": cmd, "holding_all": held})
            print(f"{n} images: {cmd} (holding all in memory instead: {held})", flush=True)
    finally:
        if args.work_dir is None:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r["rss_ratio"] = r["command"]["maxrss_mib"] / rows[0]["command"]["maxrss_mib"]
        r["traced_ratio"] = r["command"]["traced_peak_mib"] / max(rows[0]["command"]["traced_peak_mib"], 1e-9)
    results = {"rows": rows, "goal_met": rows[-1]["rss_ratio"] <= 1.25}
    print(write_results(args.out, args, results, render))
    return 0 if results["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
