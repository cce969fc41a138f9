"""Evaluation input: every selected image of every set exactly once, split across ranks.

The training stream replaces bad samples and pads ranks to equal batch counts;
evaluation must do neither. Here the sample list of all sets is enumerated
from the sharder's `sizes.json` files (set order, then shard name, then index
in the shard: nothing is opened to plan), and rank r of W takes a contiguous
slice. Slices are disjoint and cover the list, so each image is scored by
exactly one rank, and contiguity means each rank reads whole runs of a shard
sequentially. A sample that cannot be read or decoded becomes a failure record
(set, key, reason), never a silent loss, so expected = scored + failed.

Selection (`plan_items`), applied per set before the split:
- `max_per_class` K: per generator, the first K real and the first K fake
  images, in the order of the generator's `<gen>_reasoning.json` (metadata
  `reasoning_index`; images it does not list, and shards written before the
  field existed, come after, by path). This is the reference evaluation's
  `max_sample` and gives balanced per-generator subsets in either protocol.
- `reasoning_sets`: sets of which only images listed in their reasoning JSON
  (`has_reasoning`) are kept, as the reference evaluation does for MMFR.
- `limit` N (after the above): the first N images of the set in shard order.
  It is a smoke-test knob, not a balanced subset: on the MMFR eval set the
  first 20 are all dalle3 images (12 real / 8 fake in the tiny synthetic set).
Selection needs labels, so it reads every sample's `json` member (tar headers
are skipped over, image bytes are never read); without it nothing is opened.

Each image is decoded once: a robustness sweep's perturbations
(perturbations.py) and the optional face crop of video frames (video.py) are
applied to that decoded image in the loader worker, before preprocessing, and
the batch carries the clean and every perturbed tensor.

Batches are cut at fixed positions of the whole list (`rank_slice` and the
loader's worker split keep multiples of the batch size together), so a batch
holds the same images whatever the number of ranks or loader workers; with
per-batch seeding (runner) sampled answers do not depend on either.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from modeling.image_processing import ImageLimits, open_image
from pipeline.data.plan import Ref
from pipeline.data.reader import ShardCursor
from pipeline.data.shards import SIZES_FILE, discover_shards
from pipeline.evaluation.perturbations import Perturbation
from pipeline.evaluation.video import FaceCropper, video_of


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


def _all_items(name: str, root: str) -> list[EvalItem]:
    items: list[EvalItem] = []
    for d in shard_set_dirs(root):
        shards = discover_shards(d)
        for url, count in zip(shards.urls, shards.counts):
            items.extend(EvalItem(name, url, i) for i in range(count))
    return items


def read_shard_metadata(url: str) -> list[dict[str, Any] | None]:
    """The `json` member of each sample of a shard, in sample order (None where it is
    missing or not JSON). Other members are passed over without reading their bytes."""
    out: list[dict[str, Any] | None] = []
    local = os.path.isfile(url)
    stream = None if local else gopen(url)
    tar = tarfile.open(url, mode="r:") if local else tarfile.open(fileobj=stream, mode="r|*")
    prefix: str | None = None
    try:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue  # same grouping as the sample reader (pipeline.data.reader)
            if key != prefix:
                out.append(None)
                prefix = key
            if ext == "json":
                try:
                    meta = json.loads(tar.extractfile(member).read())
                except ValueError:
                    meta = None
                out[-1] = meta if isinstance(meta, dict) else None
    finally:
        tar.close()
        if stream is not None:
            stream.close()
    return out


@dataclass
class SetSelection:
    """What the selection did to one set (recorded in results.json)."""

    available: int
    """Images in the set's shards."""
    selected: int
    """Images kept (and scored)."""
    not_in_reasoning_json: int = 0
    """Left out because the image is not listed in its reasoning JSON (reasoning_sets only)."""
    over_max_per_class: int = 0
    """Left out by max_per_class."""
    over_limit: int = 0
    """Left out by limit."""
    unreadable_metadata: int = 0
    """Kept although their metadata could not be read (they become failure records)."""
    without_reasoning_index: int = 0
    """Considered images whose shards predate `reasoning_index` (ordered by path instead)."""
    per_generator: dict[str, dict[str, int]] | None = None
    """generator -> {"real": n, "fake": n} selected (only when metadata was read)."""


def _select(items: list[EvalItem], max_per_class: int | None, require_reasoning: bool,
            stats: SetSelection) -> list[EvalItem]:
    metas: dict[str, list[dict[str, Any] | None]] = {}
    for url in dict.fromkeys(it.url for it in items):
        metas[url] = read_shard_metadata(url)
    groups: dict[tuple[str, int], list[tuple[tuple, EvalItem]]] = {}
    keep: set[EvalItem] = set()
    for it in items:
        shard = metas[it.url]
        meta = shard[it.index] if it.index < len(shard) else None
        if meta is None or "label" not in meta or "generator" not in meta:
            # Cannot be classified; kept so that decoding reports it as a failure.
            stats.unreadable_metadata += 1
            keep.add(it)
            continue
        if require_reasoning and not meta.get("has_reasoning"):
            stats.not_in_reasoning_json += 1
            continue
        if "reasoning_index" not in meta:
            stats.without_reasoning_index += 1
        position = meta.get("reasoning_index")
        order = (position is None, position if position is not None else 0, str(meta.get("relpath", "")))
        groups.setdefault((str(meta["generator"]), int(meta["label"])), []).append((order, it))
    per_generator: dict[str, dict[str, int]] = {}
    for (gen, label), members in sorted(groups.items()):
        members.sort(key=lambda m: m[0])
        chosen = members if max_per_class is None else members[:max_per_class]
        stats.over_max_per_class += len(members) - len(chosen)
        keep.update(it for _, it in chosen)
        per_generator.setdefault(gen, {"real": 0, "fake": 0})["fake" if label else "real"] = len(chosen)
    stats.per_generator = per_generator
    return [it for it in items if it in keep]  # shard order: each rank reads sequentially


