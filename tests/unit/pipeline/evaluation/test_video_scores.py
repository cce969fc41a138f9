"""Video-level scores of video sets (frames of the real sharder's output), and the optional
face crop on a synthetic face."""
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from pipeline.evaluation.video import FACE_MARGIN, aggregate_videos, video_of, video_set_metrics

sys.path.insert(0, str(Path(__file__).parents[2] / "sharding"))  # the miniature-benchmark writers
from _eval_set_fixtures import run as shard_benchmark  # noqa: E402
from _eval_set_fixtures import write_video  # noqa: E402


def test_video_of_reads_the_sharders_frame_names():
    assert video_of("Celeb-real/id0_0000.mp4/frame-000005.png") == "Celeb-real/id0_0000.mp4"
    assert video_of("manipulated_sequences/Deepfakes/c23/videos/000_003.mp4/frame-000000.png") == \
        "manipulated_sequences/Deepfakes/c23/videos/000_003.mp4"
    assert video_of("1_fake/frame-000001.png") is None  # an image named like a frame, not under a video
    assert video_of("imagenet_ai/val/ai/x.png") is None and video_of(None) is None


def _frame(video, label, p, gen="celeb-df"):
    return {"generator": gen, "video": video, "label": label, "p_fake": p}


# Four videos. a: real, mean 0.4 -> real (right); b: fake, mean 0.6 -> fake (right);
# c: fake, 0.3 -> real (wrong); d: real, mean 0.65 -> fake (wrong).
FRAMES = ([_frame("Celeb-real/a.mp4", 0, p) for p in (0.2, 0.6)]
          + [_frame("Celeb-synthesis/b.mp4", 1, p) for p in (0.7, 0.4, 0.7)]
          + [_frame("Celeb-synthesis/c.mp4", 1, 0.3)]
          + [_frame("YouTube-real/d.mp4", 0, p) for p in (0.55, 0.75)])


def test_video_p_fake_is_the_mean_of_its_frames():
    videos = {v["video"]: v for v in aggregate_videos(FRAMES + [_frame("Celeb-real/e.mp4", 0, None)])}
    assert videos["Celeb-synthesis/b.mp4"]["p_fake"] == pytest.approx(0.6)
    assert videos["Celeb-synthesis/b.mp4"]["frames"] == 3 and videos["Celeb-synthesis/b.mp4"]["pred"] == 1
    assert videos["Celeb-real/a.mp4"]["pred"] == 0 and videos["YouTube-real/d.mp4"]["pred"] == 1
    assert videos["Celeb-real/e.mp4"]["p_fake"] is None  # no frame with a p_fake
    with pytest.raises(ValueError, match="different labels"):
        aggregate_videos([_frame("x.mp4", 0, 0.1), _frame("x.mp4", 1, 0.9)])


def test_video_metrics_by_hand():
    m = video_set_metrics(FRAMES, ["celeb-df"])
    g = m["generators"]["celeb-df"]
    assert (g["n_videos"], g["n_frames"]) == (4, 8)
    assert (g["real_acc"], g["fake_acc"], g["acc"]) == (0.5, 0.5, 0.5)
    # Fake videos score {0.6, 0.3}, real {0.4, 0.65}: of the 4 (fake, real) pairs only 0.6 > 0.4.
    assert g["auc"] == pytest.approx(0.25)
    # Frames at 0.5: right are 0.2 (real), 0.7 and 0.7 (fake): 3 of 8.
    assert g["frame_cpm_acc"] == pytest.approx(3 / 8)
    assert m["pooled"]["acc"] == 0.5 and m["average"]["n_videos"] == 4
    assert video_set_metrics([{**f, "video": None} for f in FRAMES], ["celeb-df"]) is None


def _celeb_df(tmp_path) -> str:
    src = tmp_path / "Celeb-DF-v2"
    write_video(src / "Celeb-real" / "id0_0000.mp4", 2, 5, (10, 10, 10))
    write_video(src / "Celeb-synthesis" / "id0_id1_0000.mp4", 2, 5, (30, 30, 30))
    write_video(src / "Celeb-synthesis" / "id0_id2_0001.mp4", 2, 5, (60, 60, 60))
    out = tmp_path / "celeb_out"
    assert shard_benchmark("celeb-df", src, out, "--fps", "1") == 0
    return str(out)


