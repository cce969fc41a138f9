"""Shard discovery and per-shard sample counts.

The stream plans every epoch from the shard list and the per-shard sample
counts of the sharder's open_clip-style `sizes.json` ({"shard-000000.tar": n});
nothing has to be opened to know how many batches an epoch has or where a
resumed epoch continues.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from webdataset.shardlists import expand_urls

from common.atomic_files import plain_file_name

SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ShardSet:
    """An ordered list of shard URLs with their sample counts."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    source: str  # what the user gave (for error messages)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __len__(self) -> int:
        return len(self.urls)


def _is_remote(url: str) -> bool:
    return ":" in url.split("/", 1)[0] and not os.path.exists(url)


def _load_sizes(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            sizes = json.load(f)
    except FileNotFoundError:
        folder = os.path.dirname(path) or "."
        where = f"its folder {folder} does not exist" if not os.path.isdir(folder) else "no such file"
        raise FileNotFoundError(
            f"{path}: {where}; the loader needs the per-shard sample counts of sizes.json "
            "(written by sharding/shard_mmfr.py), or pass data.sizes_file"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(sizes, dict) or not sizes:
        raise ValueError(f"{path}: expected a non-empty object shard name -> sample count")
    for name, n in sizes.items():
        plain_file_name(name, path)  # joined to the folder: never "../x" or "/abs"
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{path}: count of {name!r} is {n!r}, expected an integer >= 0")
    return sizes


def discover_shards(spec: str, sizes_file: str | None = None) -> ShardSet:
    """Shards of a directory (all entries of its sizes.json) or of a brace pattern.

    Empty shards (count 0) are kept out of the list: they would give a worker
    nothing to read. Raises naming the path when a shard or a count is missing.
    """
    spec = spec.strip()
    if os.path.isdir(spec):
        sizes_path = sizes_file or os.path.join(spec, SIZES_FILE)
        sizes = _load_sizes(sizes_path)
        urls = [os.path.join(spec, name) for name in sorted(sizes)]
        counts = [sizes[name] for name in sorted(sizes)]
    else:
        if "{" not in spec and not _is_remote(spec) and not os.path.exists(spec):
            # Not a folder, not a pattern, not a shard: do not go looking for a sizes.json beside it.
            raise FileNotFoundError(f"data.train_shards={spec!r} does not exist (expected a shard set folder "
                                    f"with {SIZES_FILE}, or a brace pattern of .tar shards)")
        urls = expand_urls(spec)
        if not urls:
            raise ValueError(f"data.train_shards={spec!r}: the pattern expands to no shard")
        sizes_path = sizes_file or os.path.join(os.path.dirname(urls[0]), SIZES_FILE)
        if _is_remote(sizes_path):
            raise ValueError(
                f"data.train_shards={spec!r}: remote shards need data.sizes_file (a local sizes.json)"
            )
        sizes = _load_sizes(sizes_path)
        counts = []
        for url in urls:
            name = os.path.basename(url)
            if name not in sizes:
                raise ValueError(f"{sizes_path}: no count for shard {name!r} (from {spec!r})")
            counts.append(sizes[name])
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(
            f"{sizes_path} lists {len(missing)} shard(s) that do not exist, first: {missing[0]}"
        )
    kept = [(u, n) for u, n in zip(urls, counts) if n > 0]
    if not kept:
        raise ValueError(f"data.train_shards={spec!r}: every shard is empty according to {sizes_path}")
    return ShardSet(tuple(u for u, _ in kept), tuple(n for _, n in kept), spec)
