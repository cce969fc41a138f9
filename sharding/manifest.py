"""Per-shard-set `manifest.json` and open_clip-style `sizes.json`.

The manifest of a shard set lists every shard (samples, bytes, sha256), the
sample counts per split, generator, label and source, every rejected input
with its reason, the warnings of the run, and the sharder version and
arguments. It holds nothing that varies between runs (no timestamps, no
durations, no worker count), so it is byte-identical whenever the shards are.

The input reconciliation "images seen = written + rejected" is computed here
and asserted: a manifest that does not reconcile is never written.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Iterable, Sequence

from . import schema
from .tar_writer import Rejection, ShardResult

SHARDER_VERSION = "1.0.0"
MANIFEST = "manifest.json"
SIZES = "sizes.json"


class ReconciliationError(AssertionError):
    """Counts of a shard set do not add up; a bug, never bad input."""


def _merge_counts(results: Iterable[ShardResult]) -> dict[str, dict[str, int]]:
    merged: dict[str, Counter] = {}
    for r in results:
        for group, bucket in r.counts.items():
            merged.setdefault(group, Counter()).update(bucket)
    return {g: dict(sorted(c.items())) for g, c in sorted(merged.items())}


def build_manifest(set_name: str, results: Sequence[ShardResult], reader_rejections: Sequence[Rejection],
                   arguments: dict[str, Any], warnings: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest dict of one shard set; raises ReconciliationError if counts do not add up."""
    results = sorted(results, key=lambda r: r.index)
    rejected = [r.to_dict() for r in reader_rejections]
    for r in results:
        rejected.extend(r.rejected)
    rejected.sort(key=lambda d: (d["kind"], d["path"], d["reason"]))
    image_rejections = [d for d in rejected if d["kind"] == "image"]
    written = sum(r.samples for r in results)
    planned = sum(r.inputs for r in results)
    reader_images = sum(1 for r in reader_rejections if r.kind == "image")
    seen = planned + reader_images
    if seen != written + len(image_rejections):
        raise ReconciliationError(
            f"{set_name}: images seen {seen} != written {written} + rejected {len(image_rejections)}")
    for r in results:
        if r.inputs != r.samples + len(r.rejected):
            raise ReconciliationError(f"{set_name}/{r.name}: {r.inputs} inputs != "
                                      f"{r.samples} written + {len(r.rejected)} rejected")
    counts = _merge_counts(results)
    by_gen_label: dict[str, dict[str, int]] = {}
    for k, v in counts.pop("generator_label", {}).items():
        gen, label = k.rsplit(":", 1)
        by_gen_label.setdefault(gen, {})[label] = v
    return {
        "format": "webdataset",
        "sharder_version": SHARDER_VERSION,
        "schema": schema.SCHEMA_VERSION,
        "shard_set": set_name,
        "arguments": arguments,
        "shards": [{"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256}
                   for r in results],
        "totals": {"shards": len(results), "samples": written, "bytes": sum(r.bytes for r in results)},
        "counts": {
            "by_split": counts.get("split", {}),
            "by_generator": counts.get("generator", {}),
            "by_label": counts.get("label", {}),
            "by_source": counts.get("source", {}),
            "by_generator_label": dict(sorted(by_gen_label.items())),
        },
        "inputs": {"images_seen": seen, "written": written, "rejected": len(image_rejections)},
        "rejected_by_reason": dict(sorted(Counter(d["reason"] for d in rejected).items())),
        "rejected": rejected,
        "warnings": list(warnings),
    }


def sizes_of(manifest: dict[str, Any]) -> dict[str, int]:
    """open_clip-style sizes: shard file name -> number of samples."""
    return {s["name"]: s["samples"] for s in manifest["shards"]}


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8")


def write_atomic(path: str, data: bytes, fsync: bool = True) -> None:
    """Write a small file via temp (+ fsync) + rename, so it is either old or new."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(set_dir: str, manifest: dict[str, Any], fsync: bool = True) -> None:
    """Write manifest.json and sizes.json into a shard set directory."""
    write_atomic(os.path.join(set_dir, SIZES), dumps(sizes_of(manifest)), fsync)
    write_atomic(os.path.join(set_dir, MANIFEST), dumps(manifest), fsync)


def load_manifest(set_dir: str) -> dict[str, Any]:
    with open(os.path.join(set_dir, MANIFEST), encoding="utf-8") as fh:
        return json.load(fh)


def find_shard_sets(out_dir: str) -> list[str]:
    """Shard set directories (those holding a manifest.json) under out_dir, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if MANIFEST in filenames:
            found.append(dirpath)
    return sorted(found)
