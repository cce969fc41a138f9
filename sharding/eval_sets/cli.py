"""`python -m sharding.eval_sets NAME SRC OUT`: shard one benchmark for evaluation."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..images import LEVELS
from ..manifest import SHARDER_VERSION, dumps, write_atomic
from ..shard_mmfr import _positive, add_size_arguments, parse_size, print_summary
from ..shard_set import OptionsMismatch, OutputLocked, ShardOptions
from ..tar_writer import StrictError
from .common import BenchmarkScan, write_benchmark
from .folder import scan_folder
from .listing import scan_listing
from .loki import scan_loki
from .parquet import scan_parquet
from .registry import ADAPTERS, BENCHMARKS, Benchmark
from .video import GENERATOR_RULES, scan_video


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sharding.eval_sets",
        description="Turn a benchmark's layout into evaluation shard sets OUT/<generator>/shard-*.tar "
                    "(+ manifest.json, sizes.json) in the MMFR sample schema, detection-only when the "
                    "benchmark has no reference reasoning. Evaluate with "
                    "`launch/eval.py --benchmark NAME=OUT`.",
        epilog="Benchmarks: " + "; ".join(f"{b.name} ({b.adapter})" for b in BENCHMARKS.values())
               + ". Use --list for their layouts. Exit status: 0 done (bad inputs skipped and listed in "
                 "the manifests), 1 bad input under --strict, 2 usage error.")
    p.add_argument("name", metavar="NAME", nargs="?",
                   help=f"a benchmark ({', '.join(BENCHMARKS)}) or an adapter ({', '.join(ADAPTERS)}) "
                        "for any other dataset")
    p.add_argument("src", metavar="SRC", nargs="?", help="the benchmark's folder (or file, see --list)")
    p.add_argument("out_dir", metavar="OUT", nargs="?", help="output folder (created; reused to resume)")
    p.add_argument("--list", action="store_true", help="print the registered benchmarks and their layouts")
    p.add_argument("--preset", help="a benchmark's named option set (see --list; e.g. ffpp's c40, the LQ level)")
    p.add_argument("--set-name", help="name recorded as the samples' source and used in reports "
                                      "(default: the benchmark name, or SRC's folder name for an adapter)")
    g = p.add_argument_group("folder adapter")
    g.add_argument("--single-set", action="store_true", default=None,
                   help="one report group for the whole benchmark (ignore generator folders)")
    g.add_argument("--skip-dir", action="append", dest="skip_dirs", help="folder name to skip (repeatable)")
    g.add_argument("--real-dir", action="append", dest="real_dirs",
                   help="folder name (directly below SRC) that holds reals and is its own report group, "
                        "e.g. a renamed RAISE folder of bfree (repeatable)")
    g = p.add_argument_group("parquet adapter")
    g.add_argument("--image-column", help="column of encoded image bytes (default: image/image_data/img/bytes)")
    g.add_argument("--label-column", help="column of labels, 0/1 or real/fake (default: label)")
    g.add_argument("--generator-column", help="column to group the report by (default: none, one group)")
    g = p.add_argument_group("video adapter")
    g.add_argument("--fps", type=float, help="frames sampled per second of video (default 1.0)")
    g.add_argument("--max-frames", type=_positive, help="frames per video at most (default 16)")
    g.add_argument("--video-generator", choices=GENERATOR_RULES,
                   help="how report groups are named: one group, first folder, or the folder below the label folder")
    g.add_argument("--include", action="append", help="fnmatch pattern a video's relpath must match (repeatable)")
    g.add_argument("--video-list", help="text file whose lines end with the relpaths of the videos to use")
    g.add_argument("--pairs-list", help="FaceForensics++ split file (JSON list of [a, b] id pairs) whose videos "
                                        "to use (ffpp: SRC/splits/test.json or SRC/test.json when present)")
    g = p.add_argument_group("writing")
    g.add_argument("--workers", type=_positive, default=min(4, os.cpu_count() or 1),
                   help="writer processes (and frame extractors); does not change the output")
    g.add_argument("--max-samples-per-shard", type=_positive, default=1000, help="default 1000")
    g.add_argument("--max-bytes-per-shard", type=parse_size, default=parse_size("1G"), help="default 1G")
    g.add_argument("--validation", choices=LEVELS, default="structure", help="image checks (see shard_mmfr)")
    add_size_arguments(g)
    g.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _pick(cli: Any, default: Any) -> Any:
    return default if cli is None else cli


# What each adapter's runner returns: the scan and the options it used (recorded in the manifests).
_Scanned = tuple[BenchmarkScan, dict[str, Any]]


def _given(**options: Any) -> dict[str, Any]:
    """The options that are set: options added after OUTs were written stay out of their recorded
    arguments at their defaults, so such an OUT still resumes instead of failing as 'other options'."""
    return {k: v for k, v in options.items() if v not in (None, {}, ())}


def _auto_file(src: str, names: Any) -> str | None:
    """The first of a benchmark's conventional side files (name or tuple of names) present under src."""
    for name in (names,) if isinstance(names, str) else tuple(names or ()):
        if os.path.isfile(os.path.join(src, name)):
            return os.path.join(src, name)
    return None


def _scan_folder(args: argparse.Namespace, src: str, name: str, o: dict[str, Any]) -> _Scanned:
    groups = {**o.get("group_labels", {}), **{d: 0 for d in args.real_dirs or ()}}
    opts = {"generator_level": False if args.single_set else o.get("generator_level", True),
            "skip_dirs": list(_pick(args.skip_dirs, o.get("skip_dirs", ()))),
            **_given(group_labels=groups, default_label=o.get("default_label"))}
    return scan_folder(src, name, **opts), opts


