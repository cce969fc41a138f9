"""`bfree` and `bfree-viral` on miniatures of B-Free's released test data (grip-unina/B-Free)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _eval_set_fixtures import img_bytes, put, read_out, run  # noqa: E402


def test_bfree_generator_folders_with_raise_reals(tmp_path):
    src = tmp_path / "extended_synthbuster"
    originals = {
        "RAISE/r0000.png": put(src, "RAISE/r0000.png", img_bytes(color=(1, 1, 1))),
        "RAISE/r0001.jpg": put(src, "RAISE/r0001.jpg", img_bytes("JPEG", color=(2, 2, 2))),
        "flux/r0000.png": put(src, "flux/r0000.png", img_bytes(color=(3, 3, 3))),
        "sd35/r0000.png": put(src, "sd35/r0000.png", img_bytes(color=(4, 4, 4))),
        "dalle2/1_fake/x.png": put(src, "dalle2/1_fake/x.png", img_bytes(color=(5, 5, 5))),
        "dalle2/0_real/y.png": put(src, "dalle2/0_real/y.png", img_bytes(color=(6, 6, 6))),  # a label folder wins
    }
    put(src, "sd35/empty.png", b"")
    put(src, "README.md", b"# extended synthbuster")
    out = tmp_path / "out"
    assert run("bfree", src, out) == 0
    sets = read_out(out)
    assert sorted(sets) == ["RAISE", "dalle2", "flux", "sd35"]  # one report row per folder, reals in RAISE
    got = {m["relpath"]: (data, m) for samples, _ in sets.values() for _, data, m in samples}
    assert set(got) == set(originals)
    for rel, (data, m) in got.items():
        assert data == originals[rel]
        assert m["generator"] == rel.split("/")[0] and m["source"] == "bfree"
        assert m["label"] == (0 if rel.startswith("RAISE/") or "/0_real/" in rel else 1)
    assert [(r["path"], r["reason"]) for r in sets["sd35"][1]["rejected"]] == [("sd35/empty.png", "zero_byte")]
    overview = json.loads((out / "benchmark.json").read_text())
    assert [r["path"] for r in overview["other_files"]] == ["README.md"]

    renamed = tmp_path / "renamed"
    put(renamed, "real_resized/a.png", img_bytes())
    put(renamed, "flux/b.png", img_bytes(color=(9, 9, 9)))
    assert run("bfree", renamed, tmp_path / "o2", "--real-dir", "real_resized") == 0
    labels = {m["generator"]: m["label"] for s, _ in read_out(tmp_path / "o2").values() for _, _, m in s}
    assert labels == {"real_resized": 0, "flux": 1}
    # Without --real-dir the renamed folder would be read as a generator (fake): the option is needed.
    assert run("bfree", renamed, tmp_path / "o3") == 0
    assert {m["label"] for s, _ in read_out(tmp_path / "o3").values() for _, _, m in s} == {1}


def test_bfree_viral_csv_with_dead_links_and_md5(tmp_path):
    src = tmp_path / "viral"
    real = put(src, "REAL/Ed7JvuVXsAUTp-j/img00400.jpg", img_bytes("JPEG", color=(1, 2, 3)))
    fake = put(src, "FAKE/FsL1ChiXwAAaVFk/img03517.webp", img_bytes("WEBP", color=(4, 5, 6)))
    put(src, "REAL/Ed7JvuVXsAUTp-j/img00418.jpg", img_bytes("PNG"))  # a placeholder page, not the image
    md5 = {n: hashlib.md5(b).hexdigest() for n, b in (("real", real), ("fake", fake))}
    header = "filename,label,source_id,date,days_since_1st_post,w,h,md5,url\n"
    rows = [
        f"REAL/Ed7JvuVXsAUTp-j/img00400.jpg,REAL,Ed7JvuVXsAUTp-j,2020-07-26 11:24:20+00:00,0.0,8.0,6.0,"
        f"{md5['real']},http://example.invalid/a.JPG",
        f"REAL/Ed7JvuVXsAUTp-j/img00418.jpg,REAL,Ed7JvuVXsAUTp-j,2020-07-27 09:54:45+00:00,0.93,8.0,6.0,"
        f"{'0' * 32},https://example.invalid/b",
        f"FAKE/FsL1ChiXwAAaVFk/img03517.webp,FAKE,FsL1ChiXwAAaVFk,2023-03-01 00:00:00+00:00,0.0,8.0,6.0,"
        f"{md5['fake']},https://example.invalid/c",
        "FAKE/FsL1ChiXwAAaVFk/img03518.png,FAKE,FsL1ChiXwAAaVFk,2023-03-02 00:00:00+00:00,1.0,8.0,6.0,"
        "ffffffffffffffffffffffffffffffff,https://example.invalid/dead",
    ]
    (src / "BFree_viral_images.csv").write_text(header + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert run("bfree-viral", src, out) == 0  # SRC: the download root holding the csv
    (samples, manifest), = read_out(out).values()
    assert sorted((m["relpath"], m["label"], m["generator"], d == (real if m["label"] == 0 else fake))
                  for _, d, m in samples) == [
        ("FAKE/FsL1ChiXwAAaVFk/img03517.webp", 1, "bfree-viral", True),
        ("REAL/Ed7JvuVXsAUTp-j/img00400.jpg", 0, "bfree-viral", True)]
    assert sorted((r["path"], r["reason"]) for r in manifest["rejected"]) == [
        ("FAKE/FsL1ChiXwAAaVFk/img03518.png", "missing"), ("REAL/Ed7JvuVXsAUTp-j/img00418.jpg", "md5_mismatch")]
    assert manifest["inputs"]["images_seen"] == 4  # every csv row is written or counted
    assert run("bfree-viral", src / "BFree_viral_images.csv", tmp_path / "o2") == 0  # or the csv itself
