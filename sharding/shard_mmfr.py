"""Command line: shard a released MMFR dataset into WebDataset tar shard sets.

    python -m sharding.shard_mmfr MMFR_ROOT OUT_DIR [--workers N] ...

writes OUT_DIR/train/ and OUT_DIR/eval/<generator>/, each with
shard-NNNNNN.tar, manifest.json and sizes.json, and prints a summary. See
`--help`, `shard_set.py` (determinism, resumption) and `mmfr.py` (input rules).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from typing import Sequence

from .images import LEVELS
from .manifest import SHARDER_VERSION, dumps, write_atomic
from .mmfr import scan_mmfr
from .shard_set import OptionsMismatch, OutputLocked, RunSummary, SetSpec, ShardOptions, write_shard_sets
from .tar_writer import StrictError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_size(text: str) -> int:
    """'1G', '500M', '64k', '12345' -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1G, 500M, 1048576)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _ratio(text: str) -> float:
    v = float(text)
    if not v >= 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def add_size_arguments(p) -> None:
    """--max-side and --max-aspect-ratio (shared with sharding.eval_sets)."""
    p.add_argument("--max-side", type=_positive, default=ShardOptions.max_side,
                   help="reject images whose longest side is above this many pixels "
                        f"(default {ShardOptions.max_side}, data.max_image_side of the loaders)")
    p.add_argument("--max-aspect-ratio", type=_ratio, default=ShardOptions.max_aspect_ratio,
                   help="reject images whose longer side is more than this many times the shorter "
                        f"(default {ShardOptions.max_aspect_ratio:g}; a 1 KB PNG can declare 1000000x1 pixels)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sharding.shard_mmfr",
        description="Shard a released MMFR dataset (diffusiondb/, laion/, evaluation_sets/, "
                    "forgery_reasoning_cot.json) into WebDataset tar shards: OUT_DIR/train/ and "
                    "OUT_DIR/eval/<generator>/, each with manifest.json and sizes.json. Image bytes "
                    "are stored unchanged; output is byte-identical for the same input and options "
                    "whatever --workers is; after a crash, rerun the same command to resume.",
        epilog="Exit status: 0 done (bad inputs skipped and listed), 1 error in the input under "
               "--strict, 2 usage error (bad root, OUT_DIR written with other options, or in use).")
    p.add_argument("mmfr_root", metavar="MMFR_ROOT", help="root folder of the MMFR dataset")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created; reused to resume)")
    p.add_argument("--workers", type=_positive, default=min(4, os.cpu_count() or 1),
                   help="writer processes, each writing whole shards (default: min(4, CPUs)); "
                        "does not change the output")
    p.add_argument("--max-samples-per-shard", type=_positive, default=1000,
                   help="samples per shard at most (default 1000)")
    p.add_argument("--max-bytes-per-shard", type=parse_size, default=parse_size("1G"),
                   help="estimated shard size at most, e.g. 500M, 1G (default 1G)")
    p.add_argument("--plan-ranks", type=_positive, default=1,
                   help="ranks (nodes x GPUs) of the biggest job that will read the shards; "
                        "warns when a shard set has fewer shards than ranks x workers")
    p.add_argument("--plan-workers", type=_positive, default=1,
                   help="data loader workers per rank of that job (see --plan-ranks)")
    p.add_argument("--seed", type=int, default=0, help="seed of the real/fake interleaving (default 0)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad input with a message naming it (default: skip, count "
                        "and list bad inputs in the manifests)")
    p.add_argument("--max-pixels", type=_positive, default=ShardOptions.max_pixels,
                   help=f"reject images with more pixels than this (default {ShardOptions.max_pixels})")
    add_size_arguments(p)
    p.add_argument("--validation", choices=LEVELS, default="structure",
                   help="image checks: 'structure' walks PNG chunks (CRC) and JPEG markers and fully "
                        "decodes other formats (default); 'decode' fully decodes everything (slow); "
                        "'header' only parses headers (misses truncation)")
    p.add_argument("--fsync", action="store_true",
                   help="fsync every shard before recording it done (survives power loss; slower). "
                        "Without it a kill -9 is still safe: shards appear by atomic rename and a "
                        "rerun re-hashes them against their records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def print_summary(summary: RunSummary, out=sys.stdout) -> None:
    reasons: Counter = Counter()
    rows = []
    tot_w = tot_r = tot_s = tot_b = 0
    for name, m in summary.manifests.items():
        inp, t = m["inputs"], m["totals"]
        reasons.update(m["rejected_by_reason"])
        rows.append(f"  {name:<24} {inp['written']:>8} {inp['rejected']:>8} {t['shards']:>7} {t['bytes'] / 1e6:>10.1f}")
        tot_w += inp["written"]
        tot_r += inp["rejected"]
        tot_s += t["shards"]
        tot_b += t["bytes"]
    print(f"  {'shard set':<24} {'written':>8} {'rejected':>8} {'shards':>7} {'MB':>10}", file=out)
    print("\n".join(rows), file=out)
    print(f"  {'total':<24} {tot_w:>8} {tot_r:>8} {tot_s:>7} {tot_b / 1e6:>10.1f}", file=out)
    if reasons:
        print("rejected or flagged inputs by reason (images, annotations, files; "
              "each is listed in its manifest):", file=out)
        for reason, n in sorted(reasons.items()):
            print(f"  {reason:<24} {n}", file=out)
    print(f"{summary.shards_written} shard(s) written, {summary.shards_reused} already complete; "
          f"{summary.seconds:.2f} s, {tot_w / max(summary.seconds, 1e-9):.0f} images/s", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ShardOptions(
        max_samples_per_shard=args.max_samples_per_shard, max_bytes_per_shard=args.max_bytes_per_shard,
        seed=args.seed, max_pixels=args.max_pixels, max_side=args.max_side,
        max_aspect_ratio=args.max_aspect_ratio, validation=args.validation, strict=args.strict,
        plan_ranks=args.plan_ranks, plan_workers=args.plan_workers, workers=args.workers,
        progress=not args.no_progress, fsync=args.fsync)
    root = os.path.abspath(args.mmfr_root)
    arguments = {"command": "sharding.shard_mmfr", "mmfr_root": root, **opts.output_arguments()}
    try:
        scan = scan_mmfr(root, strict=args.strict)
        sets = {name: SetSpec(samples, scan.rejected.get(name, [])) for name, samples in scan.samples.items()}
        for name, rej in scan.rejected.items():  # sets holding only rejections still get a manifest
            sets.setdefault(name, SetSpec([], rej))
        summary = write_shard_sets(sets, args.out_dir, opts, arguments)
    except StrictError as exc:
        print(f"error (--strict): {exc}", file=sys.stderr)
        return 1
    except (OptionsMismatch, OutputLocked, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for m in summary.manifests.values():
        for w in m["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    overview = {"sharder_version": SHARDER_VERSION, "arguments": arguments,
                "sets": {n: {"inputs": m["inputs"], "totals": m["totals"],
                             "rejected_by_reason": m["rejected_by_reason"]}
                         for n, m in summary.manifests.items()}}
    # Like the manifests, forced to disk only under --fsync.
    write_atomic(os.path.join(args.out_dir, "summary.json"), dumps(overview), opts.fsync)
    print(f"sharded {root} -> {os.path.abspath(args.out_dir)}")
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
