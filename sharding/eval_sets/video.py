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
  relpath (Celeb-DF's `List_of_testing_videos.txt`), restricting to those;
  `pairs_list`: a FaceForensics++ split file (see below), restricting to its
  videos. Listed videos that are not found are `missing` rejections, and
  `selection` (benchmark.json) counts the videos found, kept and skipped.
- Frames: decoded with PyAV; starting at the first frame, one frame every
  1/fps seconds of presentation time, at most `max_frames` per video. When the
  presentation times stop advancing (a broken muxer), the nominal frame rate
  times the rest; a video that still needs more than twice the frames its
  rate implies (plus one second) is rejected, named, instead of being decoded
  to its end.

FaceForensics++ (ondyari/FaceForensics, dataset/README.md and
dataset/splits/{train,val,test}.json, read at b952e41): the
download script writes `original_sequences/youtube/<c>/videos/<target>.mp4`
(sequences renamed 000..999) and
`manipulated_sequences/<Method>/<c>/videos/<target>_<source>.mp4`, with <c>
c23 (HQ), c40 (LQ) or the lossless level, which the README names "c0/raw"
(the script itself is sent on request, so which of the two folder names it
writes could not be confirmed; the `raw` preset takes both); methods Deepfakes,
Face2Face, FaceSwap, NeuralTextures (and FaceShifter; DeepFakeDetection with
its `original_sequences/actors` uses other names and is in no split). A split
file is a JSON list of [a, b] id pairs: test.json has 70 pairs = 140 ids.
A pair stands for the originals a and b and the manipulations a_b and b_a
(both directions, which is how 70 pairs give the paper's 140 test videos per
method). The split files ship in the GitHub repository, not in the download:
copy test.json to SRC/splits/test.json (or SRC/test.json). In a folder that
holds at least one split video, every split video the folder should hold and
does not is a `missing` rejection; folders with none (DeepFakeDetection,
actors) are skipped whole.

A frame has no original bytes (the video codec's bytes are not an image), so
each sampled frame is encoded losslessly as PNG from the decoded RGB picture;
the video's compression traces are kept, nothing is added by the PNG step.
Its relpath is `<video relpath>/frame-<index in stream, 6 digits>.png`: the
video a frame belongs to is its relpath's parent (the evaluation's video-level
scores group frames by it), `generator` its report row and `label` the video's.
"""
from __future__ import annotations

import fnmatch
import io
import json
import multiprocessing as mp
import os
from collections.abc import Sequence

from tqdm import tqdm

from .common import LABEL_FOLDERS, STAGING_DIR, BenchmarkScan, ext_of, stage_bytes, walk_files
from ..worker_pool import start_pool

VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "avi", "mov", "mkv", "webm", "m4v")
VIDEO_LABEL_FOLDERS: dict[str, int] = {
    **LABEL_FOLDERS,
    "celeb-real": 0, "youtube-real": 0, "celeb-synthesis": 1,
    "original_sequences": 0, "manipulated_sequences": 1,
}
GENERATOR_RULES = ("benchmark", "first", "after_label")
VIDEO_TIMEOUT_S = 600.0
"""Longest wait for one video's frames from the worker processes (scan_video)."""


class VideoTimeout(RuntimeError):
    """A video's frame extraction did not finish in time (the message names it)."""


def extract_frames(path: str, fps: float, max_frames: int) -> list[tuple[int, bytes]]:
    """(frame index, PNG bytes) of the sampled frames of one video."""
    import av
    from PIL import Image

    out: list[tuple[int, bytes]] = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        # Frames the sampling can need at the nominal rate, doubled, plus a second:
        # a video whose times run slower than its rate is not decoded to its end.
        budget = 2 * int((max_frames - 1) * max(1.0, rate / fps) + 1) + int(rate)
        next_t = prev_t = None
        by_index = False
        for index, frame in enumerate(container.decode(stream)):
            if index >= budget:
                raise ValueError(f"{budget} frames decoded for {len(out)} of {max_frames} samples at {fps:g} "
                                 f"fps: its presentation times do not advance at its rate ({rate:g} fps)")
            # Presentation time when the container has it, else the nominal rate; once the
            # times stop advancing (a broken muxer), the nominal rate from then on.
            t = float(frame.time) if frame.time is not None and not by_index else index / rate
            if prev_t is not None and t <= prev_t and not by_index:
                by_index, t = True, index / rate
            prev_t = t
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


def _with_timeout(results, jobs, timeout_s: float):
    """The results of `pool.imap` in order, each waited for at most `timeout_s`."""
    for k in range(len(jobs)):
        try:
            yield results.next(timeout=timeout_s)
        except mp.TimeoutError:
            raise VideoTimeout(f"{jobs[k][1]}: no frames after {timeout_s:g} s (a hanging decoder?); the workers "
                               f"were stopped. Move the video out of the way (or raise video_timeout_s) and rerun: "
                               f"finished shards are reused") from None


def read_pairs(path: str) -> tuple[set[str], set[str]]:
    """(original ids, manipulated ids) of a FaceForensics++ split file: [a, b] -> a, b and a_b, b_a."""
    with open(path, encoding="utf-8") as fh:
        try:
            pairs = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise ValueError(f"{path}: a FaceForensics++ split file is a JSON list of [target, source] id pairs")
    originals = {x for p in pairs for x in p}
    manipulated = {f"{a}_{b}" for a, b in pairs} | {f"{b}_{a}" for a, b in pairs}
    return originals, manipulated


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


def _reject_missing_pairs(scan: BenchmarkScan, split_dirs: dict[str, tuple[str, int, set[str]]],
                          split_ids: tuple[set[str], set[str]], split_name: str) -> int:
    """Reject (as `missing`) the split videos absent from a folder that holds some; returns how many."""
    missing = 0
    for folder, (gen, label, ids) in sorted(split_dirs.items()):
        for stem in sorted(split_ids[label] - ids):
            missing += 1
            scan.reject(gen, f"{folder}/{stem}.mp4", "missing",
                        f"in the split file {split_name} but not in this folder", kind="file")
    return missing


def _stem(rel: str) -> str:
    return rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def scan_video(src: str, benchmark: str, out_dir: str, fps: float = 1.0, max_frames: int = 16,
               generator: str = "benchmark", include: Sequence[str] = (), video_list: str | None = None,
               pairs_list: str | None = None, workers: int = 1, progress: bool = True,
               video_timeout_s: float = VIDEO_TIMEOUT_S) -> BenchmarkScan:
    """video_timeout_s: with worker processes, the longest wait for the next video's frames;
    past it the workers are ended and the run stops naming the video (a hanging decoder)."""
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"video adapter: fps must be > 0 and max_frames >= 1 (got {fps}, {max_frames})")
    if generator not in GENERATOR_RULES:
        raise ValueError(f"video adapter: generator rule {generator!r} is not one of {GENERATOR_RULES}")
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not a directory (the video adapter needs the benchmark's root folder)")
    if video_list and pairs_list:
        raise ValueError("video adapter: give a video list or a pairs list, not both")
    wanted = None
    if video_list:
        with open(video_list, encoding="utf-8") as fh:
            wanted = {line.split()[-1] for line in fh if line.strip()}
    split_ids = read_pairs(pairs_list) if pairs_list else None
    scan = BenchmarkScan(benchmark, staged=os.path.join(out_dir, STAGING_DIR))
    jobs, meta = [], {}
    found = not_in_split = 0
    split_dirs: dict[str, tuple[str, int, set[str]]] = {}  # folder -> (generator, label, split ids found in it)
    for rel in walk_files(src):
        if ext_of(rel) not in VIDEO_EXTENSIONS:
            continue  # lists, READMEs, masks: not inputs of this adapter
        if include and not any(fnmatch.fnmatch(rel, p) for p in include):
            continue
        found += 1
        if wanted is not None and rel not in wanted:
            not_in_split += 1
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
        label = VIDEO_LABEL_FOLDERS[parts[label_at].lower()]
        if split_ids is not None:
            if _stem(rel) not in split_ids[label]:  # split_ids[0]: original ids, [1]: manipulated ids
                not_in_split += 1
                continue
            split_dirs.setdefault(rel.rsplit("/", 1)[0], (gen, label, set()))[2].add(_stem(rel))
        meta[rel] = (gen, label, os.stat(os.path.join(src, *parts)))
        jobs.append((os.path.join(src, *parts), rel, out_dir, fps, max_frames))
    missing = 0
    if wanted is not None:
        for rel in sorted(wanted - set(meta)):
            missing += 1
            scan.reject(benchmark, rel, "missing", "listed in the video list but not found", kind="file")
    if split_ids is not None:
        missing += _reject_missing_pairs(scan, split_dirs, split_ids, os.path.basename(pairs_list or ""))
    scan.selection = {"videos_found": found, "videos_selected": len(jobs)}
    if wanted is not None or split_ids is not None:
        scan.selection.update(split_file=video_list or pairs_list, videos_not_in_split=not_in_split,
                              split_videos_missing=missing)
    bar = tqdm(total=len(jobs), unit="video", desc="frames", disable=not progress or not jobs)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = start_pool(ctx, workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = _with_timeout(pool.imap(_job, jobs), jobs, video_timeout_s) if pool else map(_job, jobs)
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
    except VideoTimeout:
        pool.terminate()  # the stuck worker is ended, not waited for
        raise
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    return scan
