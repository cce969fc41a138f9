"""`video` adapter: frames sampled at a fixed rate from real/fake video folders.

    SRC/.../<label folder>/.../<video>.{mp4,avi,mov,mkv,webm}

- The label comes from the deepest path component that is a label folder:
  the image ones (common.LABEL_FOLDERS) plus the video datasets' names
  (`Celeb-real`, `YouTube-real`, `Celeb-synthesis`, `original_sequences`,
  `manipulated_sequences`), case-insensitively.
- `generator`: "benchmark" (one group), "first" (first component below SRC)
  or "after_label" (the folder right below the label folder, e.g. FF++'s
  `manipulated_sequences/Deepfakes/...`).
- `include`: fnmatch patterns a video's relpath must match (FF++: one
  compression level); `video_list`: a text file whose lines end with a video
  relpath (Celeb-DF's `List_of_testing_videos.txt`), restricting to those.
- Frames: decoded with PyAV; starting at the first frame, one frame every
  1/fps seconds of presentation time, at most `max_frames` per video.

A frame has no original bytes (the video codec's bytes are not an image), so
each sampled frame is encoded losslessly as PNG from the decoded RGB picture;
the video's compression traces are kept, nothing is added by the PNG step.
Its relpath is `<video relpath>/frame-<index in stream, 6 digits>.png`.
Metrics over these sets are per frame, not per video.
"""
from __future__ import annotations

import fnmatch
import io
import multiprocessing as mp
import os
from collections.abc import Sequence

from tqdm import tqdm

from .common import LABEL_FOLDERS, STAGING_DIR, BenchmarkScan, ext_of, stage_bytes, walk_files

VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "avi", "mov", "mkv", "webm", "m4v")
VIDEO_LABEL_FOLDERS: dict[str, int] = {
    **LABEL_FOLDERS,
    "celeb-real": 0, "youtube-real": 0, "celeb-synthesis": 1,
    "original_sequences": 0, "manipulated_sequences": 1,
}
GENERATOR_RULES = ("benchmark", "first", "after_label")


def extract_frames(path: str, fps: float, max_frames: int) -> list[tuple[int, bytes]]:
    """(frame index, PNG bytes) of the sampled frames of one video."""
    import av
    from PIL import Image

    out: list[tuple[int, bytes]] = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        next_t = None
        for index, frame in enumerate(container.decode(stream)):
            # Presentation time when the container has it, else the nominal rate.
            t = float(frame.time) if frame.time is not None else index / rate
            if next_t is None:
                next_t = t
            if t + 1e-6 < next_t:
                continue
            buf = io.BytesIO()
            img: Image.Image = frame.to_image()
            img.save(buf, format="PNG", compress_level=3)
            out.append((index, buf.getvalue()))
            next_t += 1.0 / fps
            if len(out) >= max_frames:
                break
    return out


def _find_label(parts: Sequence[str]) -> int | None:
    return next((i for i in range(len(parts) - 2, -1, -1) if parts[i].lower() in VIDEO_LABEL_FOLDERS), None)


def _job(args: tuple[str, str, str, float, int]) -> tuple[str, list[tuple[str, str, int]], str]:
    """Worker: sample and stage one video's frames -> (video relpath, [(relpath, path, size)], error)."""
    full, rel, out_dir, fps, max_frames = args
    try:
        frames = extract_frames(full, fps, max_frames)
    except Exception as exc:  # PyAV raises many error types for broken files
        return rel, [], f"{type(exc).__name__}: {exc}"
    staged = []
    for index, png in frames:
        frame_rel = f"{rel}/frame-{index:06d}.png"
        staged.append((frame_rel, stage_bytes(out_dir, frame_rel, png), len(png)))
    return rel, staged, ""


def scan_video(src: str, benchmark: str, out_dir: str, fps: float = 1.0, max_frames: int = 16,
               generator: str = "benchmark", include: Sequence[str] = (), video_list: str | None = None,
               workers: int = 1, progress: bool = True) -> BenchmarkScan:
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"video adapter: fps must be > 0 and max_frames >= 1 (got {fps}, {max_frames})")
    if generator not in GENERATOR_RULES:
        raise ValueError(f"video adapter: generator rule {generator!r} is not one of {GENERATOR_RULES}")
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a directory (the video adapter needs the benchmark's root folder)")
    wanted = None
    if video_list:
        with open(video_list, encoding="utf-8") as fh:
            wanted = {line.split()[-1] for line in fh if line.strip()}
    scan = BenchmarkScan(benchmark, staged=os.path.join(out_dir, STAGING_DIR))
    jobs, meta = [], {}
    for rel in walk_files(src):
        if ext_of(rel) not in VIDEO_EXTENSIONS:
            continue  # lists, READMEs, masks: not inputs of this adapter
        if include and not any(fnmatch.fnmatch(rel, p) for p in include):
            continue
        if wanted is not None and rel not in wanted:
            continue
        parts = rel.split("/")
        label_at = _find_label(parts)
        if generator == "first" and len(parts) > 1 and label_at not in (None, 0):
            gen = parts[0]
        elif generator == "after_label" and label_at is not None and label_at + 2 < len(parts):
            gen = parts[label_at + 1]
        else:
            gen = benchmark
        if label_at is None:
            scan.reject(gen, rel, "no_label_folder", "no real/fake folder above the video", kind="file")
            continue
        meta[rel] = (gen, VIDEO_LABEL_FOLDERS[parts[label_at].lower()], os.stat(os.path.join(src, *parts)))
        jobs.append((os.path.join(src, *parts), rel, out_dir, fps, max_frames))
    if wanted is not None:
        for rel in sorted(wanted - set(meta)):
            scan.reject(benchmark, rel, "missing", "listed in the video list but not found", kind="file")
    bar = tqdm(total=len(jobs), unit="video", desc="frames", disable=not progress or not jobs)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_job, jobs) if pool else map(_job, jobs)
        for rel, frames, error in results:  # in job order: deterministic
            bar.update(1)
            gen, label, st = meta[rel]
            if error or not frames:
                scan.reject(gen, rel, "unreadable_video" if error else "no_frames",
                            error or "no frame could be decoded", kind="file")
                continue
            for frame_rel, path, size in frames:
                scan.add(frame_rel, gen, label, path=path, size=size,
                         fingerprint=f"{st.st_size}:{st.st_mtime_ns}:{fps}:{max_frames}")
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    return scan