def plan_items(sets: dict[str, str], limit: int | None = None, max_per_class: int | None = None,
               reasoning_sets: Sequence[str] = ()) -> tuple[list[EvalItem], dict[str, SetSelection]]:
    """The images to score (see the module doc for the selection) and what the selection did per set."""
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class: must be >= 1 or None, got {max_per_class}")
    items: list[EvalItem] = []
    report: dict[str, SetSelection] = {}
    for name, root in sets.items():
        set_items = _all_items(name, root)
        stats = SetSelection(available=len(set_items), selected=0)
        if max_per_class is not None or name in reasoning_sets:
            set_items = _select(set_items, max_per_class, name in reasoning_sets, stats)
        if limit and len(set_items) > limit:
            stats.over_limit = len(set_items) - limit
            set_items = set_items[:limit]
        stats.selected = len(set_items)
        if stats.available and not stats.selected:
            # The set would vanish from the report without a trace.
            raise ValueError(f"set {name!r} ({root}): the selection kept none of its {stats.available} images "
                             f"(not in the reasoning JSON: {stats.not_in_reasoning_json}, over max per class: "
                             f"{stats.over_max_per_class}); were its shards written from the annotation files?")
        report[name] = stats
        items.extend(set_items)
    return items, report


def enumerate_items(sets: dict[str, str], limit: int | None = None, max_per_class: int | None = None,
                    reasoning_sets: Sequence[str] = ()) -> list[EvalItem]:
    """All selected images of all sets in a fixed order (see module doc); `limit` keeps the first N per set."""
    return plan_items(sets, limit, max_per_class, reasoning_sets)[0]


def rank_slice(items: Sequence[EvalItem], rank: int, world_size: int, batch_size: int = 1) -> list[EvalItem]:
    """Contiguous, disjoint, covering split of whole batches of `batch_size`
    (cut at fixed positions of `items`); sizes differ by at most one batch."""
    n_batches = -(-len(items) // batch_size)
    lo, hi = rank * n_batches // world_size, (rank + 1) * n_batches // world_size
    return list(items[lo * batch_size:hi * batch_size])


def expected_counts(items: Sequence[EvalItem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it.set_name] = out.get(it.set_name, 0) + 1
    return out


class EvalImages(IterableDataset):
    """Decoded images of a rank's items; each loader worker takes a contiguous part
    made of whole batches of `batch_size`, so that the loader's batches are the
    fixed batches of the rank's list whatever the number of workers."""

    def __init__(self, items: Sequence[EvalItem], image_processor, batch_size: int = 1,
                 perturbations: Sequence[Perturbation] = (), face_crop: bool = False,
                 image_limits: ImageLimits | None = None):
        """perturbations: each decoded image is also preprocessed under each of them
        (`perturbed` pixel values, in this order), so a robustness sweep decodes once.
        face_crop: video frames are cropped to their largest face first (video.FaceCropper).
        image_limits: bounds on each image's declared size, checked before it is decoded
        (EvalConfig.image_limits(); None: the defaults); one outside them is a failure record."""
        self.items = list(items)
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.perturbations = tuple(perturbations)
        self.face_crop = face_crop
        self.image_limits = image_limits or ImageLimits()
        self._cropper: FaceCropper | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = rank_slice(self.items, w, nw, self.batch_size)
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
            video = video_of(meta.get("relpath"))
            with open_image(data, self.image_limits) as im:  # size checked before decoding
                image, face = self._crop(im) if self.face_crop and video else (im, None)
                pixels = self.image_processor(image)
                perturbed = [self.image_processor(p.apply(image)) for p in self.perturbations]
        except Exception as exc:  # noqa: BLE001 - any undecodable sample is a counted failure
            return {**base, "key": raw.key, "error": f"{type(exc).__name__}: {exc}"}
        out = {**base, "key": raw.key, "error": None, "pixel_values": pixels, "perturbed": perturbed,
               "label": int(meta["label"]), "generator": meta["generator"],
               "reference": meta.get("reference") or "", "relpath": meta.get("relpath", ""), "video": video}
        if face is not None:
            out["face_found"] = face
        return out

    def _crop(self, image: Image.Image) -> tuple[Image.Image, bool]:
        if self._cropper is None:  # built in the worker process that uses it
            self._cropper = FaceCropper()
        return self._cropper(image)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Good samples stacked for the model; failures passed through for counting."""
    good = [s for s in samples if s["error"] is None]
    n_perturbed = len(good[0]["perturbed"]) if good else 0
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in good]) if good else None,
        # One [B, 3, H, W] tensor per perturbation, in the sweep's order.
        "perturbed_pixel_values": [torch.stack([s["perturbed"][j] for s in good]) for j in range(n_perturbed)],
        "samples": [{k: v for k, v in s.items() if k not in ("pixel_values", "perturbed")} for s in good],
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


def make_eval_loader(items: Sequence[EvalItem], image_processor, batch_size: int, num_workers: int,
                     perturbations: Sequence[Perturbation] = (), face_crop: bool = False,
                     image_limits: ImageLimits | None = None) -> DataLoader:
    # More workers than batches would leave some idle (each takes whole batches).
    workers = min(num_workers, -(-len(items) // batch_size))
    dataset = EvalImages(items, image_processor, batch_size, perturbations, face_crop, image_limits)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      collate_fn=collate, persistent_workers=False,
                      multiprocessing_context="fork" if workers else None)
