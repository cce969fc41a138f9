"""What every benchmark adapter shares: sample metadata, the scan result, staging
of bytes that do not exist as files, and writing through `shard_set`.

An adapter turns a benchmark layout into a `BenchmarkScan`: candidate samples
grouped by generator plus the inputs it rejected. `write_benchmark` then writes
one evaluation shard set per generator, `OUT/<generator>/shard-*.tar` with
`manifest.json` and `sizes.json`, with the same writer, schema, validation,
determinism and resumption as the MMFR sharder. The evaluation stage reads
such an OUT exactly like MMFR's `OUT/eval`.

Samples whose bytes are not files on disk (rows of a parquet file, frames of a
video) are staged as files under `OUT/.staging/` first, so that the writer
workers read them like any image and nothing holds a whole benchmark in memory;
the staging folder is removed after a successful run.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from .. import schema
from ..shard_set import RunSummary, SetSpec, ShardOptions, write_shard_sets
from ..tar_writer import Rejection, ShardSample

STAGING_DIR = ".staging"

# Folder names that give the label, compared case-insensitively: the MMFR /
# CNNSpot names, plain names, and GenImage's.
LABEL_FOLDERS: dict[str, int] = {**schema.EVAL_LABEL_FOLDERS, "real": 0, "fake": 1, "nature": 0, "ai": 1}

_UNSAFE_SET = re.compile(r"[^A-Za-z0-9_.+-]+")


def set_dir_name(generator: str) -> str:
    """Directory name of a generator's shard set (generator names may hold '/', e.g. hub model ids)."""
    name = _UNSAFE_SET.sub("__", generator).strip("._") or "unnamed"
    return name


def ext_of(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def eval_metadata(relpath: str, benchmark: str, generator: str, label: int,
                  reference: str = "", attributes: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Metadata of one benchmark image (the writer adds the byte-derived fields).

    `source` is the benchmark name; `generator` the group it is reported under.
    A benchmark without reasoning is detection-only: reference "" and
    has_reasoning False, so the text metrics skip it. A free-text reference
    (manifest adapter) has attributes None but has_reasoning True.
    """
    if attributes is not None:
        reference = schema.reference_text(attributes)
    return {
        "relpath": relpath, "source": benchmark, "split": "eval", "label": int(label),
        "generator": generator, "conversations": [], "record_ids": [], "attributes": attributes,
        "reference": reference, "has_reasoning": bool(reference) or attributes is not None,
    }


@dataclass
class BenchmarkScan:
    """Candidate samples per generator and the inputs that were not kept."""

    benchmark: str  # name recorded as `source` in every sample
    samples: dict[str, list[ShardSample]] = field(default_factory=dict)  # generator -> samples
    rejected: dict[str, list[Rejection]] = field(default_factory=dict)  # generator -> rejections
    staged: str | None = None  # staging folder to remove after writing
    other_files: list[Rejection] = field(default_factory=list)  # rejected files outside any shard set
    # What the adapter selected (e.g. videos kept / not in the official split),
    # written to OUT/benchmark.json as "selection" and printed by the CLI.
    selection: dict[str, Any] = field(default_factory=dict)

    def add(self, relpath: str, generator: str, label: int, *, path: str, size: int, fingerprint: str,
            reference: str = "", attributes: dict[str, str | None] | None = None) -> None:
        meta = eval_metadata(relpath, self.benchmark, generator, label, reference, attributes)
        self.samples.setdefault(generator, []).append(ShardSample(
            key=schema.sample_key(relpath), relpath=relpath, path=path, metadata=meta, size=size,
            fingerprint=fingerprint))

    def reject(self, generator: str, relpath: str, reason: str, detail: str = "", kind: str = "image") -> None:
        self.rejected.setdefault(generator, []).append(Rejection(relpath, reason, detail, kind))

    def count(self) -> tuple[int, int]:
        """(candidate samples, rejected images)."""
        return (sum(len(v) for v in self.samples.values()),
                sum(1 for v in self.rejected.values() for r in v if r.kind == "image"))


def walk_files(src: str) -> list[str]:
    """Relative paths ("/"-separated, sorted walk) of every file under src.

    Symlinked folders are followed (datasets are often assembled from links),
    but each real folder is entered once, so a link cycle cannot hang the scan.
    """
    files: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, src).replace(os.sep, "/")
        files.extend(n if rel_dir == "." else f"{rel_dir}/{n}" for n in sorted(filenames))
    return files


def stage_bytes(out_dir: str, relpath: str, data: bytes) -> str:
    """Write `data` to OUT/.staging/<relpath> and return the path."""
    path = os.path.join(out_dir, STAGING_DIR, *relpath.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def check_duplicate_keys(scan: BenchmarkScan) -> None:
    """Two relpaths that give the same key would overwrite each other in a reader."""
    seen: dict[str, str] = {}
    for samples in scan.samples.values():
        for s in samples:
            if s.key in seen and seen[s.key] != s.relpath:
                raise ValueError(f"{s.relpath} and {seen[s.key]} map to the same sample key {s.key}")
            seen[s.key] = s.relpath


def write_benchmark(scan: BenchmarkScan, out_dir: str, opts: ShardOptions,
                    arguments: dict[str, Any]) -> RunSummary:
    """Write one shard set per generator under out_dir; see the module doc."""
    check_duplicate_keys(scan)
    sets: dict[str, SetSpec] = {}
    names: dict[str, str] = {}
    for gen in sorted(set(scan.samples) | set(scan.rejected)):
        if not scan.samples.get(gen) and all(r.kind != "image" for r in scan.rejected.get(gen, [])):
            # Only non-image files (a README next to the generator folders):
            # no shard set for them; they are listed in benchmark.json instead.
            scan.other_files.extend(scan.rejected.get(gen, []))
            continue
        d = set_dir_name(gen)
        if d in names and names[d] != gen:
            raise ValueError(f"generators {names[d]!r} and {gen!r} map to the same folder {d!r}")
        names[d] = gen
        sets[d] = SetSpec(scan.samples.get(gen, []), scan.rejected.get(gen, []))
    if not sets:
        raise FileNotFoundError(f"{arguments.get('src')}: no image found for benchmark {scan.benchmark!r}")
    summary = write_shard_sets(sets, out_dir, opts, arguments)
    if scan.staged and os.path.isdir(scan.staged):
        shutil.rmtree(scan.staged)
    return summary