def test_video_table_and_field_from_real_video_shards(tmp_path):
    from modeling.config import ModelConfig
    from modeling.image_processing import ImageProcessor
    from pipeline.evaluation.data import enumerate_items, make_eval_loader
    from pipeline.evaluation.report import read_predictions, write_report

    shards = _celeb_df(tmp_path)
    items = enumerate_items({"celeb-df": shards})
    samples = [s for b in make_eval_loader(items, ImageProcessor(ModelConfig.preset("tiny")), 4, 0)
               for s in b["samples"]]
    assert len(samples) == 6 and len({s["video"] for s in samples}) == 3  # 2 frames per 2-s video at 1 fps
    # p_fake by video: the real one 0.3 and 0.45; one fake 0.8 and 0.4 (mean 0.6); the other 0.2 and 0.35.
    p_of = {"Celeb-real/id0_0000.mp4": [0.3, 0.45], "Celeb-synthesis/id0_id1_0000.mp4": [0.8, 0.4],
            "Celeb-synthesis/id0_id2_0001.mp4": [0.2, 0.35]}
    seen: dict[str, int] = {}
    rows = []
    for s in samples:
        k = seen[s["video"]] = seen.get(s["video"], -1) + 1
        rows.append({**s, "pred": None, "parse_status": "no_conclusion", "p_fake": p_of[s["video"]][k],
                     "reasoning": ""})
    out = tmp_path / "r"
    res = write_report(str(out), rows, {"celeb-df": 6}, [], {"path": "/x", "sha256": "0" * 64, "files": {}}, {})
    v = res["sets"]["celeb-df"]["video"]["pooled"]
    assert (v["n_videos"], v["real_acc"], v["fake_acc"]) == (3, 1.0, 0.5)
    assert v["auc"] == pytest.approx(0.5)  # fakes 0.6 and 0.275 against the real 0.375
    md = (out / "results.md").read_text()
    assert "**Video level**" in md and "| celeb-df | 6 |" in md
    lines = read_predictions(str(out / "predictions.jsonl"))
    assert {r["video"] for r in lines} == set(p_of)
    assert json.loads((out / "results.json").read_text())["sets"]["celeb-df"]["video"]["aggregation"].startswith("mean")


def _face(size=200) -> Image.Image:
    """A drawn frontal face (skin oval, dark eyes and brows, nose, mouth) on a dark
    background, centred at (size, size), the face about `size` px across."""
    im = Image.new("RGB", (size * 2, size * 2), (40, 60, 90))
    d = ImageDraw.Draw(im)
    c, s = size, size / 200
    d.ellipse([c - 70 * s, c - 90 * s, c + 70 * s, c + 95 * s], fill=(225, 185, 160))
    for ex in (-32, 32):
        d.ellipse([c + (ex - 16) * s, c - 33 * s, c + (ex + 16) * s, c - 17 * s], fill=(40, 30, 30))
        d.rectangle([c + (ex - 22) * s, c - 48 * s, c + (ex + 22) * s, c - 40 * s], fill=(60, 40, 30))
    d.polygon([(c, c - 10 * s), (c - 10 * s, c + 25 * s), (c + 10 * s, c + 25 * s)], fill=(200, 160, 140))
    d.ellipse([c - 28 * s, c + 42 * s, c + 28 * s, c + 58 * s], fill=(140, 60, 60))
    return im.filter(ImageFilter.GaussianBlur(2))


def test_face_crop_finds_the_synthetic_face(tmp_path, eval_shard):
    pytest.importorskip("cv2", reason="the 'face' extra (opencv-python-headless<5) is not installed")
    from modeling.config import ModelConfig
    from modeling.image_processing import ImageProcessor
    from pipeline.evaluation.data import enumerate_items, make_eval_loader
    from pipeline.evaluation.video import FaceCropper

    crop = FaceCropper()
    face = _face()
    left, top, right, bottom = crop.box(face)
    assert left < 200 < right and top < 200 < bottom  # around the face's centre
    assert 0.9 * FACE_MARGIN * 170 < right - left < 1.1 * FACE_MARGIN * 230  # ~1.3 x the face
    blank = Image.new("RGB", (400, 400), (40, 60, 90))
    assert crop.box(blank) is None and crop(blank) == (blank, False)

    # In the loader: video frames are cropped, a still image is not.
    d = eval_shard(tmp_path / "s", [("Celeb-real/a.mp4/frame-000000.png", face, 0, "g"),
                                    ("Celeb-real/a.mp4/frame-000005.png", blank, 0, "g"),
                                    ("still/face.png", face, 0, "g")])
    proc = ImageProcessor(ModelConfig.preset("tiny"))
    (batch,) = make_eval_loader(enumerate_items({"s": d}), proc, 3, 0, face_crop=True)
    by_rel = {s["relpath"]: (s, batch["pixel_values"][i]) for i, s in enumerate(batch["samples"])}
    frame, px = by_rel["Celeb-real/a.mp4/frame-000000.png"]
    assert frame["face_found"] is True and torch.equal(px, proc(face.crop(crop.box(face))))
    assert by_rel["Celeb-real/a.mp4/frame-000005.png"][0]["face_found"] is False
    still, px_still = by_rel["still/face.png"]
    assert "face_found" not in still and torch.equal(px_still, proc(face))
