"""The user's files -> decoded, preprocessed samples, in loader workers, one rank's share.

The input stream (inputs.py) is cut into runs of `batch_size` consecutive
inputs; run j belongs to rank (j mod W) ... precisely, to the loader worker
number j mod (W * nw) counted over all ranks' workers, so every rank scores a
disjoint share and the ranks' shares interleave (a folder sorted by name does
not put all of one kind on one rank). Each worker walks the stream itself
(it is lazy and cheap), so nothing proportional to the number of inputs is
held or sent between processes.

A worker yields one item per run: the run's decoded samples (a video
contributes up to `video_max_frames` frames, each a sample) and a record for
each input that could not be scored. The DataLoader hands runs over in run
order (round-robin over workers, whose runs interleave the same way), so a
rank's records come out in input order.

Per input, the worker reads the bytes (bounded by `max_file_bytes`), hashes
them (the resume key), and skips an input whose (hash, settings) is already
in the output. Images are decoded with PIL after a pixel-count check on the
header (`max_pixels`) and preprocessed by the model's ImageProcessor, the same
tensor as training and evaluation; video frames are sampled as the video
benchmarks' sharder samples them (sharding.eval_sets.video.extract_frames).
Every failure (unreadable, empty, truncated, not an image, too large, a video
with no decodable frame) is a record with `status: error` and the reason.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from modeling.image_processing import ImageLimits, ImageSizeError, open_image
from pipeline.inference.evidence import display_square
from pipeline.inference.inputs import INPUT_ERRORS, Input, Source, iter_inputs


def file_sha256(path: str, limit: int) -> tuple[str, bytes | None]:
    """(hex sha256, bytes or None for videos) of a file of at most `limit` bytes."""
    size = os.path.getsize(path)
    if size > limit:
        raise ValueError(f"file_too_large: {size} bytes > max_file_bytes {limit}")
    if size == 0:
        raise ValueError("zero_byte: the file is empty")
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    return hashlib.sha256(data).hexdigest(), data


def decode_image(data: bytes, max_pixels: int, limits: ImageLimits | None = None) -> Image.Image:
    """A loaded PIL image, refused before decoding when its header says it is too large:
    more than `max_pixels`, or outside `limits` (longest side, aspect ratio; the
    training and evaluation loaders' own check, modeling.image_processing.open_image)."""
    with Image.open(io.BytesIO(data)) as header:
        w, h = header.size
    if w * h > max_pixels:
        raise ValueError(f"too_many_pixels: {w}x{h} = {w * h} > max_pixels {max_pixels}")
    try:
        return open_image(data, limits or ImageLimits())
    except ImageSizeError as exc:
        raise ValueError(f"image_size: {exc}") from None


def image_sample(path: str, processor, evidence: bool, max_pixels: int, max_file_bytes: int,
                 index: int = 0, limits: ImageLimits | None = None) -> dict[str, Any]:
    """One image file as a sample for Predictor.records (the web demo's input path;
    raises ValueError/OSError with a reason as `error_reason` names it)."""
    sha, data = file_sha256(path, max_file_bytes)
    image = decode_image(data, max_pixels, limits)
    return {"index": index, "path": path, "kind": "image", "sha256": sha,
            **prepared(image, processor, evidence)}


def prepared(image: Image.Image, processor, evidence: bool) -> dict[str, Any]:
    """The model's tensor of a decoded image, its size, and (for evidence maps) the display square."""
    width, height = image.size
    out = {"pixel_values": processor(image), "width": width, "height": height}
    if evidence:
        out["display"] = display_square(image, processor.fill)
    return out


class PredictImages(IterableDataset):
    def __init__(self, sources: Sequence[Source], image_processor, batch_size: int, rank: int, world: int,
                 done: frozenset[str] = frozenset(), evidence: bool = False, video_fps: float = 1.0,
                 video_max_frames: int = 16, max_pixels: int = 89_478_485, max_file_bytes: int = 1 << 30,
                 limits: ImageLimits | None = None):
        """done: hashes of inputs already predicted with these settings (skipped)."""
        self.sources = list(sources)
        self.processor = image_processor
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.done = done
        self.evidence = evidence
        self.video_fps, self.video_max_frames = video_fps, video_max_frames
        self.max_pixels, self.max_file_bytes = max_pixels, max_file_bytes
        self.limits = limits or ImageLimits()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        me, slots = self.rank * nw + w, self.world * nw
        run: list[Input] = []
        run_id = -1
        for inp in iter_inputs(self.sources):
            j = inp.index // self.batch_size
            if j % slots != me:
                continue
            if j != run_id and run:
                yield self._run(run_id, run)
                run = []
            run_id = j
            run.append(inp)
        if run:
            yield self._run(run_id, run)

    def _run(self, run_id: int, inputs: list[Input]) -> dict[str, Any]:
        samples: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        skipped = 0
        for inp in inputs:
            base = {"index": inp.index, "path": inp.path, "kind": inp.kind}
            if inp.kind == "error":
                records.append({**base, "kind": "unknown", "status": "error",
                                "reason": f"{inp.error}: {INPUT_ERRORS[inp.error]}"})
                continue
            try:
                if inp.kind == "video":
                    sha, frames = self._video(inp)
                else:
                    sha, data = file_sha256(inp.path, self.max_file_bytes)
                    frames = None
                if sha in self.done:
                    skipped += 1
                    continue
                if frames is None:
                    samples.append({**base, "sha256": sha, **self._image(decode_image(data, self.max_pixels, self.limits))})
                else:
                    for n, (frame, sample) in enumerate(frames):
                        samples.append({**base, "sha256": sha, "frame": frame, "frame_number": n,
                                        "n_frames": len(frames), **sample})
            except Exception as exc:  # noqa: BLE001 - any unreadable input is a counted error record
                records.append({**base, "status": "error", "reason": error_reason(exc)})
        return {"run": run_id, "samples": samples, "records": records, "skipped": skipped}

    def _image(self, image: Image.Image) -> dict[str, Any]:
        return prepared(image, self.processor, self.evidence)

    def _video(self, inp: Input) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
        from sharding.eval_sets.video import extract_frames

        size = os.path.getsize(inp.path)
        if size > self.max_file_bytes:
            raise ValueError(f"file_too_large: {size} bytes > max_file_bytes {self.max_file_bytes}")
        h = hashlib.sha256()
        with open(inp.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        sha = h.hexdigest()
        if sha in self.done:
            return sha, []
        frames = extract_frames(inp.path, self.video_fps, self.video_max_frames)
        if not frames:
            raise ValueError("no_frames: no decodable video frame")
        return sha, [(index, self._image(decode_image(png, self.max_pixels, self.limits))) for index, png in frames]


def error_reason(exc: Exception) -> str:
    """`reason: detail` for our own ValueErrors (which start with a reason key), else the type and text."""
    text = str(exc)
    if isinstance(exc, ValueError) and ":" in text and text.split(":", 1)[0].isidentifier():
        return text
    if isinstance(exc, FileNotFoundError):
        return f"missing: {text}"
    if isinstance(exc, PermissionError):
        return f"unreadable: {text}"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too_many_pixels: {text}"
    if type(exc).__name__ == "UnidentifiedImageError":
        return "not_an_image: no image format recognises the bytes"
    if isinstance(exc, OSError) and "truncated" in text:
        return f"truncated: {text}"
    return f"{type(exc).__name__}: {text}"


def make_predict_loader(dataset: PredictImages, num_workers: int) -> DataLoader:
    # batch_size=None: each item is already a run; fork keeps the model out of the workers' start-up.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      multiprocessing_context="fork" if num_workers else None)
