"""Benchmark adapters, each on a miniature of its layout written here."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _eval_set_fixtures import img_bytes, put, read_out, run, write_video  # noqa: E402
from sharding import schema  # noqa: E402
from sharding.eval_sets.cli import main as cli_main  # noqa: E402
from sharding.eval_sets.common import STAGING_DIR  # noqa: E402
from sharding.eval_sets.parquet import sniff_ext  # noqa: E402
from sharding.eval_sets.video import extract_frames  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def test_folder_genimage(tmp_path, capsys):
    src = tmp_path / "GenImage"
    originals = {}
    for gen in ("imagenet_ai_0419_sdv4", "imagenet_ai_0508_adm"):
        for i in range(2):
            originals[f"{gen}/val/ai/{i}.png"] = put(src, f"{gen}/val/ai/{i}.png", img_bytes(color=(i, 1, 2)))
            originals[f"{gen}/val/nature/n{i}.JPEG"] = put(src, f"{gen}/val/nature/n{i}.JPEG", img_bytes("JPEG"))
        put(src, f"{gen}/train/ai/skipped.png", img_bytes())
    put(src, "README.txt", b"hello")
    out = tmp_path / "out"
    assert run("genimage", src, out) == 0
    sets = read_out(out)
    assert sorted(sets) == ["imagenet_ai_0419_sdv4", "imagenet_ai_0508_adm"]
    got = {m["relpath"]: (data, m) for samples, _ in sets.values() for _, data, m in samples}
    assert set(got) == set(originals)  # train/ skipped, README not an image
    for rel, (data, m) in got.items():
        assert data == originals[rel]  # bytes unchanged, under their own extension
        assert m["label"] == (1 if "/ai/" in rel else 0) and m["generator"] == rel.split("/")[0]
        assert (m["source"], m["split"], m["reference"], m["has_reasoning"]) == ("genimage", "eval", "", False)
        assert m["image_ext"] == ("jpeg" if rel.endswith("JPEG") else "png")
    overview = json.loads((out / "benchmark.json").read_text())
    assert overview["benchmark"] == "genimage"
    assert [(r["path"], r["reason"]) for r in overview["other_files"]] == [("README.txt", "unsupported_extension")]
    assert "written" in capsys.readouterr().out


def test_folder_chameleon_and_universalfakedetect(tmp_path):
    cham = tmp_path / "Chameleon"
    put(cham, "test/0_real/a.jpg", img_bytes("JPEG"))
    put(cham, "test/1_fake/b.png", img_bytes())
    assert run("chameleon", cham, tmp_path / "c") == 0
    sets = read_out(tmp_path / "c")
    assert list(sets) == ["chameleon"]
    assert sorted(m["label"] for _, _, m in sets["chameleon"][0]) == [0, 1]

    ufd = tmp_path / "CNNSpot"
    put(ufd, "progan/airplane/0_real/1.png", img_bytes())
    put(ufd, "progan/cat/1_fake/2.png", img_bytes())
    put(ufd, "biggan/0_real/3.png", img_bytes())
    put(ufd, "biggan/1_fake/4.png", img_bytes())
    put(ufd, "biggan/unlabelled/5.png", img_bytes())
    put(ufd, "biggan/1_fake/empty.png", b"")
    put(ufd, "biggan/1_fake/broken.png", img_bytes()[:30])
    os.symlink(ufd / "biggan", ufd / "biggan" / "0_real" / "loop")  # a link cycle must not hang the scan
    assert run("universalfakedetect", ufd, tmp_path / "u") == 0
    sets = read_out(tmp_path / "u")
    assert sorted(sets) == ["biggan", "progan"]
    assert sorted((m["generator"], m["label"]) for s, _ in sets.values() for _, _, m in s) == [
        ("biggan", 0), ("biggan", 1), ("progan", 0), ("progan", 1)]
    reasons = {r["path"]: r["reason"] for r in sets["biggan"][1]["rejected"]}
    assert reasons == {"biggan/unlabelled/5.png": "no_label_folder", "biggan/1_fake/empty.png": "zero_byte",
                       "biggan/1_fake/broken.png": "truncated"}
    assert run("universalfakedetect", ufd, tmp_path / "u2", "--strict") == 1


def test_manifest_csv_and_jsonl(tmp_path):
    src = tmp_path / "bench"
    a = put(src, "imgs/a.png", img_bytes())
    b = put(src, "imgs/b.jpg", img_bytes("JPEG"))
    put(src, "imgs/c.webp", img_bytes("WEBP"))
    attrs = {"Irregular Image Edges": "The edges are jagged.", "Low Image Quality": None}
    rows = [
        {"path": "imgs/a.png", "label": 1, "generator": "sdxl", "reasoning": attrs},
        {"path": str(src / "imgs/b.jpg"), "label": "REAL", "reasoning": "A natural photo."},
        {"path": "imgs/c.webp", "label": "maybe"},
        {"path": "imgs/missing.png", "label": 0},
        {"path": "imgs/a.png", "label": 1, "generator": "sdxl"},
        {"label": 1},
    ]
    jl = src / "list.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    assert run("manifest", jl, tmp_path / "o") == 0
    sets = read_out(tmp_path / "o")
    assert sorted(sets) == ["list", "sdxl"]  # default group: the listing's name
    (_, da, ma), = sets["sdxl"][0]
    assert da == a and ma["label"] == 1 and ma["attributes"] == attrs
    assert ma["reference"] == schema.reference_text(attrs) and ma["has_reasoning"]
    (_, db, mb), = sets["list"][0]
    assert db == b and mb["label"] == 0 and mb["reference"] == "A natural photo." and mb["attributes"] is None
    reasons = sorted(r["reason"] for _, m in sets.values() for r in m["rejected"])
    assert reasons == ["bad_label", "bad_row", "bad_row", "duplicate", "missing"]
    total_seen = sum(m["inputs"]["images_seen"] for _, m in sets.values())
    assert total_seen == 7  # every row (and the broken line) is written or rejected

    csv_path = src / "list.csv"
    csv_path.write_text('path,label,generator,reasoning\nimgs/a.png,fake,,"{""Low Image Quality"": ""Blurry.""}"\n'
                        "imgs/b.jpg,0_real,,\n")
    assert run("manifest", csv_path, tmp_path / "p", "--set-name", "mybench") == 0
    sets = read_out(tmp_path / "p")
    metas = sorted((m["label"], m["reference"], m["source"]) for _, _, m in sets["mybench"][0])
    assert metas == [(0, "", "mybench"), (1, "Blurry.", "mybench")]
    bad = src / "bad.csv"
    bad.write_text("file,label\nx.png,1\n")
    assert run("manifest", bad, tmp_path / "q") == 2


def test_parquet_hub_export(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png, jpg = img_bytes(), img_bytes("JPEG")
    (tmp_path / "cf" / "data").mkdir(parents=True)
    pq.write_table(pa.table({
        "image_data": [png, jpg, b"garbage", png],
        "label": [1, 0, 1, 7],
        "model_name": ["org/model-a", "real", "org/model-a", "x"],
    }), tmp_path / "cf" / "data" / "part-0.parquet", row_group_size=2)
    # Hugging Face Image feature layout: struct {bytes, path}
    pq.write_table(pa.table({
        "image": [{"bytes": jpg, "path": "z.jpg"}],
        "label": ["fake"],
    }), tmp_path / "cf" / "hf.parquet")
    out = tmp_path / "o"
    assert run("community-forensics-eval", tmp_path / "cf" / "data", out, "--generator-column", "model_name") == 0
    sets = read_out(out)
    assert sorted(sets) == ["org__model-a", "real", "x"]  # '/' made safe for a folder name
    (_, d, m), = sets["org__model-a"][0]
    assert d == png and m["generator"] == "org/model-a" and m["relpath"] == "part-0.parquet/00000000.png"
    (_, d, m), = sets["real"][0]
    assert d == jpg and m["image_ext"] == "jpg" and m["label"] == 0
    assert [r["reason"] for r in sets["org__model-a"][1]["rejected"]] == ["not_an_image"]
    assert [r["reason"] for r in sets["x"][1]["rejected"]] == ["bad_label"]
    assert not (out / STAGING_DIR).exists()  # staged bytes removed after writing

    assert run("parquet", tmp_path / "cf" / "hf.parquet", tmp_path / "o2") == 0
    (_, d, m), = read_out(tmp_path / "o2")["hf"][0]
    assert d == jpg and m["label"] == 1 and m["source"] == "hf"
    assert run("parquet", tmp_path / "cf" / "hf.parquet", tmp_path / "o3", "--label-column", "nope") == 2
    assert sniff_ext(img_bytes("WEBP")) == "webp" and sniff_ext(b"hello") is None


def test_video_frames_celeb_df_and_ffpp(tmp_path):
    v = tmp_path / "v.mp4"
    write_video(v, seconds=3, fps=10, color=(0, 0, 200))
    frames = extract_frames(str(v), fps=2.0, max_frames=100)
    assert [i for i, _ in frames] == [0, 5, 10, 15, 20, 25]  # one frame every 0.5 s
    assert Image.open(io.BytesIO(frames[0][1])).format == "PNG"
    assert len(extract_frames(str(v), fps=2.0, max_frames=4)) == 4

    celeb = tmp_path / "Celeb-DF-v2"
    write_video(celeb / "Celeb-real" / "id0_0000.mp4", 2, 5, (10, 10, 10))
    write_video(celeb / "YouTube-real" / "00000.mp4", 2, 5, (20, 20, 20))
    write_video(celeb / "Celeb-synthesis" / "id0_id1_0000.mp4", 2, 5, (30, 30, 30))
    write_video(celeb / "Celeb-synthesis" / "id9_id1_0009.mp4", 2, 5, (40, 40, 40))  # not a test video
    (celeb / "Celeb-synthesis" / "broken.mp4").write_bytes(b"not a video")
    (celeb / "List_of_testing_videos.txt").write_text(
        "1 Celeb-real/id0_0000.mp4\n1 YouTube-real/00000.mp4\n0 Celeb-synthesis/id0_id1_0000.mp4\n"
        "0 Celeb-synthesis/broken.mp4\n")
    out = tmp_path / "celeb_out"
    assert run("celeb-df", celeb, out, "--fps", "1") == 0
    samples, manifest = read_out(out)["celeb-df"]
    rels = sorted((m["relpath"], m["label"]) for _, _, m in samples)
    assert rels == [("Celeb-real/id0_0000.mp4/frame-000000.png", 0), ("Celeb-real/id0_0000.mp4/frame-000005.png", 0),
                    ("Celeb-synthesis/id0_id1_0000.mp4/frame-000000.png", 1),
                    ("Celeb-synthesis/id0_id1_0000.mp4/frame-000005.png", 1),
                    ("YouTube-real/00000.mp4/frame-000000.png", 0), ("YouTube-real/00000.mp4/frame-000005.png", 0)]
    assert all(Image.open(io.BytesIO(d)).size == (32, 32) for _, d, _ in samples)
    assert [(r["path"], r["reason"]) for r in manifest["rejected"]] == [
        ("Celeb-synthesis/broken.mp4", "unreadable_video")]
    assert json.loads((out / "benchmark.json").read_text())["selection"] == {
        "videos_found": 5, "videos_selected": 4, "split_file": str(celeb / "List_of_testing_videos.txt"),
        "videos_not_in_split": 1, "split_videos_missing": 0}  # id9_id1_0009 is not a test video
    assert not (out / STAGING_DIR).exists()

    ffpp = tmp_path / "FF++"
    write_video(ffpp / "original_sequences/youtube/c23/videos/000.mp4", 1, 4, (1, 2, 3))
    write_video(ffpp / "manipulated_sequences/Deepfakes/c23/videos/000_003.mp4", 1, 4, (4, 5, 6))
    write_video(ffpp / "manipulated_sequences/Deepfakes/c40/videos/000_003.mp4", 1, 4, (4, 5, 6))
    assert run("ffpp", ffpp, tmp_path / "ff", "--max-frames", "1") == 0
    sets = read_out(tmp_path / "ff")
    assert sorted(sets) == ["Deepfakes", "youtube"]  # c40 excluded by the default --include
    assert [(m["label"], m["generator"]) for _, _, m in sets["Deepfakes"][0]] == [(1, "Deepfakes")]
    assert [m["label"] for _, _, m in sets["youtube"][0]] == [0]


def test_shell_entry_point_and_rerun_is_identical(tmp_path):
    src = tmp_path / "Chameleon"
    put(src, "0_real/a.png", img_bytes())
    put(src, "1_fake/b.png", img_bytes(color=(1, 1, 1)))
    out = tmp_path / "o"
    cmd = ["bash", str(REPO / "launch" / "shard_benchmark.sh"), "chameleon", str(src), str(out), "--no-progress",
           "--max-samples-per-shard", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first = (out / "chameleon" / "shard-000000.tar").read_bytes()
    res = subprocess.run([sys.executable, "-m", "sharding.eval_sets", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert res.returncode == 0 and "genimage" in res.stdout
    res = subprocess.run([sys.executable, "-m", "sharding.eval_sets", "--list"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert res.returncode == 0 and all(f"\n{n}  [" in res.stdout for n in ("loki", "bfree", "bfree-viral", "ffpp"))
    assert run("chameleon", src, out) == 0
    assert (out / "chameleon" / "shard-000000.tar").read_bytes() == first
    assert cli_main(["chameleon", str(src), str(out), "--no-progress"]) == 2  # other options, same OUT
    assert run("nonsense", src, tmp_path / "x") == 2
