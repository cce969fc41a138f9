"""Command line: check shard sets against their manifests.

    python -m sharding.verify OUT_DIR [--deep]

For every shard set under OUT_DIR (a folder with manifest.json), re-hashes
every shard listed in the manifest, compares its size, re-counts its samples
(each must have exactly one image member and one json member), checks
sizes.json, and reports shard files the manifest does not know. `--deep` also
parses every sample's json and checks the image bytes against its sha256 and
the required metadata fields. Exits 1 naming each bad shard, 0 if all is well.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
from typing import Sequence

from . import schema
from .manifest import SIZES, find_shard_sets, load_manifest, sizes_of


class _HashingReader:
    """File wrapper that hashes every byte tarfile reads (one pass per shard)."""

    def __init__(self, fh):
        self.fh, self.sha, self.pos = fh, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.fh.read(n)
        self.sha.update(b)
        self.pos += len(b)
        return b

    def rest(self) -> str:
        while chunk := self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def check_shard(path: str, expected: dict, deep: bool = False) -> list[str]:
    """Problems of one shard (empty if it matches its manifest entry)."""
    if not os.path.isfile(path):
        return ["missing"]
    problems = []
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        problems.append(f"size {size} != manifest {expected['bytes']}")
    members: dict[str, dict[str, str | bytes | None]] = {}
    deep_problems: list[str] = []
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        try:
            # Stream mode reads the archive strictly in order, so one pass both
            # parses and hashes every byte. Under --deep each member is hashed as it
            # streams by and only a sample's json is kept, until its sample ends:
            # memory stays at one json, never a shard (or one huge member).
            with tarfile.open(fileobj=reader, mode="r|") as tf:
                for info in tf:
                    base = info.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    if deep and members and key not in members:  # the previous sample is complete
                        last = next(reversed(members))
                        if not deep_problems:
                            deep_problems += _deep_check({last: members[last]})
                        members[last] = dict.fromkeys(members[last])  # its json is not kept
                    members.setdefault(key, {})[ext] = _member_digest(tf, info, ext) if deep else None
                if deep and members and not deep_problems:
                    last = next(reversed(members))
                    deep_problems += _deep_check({last: members[last]})
        except (tarfile.TarError, EOFError, OSError) as exc:
            problems.append(f"not a readable tar: {exc}")
        digest = reader.rest()
    if digest != expected["sha256"]:
        problems.append(f"sha256 {digest[:12]}... != manifest {expected['sha256'][:12]}...")
    bad_samples = [k for k, m in members.items()
                   if "json" not in m or len(m) != 2 or not any(e in schema.IMAGE_EXTENSIONS for e in m)]
    if bad_samples:
        problems.append(f"{len(bad_samples)} sample(s) without exactly one image and one json, "
                        f"e.g. {bad_samples[0]!r}")
    if len(members) != expected["samples"]:
        problems.append(f"{len(members)} samples != manifest {expected['samples']}")
    if deep and not problems:
        problems += deep_problems
    return problems


MAX_JSON_BYTES = 16 << 20
"""Largest json member --deep reads (a sample's metadata is a few KB; a crafted header
could declare gigabytes)."""


def _member_digest(tf: tarfile.TarFile, info: tarfile.TarInfo, ext: str) -> str | bytes | None:
    """A json member's bytes (None above MAX_JSON_BYTES), else the sha256 hex of the
    member's bytes, read in 1 MiB blocks."""
    if not info.isfile():
        return None
    fh = tf.extractfile(info)
    if ext == "json":
        return fh.read() if info.size <= MAX_JSON_BYTES else None
    h = hashlib.sha256()
    while chunk := fh.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _deep_check(members: dict[str, dict[str, str | bytes | None]]) -> list[str]:
    for key, m in members.items():
        if not isinstance(m.get("json"), bytes):
            return [f"sample {key!r} has no json member of at most {MAX_JSON_BYTES} bytes"]
        meta = json.loads(m["json"])
        missing = [f for f in schema.METADATA_FIELDS if f not in meta]
        if missing:
            return [f"sample {key!r} metadata lacks {missing}"]
        img = m.get(meta["image_ext"])
        if img is None or img != meta["sha256"]:
            return [f"sample {key!r} image bytes do not match its sha256"]
        if key != schema.sample_key(meta["relpath"]):
            return [f"sample {key!r} key does not match its relpath {meta['relpath']!r}"]
    return []


def verify(out_dir: str, deep: bool = False, out=sys.stdout) -> list[str]:
    """All problems found under out_dir, each naming a shard or file; prints progress."""
    sets = find_shard_sets(out_dir)
    if not sets:
        return [f"{out_dir}: no shard set (no manifest.json) found"]
    problems = []
    for set_dir in sets:
        rel = os.path.relpath(set_dir, out_dir)
        try:
            manifest = load_manifest(set_dir)
            shards = manifest["shards"]
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{rel}/manifest.json: unreadable: {exc}")
            continue
        try:
            with open(os.path.join(set_dir, SIZES), encoding="utf-8") as fh:
                if json.load(fh) != sizes_of(manifest):
                    problems.append(f"{rel}/{SIZES}: does not match manifest.json")
        except (OSError, ValueError) as exc:
            problems.append(f"{rel}/{SIZES}: unreadable: {exc}")
        known = {s["name"] for s in shards}
        for name in sorted(os.listdir(set_dir)):
            if name.endswith(".tar") and name not in known:
                problems.append(f"{rel}/{name}: shard not listed in manifest.json")
        n_bad = 0
        for s in shards:
            name = s.get("name")
            if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
                # Joined to the set folder: a crafted "../x" or "/abs" would be read elsewhere.
                problems.append(f"{rel}/manifest.json: shard name {name!r} is not a plain file name")
                n_bad += 1
                continue
            for p in check_shard(os.path.join(set_dir, name), s, deep):
                problems.append(f"{rel}/{s['name']}: {p}")
                n_bad += 1
        if sum(s["samples"] for s in shards) != manifest.get("totals", {}).get("samples"):
            problems.append(f"{rel}/manifest.json: shard sample counts do not add up to totals")
        print(f"{rel}: {len(shards)} shard(s), {sum(s['samples'] for s in shards)} samples, "
              f"{'OK' if not n_bad else f'{n_bad} problem(s)'}", file=out)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sharding.verify",
        description="Re-hash every shard under OUT_DIR against its manifest.json, re-count samples "
                    "and check sizes.json. Exits 1 naming each bad shard.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder of the sharder (or one shard set)")
    p.add_argument("--deep", action="store_true",
                   help="also check every sample's metadata fields and image sha256")
    args = p.parse_args(argv)
    problems = verify(args.out_dir, args.deep)
    for prob in problems:
        print(f"BAD {prob}", file=sys.stderr)
    if problems:
        print(f"verification FAILED: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("verification OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
