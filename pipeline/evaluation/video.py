"""Video-level scores of video benchmarks, and the optional face crop of their frames.

Video sets (celeb-df, ffpp, any `video` adapter output) hold sampled frames as
images; the sharder (sharding/eval_sets/video.py) names each frame
``<video relpath>/frame-<index, 6 digits>.png`` in the metadata ``relpath``,
so a frame's video is that relpath's parent (``video_of``). Frame sampling is
the sharder's (--fps, --max-frames), unchanged here.

Per video: p_fake = the mean of its frames' p_fake (frames without one are
skipped; a video with none has no p_fake), and its decision is fake iff that
mean is >= 0.5, the frame-level CPM's threshold. Mean rather than max or
vote: it uses every frame's confidence and does not let one odd frame
decide (a common frame-to-video rule in deepfake evaluation). Video-level accuracy (real, fake, overall), AUC and AP are computed per
generator, averaged over generators and pooled, next to the frame-level CPM
accuracy, AUC and AP of the same frames (results.json sets.<set>.video,
results.md "Video level" table; each prediction row has ``video``).

Face crop (``--face-crop``, EvalConfig.face_crop): OpenCV's frontal-face Haar
cascade (``haarcascade_frontalface_default.xml``), whose trained cascade ships
inside the opencv-python-headless 4.x wheel (``cv2.data.haarcascades``; the 5.0
wheels no longer include it) and which needs no torch, so it installs next to
ours with nothing fetched at run time (extra ``face``:
``opencv-python-headless>=4.8,<5``). Checked alternatives: mediapipe 1.2 ships
no face model in its wheel (its tasks API loads a downloaded .tflite),
facenet-pytorch 2.6 ships MTCNN weights but pins torch<2.3, uniface downloads
its ONNX weights. The crop is the largest detected face, grown to a square of
1.3 times its side around its centre (the margin FF++-style face pipelines
use), clipped to the frame; a frame without a detected face is scored whole
and counted (results.json "face_crop"). It runs on the decoded frame before
any perturbation and the model's preprocessing, and only on video frames.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.evaluation.metrics import auc_ap

_FRAME = re.compile(r"^(?P<video>.+)/frame-\d{6}\.png$")
FACE_MARGIN = 1.3
VIDEO_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n_frames", "Frames", "int"),
    ("frame_cpm_acc", "Frame CPM Acc", "pct"),
    ("frame_auc", "Frame AUC", "frac"),
    ("frame_ap", "Frame AP", "frac"),
    ("n_videos", "Videos", "int"),
    ("real_acc", "Video Real Acc", "pct"),
    ("fake_acc", "Video Fake Acc", "pct"),
    ("acc", "Video Acc", "pct"),
    ("auc", "Video AUC", "frac"),
    ("ap", "Video AP", "frac"),
)
_COUNTS = ("n_frames", "n_videos")


def video_of(relpath: str | None) -> str | None:
    """The video relpath of a sampled frame's relpath; None for an image that is not a frame."""
    from sharding.eval_sets.video import VIDEO_EXTENSIONS

    m = _FRAME.match(relpath or "")
    if not m or m.group("video").rsplit(".", 1)[-1].lower() not in VIDEO_EXTENSIONS:
        return None
    return m.group("video")


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def aggregate_videos(frames: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (generator, video): label, frame count, mean p_fake, decision (p >= 0.5)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in frames:
        groups.setdefault((r["generator"], r["video"]), []).append(r)
    out = []
    for (gen, video), members in groups.items():
        labels = {int(r["label"]) for r in members}
        if len(labels) != 1:
            raise ValueError(f"video {video!r} ({gen}): its frames carry different labels {sorted(labels)}")
        ps = [float(r["p_fake"]) for r in members if r.get("p_fake") is not None]
        p = sum(ps) / len(ps) if ps else None
        out.append({"generator": gen, "video": video, "label": labels.pop(), "frames": len(members),
                    "p_fake": p, "pred": None if p is None else int(p >= 0.5)})
    return out


def _group(frames: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    videos = aggregate_videos(frames)
    scored_f = [r for r in frames if r.get("p_fake") is not None]
    out: dict[str, Any] = {"n_frames": len(frames), "n_videos": len(videos)}
    out["frame_cpm_acc"] = _ratio(sum((float(r["p_fake"]) >= 0.5) == (int(r["label"]) == 1) for r in scored_f),
                                  len(scored_f))
    out["frame_auc"], out["frame_ap"] = auc_ap([int(r["label"]) for r in scored_f],
                                               [float(r["p_fake"]) for r in scored_f])
    scored = [v for v in videos if v["p_fake"] is not None]
    for name, label in (("real_acc", 0), ("fake_acc", 1), ("acc", None)):
        members = [v for v in scored if label is None or v["label"] == label]
        out[name] = _ratio(sum(v["pred"] == v["label"] for v in members), len(members))
    out["auc"], out["ap"] = auc_ap([v["label"] for v in scored], [v["p_fake"] for v in scored])
    return out


def video_set_metrics(rows: Sequence[Mapping[str, Any]], order: Sequence[str]) -> dict[str, Any] | None:
    """Video-level metrics of one set per generator (in `order`), averaged over generators
    and pooled; None when no row of the set is a video frame."""
    frames = [r for r in rows if r.get("video")]
    if not frames:
        return None
    by_gen: dict[str, list[Mapping[str, Any]]] = {}
    for r in frames:
        by_gen.setdefault(r["generator"], []).append(r)
    gens = [g for g in order if g in by_gen]
    per_gen = {g: _group(by_gen[g]) for g in gens}
    average: dict[str, Any] = {k: sum(per_gen[g][k] for g in gens) for k in _COUNTS}
    for k, _, _ in VIDEO_COLUMNS:
        if k not in _COUNTS:
            values = [per_gen[g][k] for g in gens if per_gen[g][k] is not None]
            average[k] = sum(values) / len(values) if values else None
    return {"generators": per_gen, "order": gens, "average": average, "pooled": _group(frames),
            "aggregation": "mean p_fake of the video's frames, fake iff >= 0.5"}


class FaceCropper:
    """Largest frontal face of an image (OpenCV Haar cascade from the wheel; module doc)."""

    def __init__(self) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise ImportError("face_crop: needs OpenCV with its bundled Haar cascades; install the 'face' extra "
                              "(pip install 'opencv-python-headless>=4.8,<5')") from exc
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self.cv2 = cv2
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise FileNotFoundError(f"face_crop: {path} is missing from the OpenCV wheel (OpenCV 5 wheels do not "
                                    "ship the Haar cascades; install opencv-python-headless<5)")

    def box(self, image) -> tuple[int, int, int, int] | None:
        """(left, top, right, bottom) of the crop, or None when no face is found."""
        import numpy as np

        gray = self.cv2.cvtColor(np.asarray(image.convert("RGB")), self.cv2.COLOR_RGB2GRAY)
        faces = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        if len(faces) == 0:
            return None
        x, y, w, h = max((tuple(int(v) for v in f) for f in faces), key=lambda f: (f[2] * f[3], f))
        side, cx, cy = FACE_MARGIN * max(w, h), x + w / 2, y + h / 2
        W, H = image.size
        return (max(0, round(cx - side / 2)), max(0, round(cy - side / 2)),
                min(W, round(cx + side / 2)), min(H, round(cy + side / 2)))

    def __call__(self, image):
        """(cropped image, whether a face was found); the whole image when none is."""
        b = self.box(image)
        return (image, False) if b is None else (image.crop(b), True)