def _scan_manifest(args: argparse.Namespace, src: str, name: str, o: dict[str, Any]) -> _Scanned:
    listing = os.path.join(src, o["listing_name"]) if os.path.isdir(src) and o.get("listing_name") else src
    opts = _given(path_column=o.get("path_column"), md5_column=o.get("md5_column"))
    return scan_listing(listing, name, **opts), {**opts, **_given(listing=listing if listing != src else None)}


def _scan_parquet(args: argparse.Namespace, src: str, name: str, o: dict[str, Any]) -> _Scanned:
    opts = {"image_column": _pick(args.image_column, o.get("image_column")),
            "label_column": _pick(args.label_column, o.get("label_column", "label")),
            "generator_column": _pick(args.generator_column, o.get("generator_column"))}
    return scan_parquet(src, name, args.out_dir, **opts), opts


def _scan_video(args: argparse.Namespace, src: str, name: str, o: dict[str, Any]) -> _Scanned:
    video_list, pairs_list = args.video_list, args.pairs_list
    if video_list is None and pairs_list is None:  # a given list replaces the benchmark's own
        video_list, pairs_list = _auto_file(src, o.get("auto_list")), _auto_file(src, o.get("auto_pairs"))
    opts = {"fps": _pick(args.fps, 1.0), "max_frames": _pick(args.max_frames, 16),
            "generator": _pick(args.video_generator, o.get("generator", "benchmark")),
            "include": list(_pick(args.include, o.get("include", ()))),
            "video_list": os.path.abspath(video_list) if video_list else None,
            **_given(pairs_list=os.path.abspath(pairs_list) if pairs_list else None)}
    return scan_video(src, name, args.out_dir, workers=args.workers, progress=not args.no_progress, **opts), opts


def _scan_loki(args: argparse.Namespace, src: str, name: str, o: dict[str, Any]) -> _Scanned:
    return scan_loki(src, name), {}


_SCANS = {"folder": _scan_folder, "manifest": _scan_manifest, "parquet": _scan_parquet, "video": _scan_video,
          "loki": _scan_loki}


def scan(args: argparse.Namespace) -> _Scanned:
    """Run the adapter; returns the scan and the adapter options used (recorded in manifests)."""
    spec = BENCHMARKS.get(args.name)
    adapter = spec.adapter if spec else args.name
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown benchmark or adapter {args.name!r}; known: "
                         f"{', '.join(list(BENCHMARKS) + list(ADAPTERS))}")
    if args.preset and not spec:
        raise ValueError(f"--preset needs a benchmark name, not the adapter {args.name!r}")
    o = spec.resolved_options(args.preset) if spec else {}
    src = os.path.abspath(args.src)
    name = args.set_name or (spec.name if spec else os.path.basename(src.rstrip(os.sep)).rsplit(".", 1)[0])
    result, opts = _SCANS[adapter](args, src, name, o)
    return result, {**opts, "preset": args.preset} if args.preset else opts


def describe(b: Benchmark) -> str:
    """One benchmark's --list entry: name, adapter, layout, presets, where the layout was read."""
    lines = [f"{b.name}  [{b.adapter}]", f"    {b.layout}"]
    for pname, preset in b.presets.items():
        default = " (default)" if pname == b.default_preset else ""
        lines.append(f"    --preset {pname}{default}: {preset.doc}")
    if b.reference:
        lines.append(f"    layout read from {b.reference}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(describe(b) for b in BENCHMARKS.values()))
        return 0
    if not (args.name and args.src and args.out_dir):
        parser.error("NAME, SRC and OUT are required (or --list)")
    wopts = ShardOptions(max_samples_per_shard=args.max_samples_per_shard,
                         max_bytes_per_shard=args.max_bytes_per_shard, interleave=True,
                         max_side=args.max_side, max_aspect_ratio=args.max_aspect_ratio,
                         validation=args.validation, strict=args.strict, workers=args.workers,
                         progress=not args.no_progress)
    try:
        result, adapter_opts = scan(args)
        bad = [r for rs in result.rejected.values() for r in rs if r.kind == "image"]
        if args.strict and bad:
            raise StrictError(f"{bad[0].path}: {bad[0].reason}: {bad[0].detail}")
        arguments = {"command": "sharding.eval_sets", "benchmark": args.name, "set_name": result.benchmark,
                     "src": os.path.abspath(args.src), "adapter_options": adapter_opts,
                     **wopts.output_arguments()}
        summary = write_benchmark(result, args.out_dir, wopts, arguments)
    except StrictError as exc:
        print(f"error (--strict): {exc}", file=sys.stderr)
        return 1
    except (OptionsMismatch, OutputLocked, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overview = {"sharder_version": SHARDER_VERSION, "benchmark": result.benchmark, "arguments": arguments,
                "sets": {n: {"generator": next(iter(m["counts"]["by_generator"]), n), "inputs": m["inputs"],
                             "totals": m["totals"]} for n, m in summary.manifests.items()},
                "other_files": [r.to_dict() for r in result.other_files], "selection": result.selection}
    write_atomic(os.path.join(args.out_dir, "benchmark.json"), dumps(overview))
    if result.selection:
        print("selection: " + ", ".join(f"{k} {v}" for k, v in result.selection.items()))
    print_summary(summary, out=sys.stdout)
    return 0
