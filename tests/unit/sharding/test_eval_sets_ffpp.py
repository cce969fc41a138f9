"""`ffpp` with the LQ preset (c40) and FaceForensics++'s official split file (dataset/splits/test.json),
and `--list` showing every registered benchmark with its layout."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _eval_set_fixtures import read_out, run, write_video  # noqa: E402
from sharding.eval_sets.cli import main as cli_main  # noqa: E402
from sharding.eval_sets.video import read_pairs  # noqa: E402

ORIG = "original_sequences/youtube/{c}/videos/{v}.mp4"
MANI = "manipulated_sequences/{m}/{c}/videos/{v}.mp4"


def test_read_pairs_keeps_both_directions(tmp_path):
    split = tmp_path / "test.json"
    split.write_text(json.dumps([["953", "974"], ["012", "026"]]))  # the first two pairs of the release
    assert read_pairs(str(split)) == ({"953", "974", "012", "026"}, {"953_974", "974_953", "012_026", "026_012"})
    split.write_text(json.dumps({"953": "974"}))
    try:
        read_pairs(str(split))
    except ValueError as exc:
        assert "[target, source] id pairs" in str(exc)
    else:
        raise AssertionError("a split file that is not a list of pairs must be refused")


def test_ffpp_c40_preset_with_official_test_split(tmp_path, capsys):
    src = tmp_path / "FaceForensics++"
    for v in ("000", "003", "001"):  # 001 is a training video
        write_video(src / ORIG.format(c="c40", v=v), 1, 4, (10, 10, 10))
    write_video(src / ORIG.format(c="c23", v="000"), 1, 4, (10, 10, 10))  # other compression: not read
    for v in ("000_003", "003_000", "001_002"):
        write_video(src / MANI.format(m="Deepfakes", c="c40", v=v), 1, 4, (20, 20, 20))
    write_video(src / MANI.format(m="Face2Face", c="c40", v="000_003"), 1, 4, (30, 30, 30))  # 003_000 absent
    # DeepFakeDetection uses other names and is in no split: skipped whole, no missing count
    write_video(src / MANI.format(m="DeepFakeDetection", c="c40", v="01_02__walking__ABCDEFGH"), 1, 4, (40, 40, 40))
    (src / "splits").mkdir()
    (src / "splits/test.json").write_text(json.dumps([["000", "003"]]))

    out = tmp_path / "out"
    assert run("ffpp", src, out, "--preset", "c40", "--max-frames", "1") == 0
    sets = read_out(out)
    assert sorted(sets) == ["Deepfakes", "Face2Face", "youtube"]
    videos = {g: sorted((m["relpath"].rsplit("/", 1)[0], m["label"]) for _, _, m in s) for g, (s, _) in sets.items()}
    assert videos == {
        "youtube": [(ORIG.format(c="c40", v="000"), 0), (ORIG.format(c="c40", v="003"), 0)],
        "Deepfakes": [(MANI.format(m="Deepfakes", c="c40", v="000_003"), 1),
                      (MANI.format(m="Deepfakes", c="c40", v="003_000"), 1)],
        "Face2Face": [(MANI.format(m="Face2Face", c="c40", v="000_003"), 1)]}
    # a frame's video is its relpath's parent; its generator the method folder
    assert all(m["relpath"].endswith("/frame-000000.png") and m["generator"] == g and m["source"] == "ffpp"
               for g, (s, _) in sets.items() for _, _, m in s)
    assert [(r["path"], r["reason"]) for r in sets["Face2Face"][1]["rejected"]] == [
        (MANI.format(m="Face2Face", c="c40", v="003_000"), "missing")]
    overview = json.loads((out / "benchmark.json").read_text())
    assert overview["selection"] == {"videos_found": 8, "videos_selected": 5,
                                     "split_file": str(src / "splits/test.json"), "videos_not_in_split": 3,
                                     "split_videos_missing": 1}
    assert overview["arguments"]["adapter_options"]["preset"] == "c40"
    assert overview["arguments"]["adapter_options"]["include"] == ["*/c40/videos/*"]
    assert "videos_not_in_split 3" in capsys.readouterr().out

    # Without the split file every c40 video is kept; a given --pairs-list replaces the found one.
    (src / "splits/test.json").rename(src / "other.json")
    assert run("ffpp", src, tmp_path / "all", "--preset", "c40", "--max-frames", "1") == 0
    assert sum(len(s) for s, _ in read_out(tmp_path / "all").values()) == 8
    assert run("ffpp", src, tmp_path / "bad", "--preset", "c99") == 2
    (src / "broken.json").write_text("[[")
    assert run("ffpp", src, tmp_path / "bad2", "--pairs-list", src / "broken.json") == 2


def test_list_shows_new_benchmarks_with_layouts(capsys):
    assert cli_main(["--list"]) == 0
    text = capsys.readouterr().out
    for name, adapter in (("loki", "loki"), ("bfree", "folder"), ("bfree-viral", "manifest"), ("ffpp", "video")):
        assert f"\n{name}  [{adapter}]\n" in f"\n{text}"
    assert "--preset c40: LQ" in text and "--preset c23 (default)" in text and "splits/test.json" in text
    assert "true_or_false.json" in text and "BFree_viral_images.csv" in text and "SRC/RAISE/" in text
    assert "layout read from opendatalab/LOKI" in text and "layout read from grip-unina/B-Free" in text
