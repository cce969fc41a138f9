"""Evaluation input: every image of every set exactly once, split across ranks.

The training stream replaces bad samples and pads ranks to equal batch counts;
evaluation must do neither. Here the sample list of all sets is enumerated
from the sharder's `sizes.json` files (set order, then shard name, then index
in the shard: nothing is opened to plan), and rank r of W takes the
contiguous slice [r*N//W, (r+1)*N//W). Slices are disjoint and cover the list,
so each image is scored by exactly one rank, and contiguity means each rank
reads whole runs of a shard sequentially. A sample that cannot be read or
decoded becomes a failure record (set, key, reason), never a silent loss, so
expected = scored + failed.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.plan import Ref
from pipeline.data.reader import ShardCursor
from pipeline.data.shards import SIZES_FILE, discover_shards


@dataclass(frozen=True)
class EvalItem:
    """One image to score: sample `index` of shard `url`, in set `set_name`."""

    set_name: str
    url: str
    index: int


def shard_set_dirs(root: str) -> list[str]:
    """Folders holding a sizes.json: `root` itself, or its sub-folders (one per generator)."""
    if os.path.isfile(os.path.join(root, SIZES_FILE)):
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if SIZES_FILE in filenames:
            found.append(dirpath)
    if not found:
        raise FileNotFoundError(f"{root}: no shard set (no {SIZES_FILE} in it or below it)")
    return sorted(found)


def enumerate_items(sets: dict[str, str], limit: int | None = None) -> list[EvalItem]:
    """All images of all sets in a fixed order (see module doc); `limit` keeps the first N per set."""
    items: list[EvalItem] = []
    for name, root in sets.items():
        set_items: list[EvalItem] = []
        for d in shard_set_dirs(root):
            shards = discover_shards(d)
            for url, count in zip(shards.urls, shards.counts):
                set_items.extend(EvalItem(name, url, i) for i in range(count))
        items.extend(set_items[:limit] if limit else set_items)
    return items


def rank_slice(items: Sequence[EvalItem], rank: int, world_size: int) -> list[EvalItem]:
    """Contiguous, disjoint, covering split: sizes differ by at most one."""
    n = len(items)
    return list(items[rank * n // world_size:(rank + 1) * n // world_size])


def expected_counts(items: Sequence[EvalItem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it.set_name] = out.get(it.set_name, 0) + 1
    return out


class EvalImages(IterableDataset):
    """Decoded images of a rank's items; each loader worker takes a contiguous part."""

    def __init__(self, items: Sequence[EvalItem], image_processor):
        self.items = list(items)
        self.image_processor = image_processor

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = self.items[w * len(self.items) // nw:(w + 1) * len(self.items) // nw]
        urls = sorted({it.url for it in mine})
        shard_of = {u: i for i, u in enumerate(urls)}
        cursor = ShardCursor(urls)
        visit, last = -1, None
        try:
            for pos, it in enumerate(mine):
                if it.url != last:
                    visit, last = visit + 1, it.url
                yield self._decode(it, cursor.get(Ref(pos, visit, shard_of[it.url], it.index)))
        finally:
            cursor.close()

    def _decode(self, it: EvalItem, raw) -> dict[str, Any]:
        where = f"{os.path.basename(os.path.dirname(it.url))}/{os.path.basename(it.url)}[{it.index}]"
        base = {"set": it.set_name, "shard": it.url, "index": it.index}
        if raw.error:
            return {**base, "key": raw.key or where, "error": raw.error}
        try:
            meta = json.loads(raw.members["json"])
            data = raw.members[meta["image_ext"]]
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                pixels = self.image_processor(im)
        except Exception as exc:  # noqa: BLE001 - any undecodable sample is a counted failure
            return {**base, "key": raw.key, "error": f"{type(exc).__name__}: {exc}"}
        return {**base, "key": raw.key, "error": None, "pixel_values": pixels,
                "label": int(meta["label"]), "generator": meta["generator"],
                "reference": meta.get("reference") or "", "relpath": meta.get("relpath", "")}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Good samples stacked for the model; failures passed through for counting."""
    good = [s for s in samples if s["error"] is None]
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in good]) if good else None,
        "samples": [{k: v for k, v in s.items() if k != "pixel_values"} for s in good],
        "failures": [{k: s[k] for k in ("set", "key", "shard", "index", "error")} for s in samples
                     if s["error"] is not None],
    }


def read_images(refs: Sequence[tuple[str, int]]) -> list[bytes | None]:
    """Image bytes of (shard url, index) pairs (for the few predictions shown in W&B)."""
    out: list[bytes | None] = []
    for url, index in refs:
        cursor = ShardCursor([url])
        try:
            raw = cursor.get(Ref(0, 0, 0, index))
        finally:
            cursor.close()
        try:
            meta = json.loads(raw.members["json"])
            out.append(raw.members[meta["image_ext"]])
        except (KeyError, ValueError, TypeError):
            out.append(None)
    return out


def make_eval_loader(items: Sequence[EvalItem], image_processor, batch_size: int, num_workers: int) -> DataLoader:
    workers = min(num_workers, len(items))
    return DataLoader(EvalImages(items, image_processor), batch_size=batch_size, num_workers=workers,
                      collate_fn=collate, persistent_workers=False,
                      multiprocessing_context="fork" if workers else None)
