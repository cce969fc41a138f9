"""End to end: synthetic MMFR -> `bash launch/shard_mmfr.sh` -> read back with
webdataset and tarfile; every valid image exactly once, bytes and annotations
intact, bad inputs listed, no single-label training shard, verify passes."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from sharding import schema
from sharding.synthetic import generate_mmfr

REPO = Path(__file__).resolve().parents[2]


def _expected(root: Path) -> dict[str, dict]:
    """relpath -> what the sample must hold, computed from the raw files independently."""
    exp = {}
    cot = json.loads((root / "forgery_reasoning_cot.json").read_text())
    convs: dict[str, list] = {}
    for r in cot:
        convs.setdefault(r["image"], []).append(r["conversations"])
    for src, label in schema.TRAIN_SOURCE_LABEL.items():
        attrs = json.loads((root / src / f"{src}_reasoning.json").read_text())
        for p in sorted((root / src).rglob("*")):
            if p.suffix.lower().lstrip(".") in schema.IMAGE_EXTENSIONS:
                rel = p.relative_to(root).as_posix()
                exp[rel] = {"label": label, "generator": src, "split": "train",
                            "conversations": convs[rel], "attributes": attrs.get(rel)}
    for gen in schema.GENERATORS:
        gdir = root / "evaluation_sets" / gen
        attrs = json.loads((gdir / f"{gen}_reasoning.json").read_text())
        for folder, label in schema.EVAL_LABEL_FOLDERS.items():
            for p in sorted((gdir / folder).iterdir()):
                rel = p.relative_to(root).as_posix()
                exp[rel] = {"label": label, "generator": gen, "split": "eval",
                            "conversations": convs.get(rel, []),
                            "attributes": attrs.get(f"{gen}/{folder}/{p.name}")}
    for rel, e in exp.items():
        e["sha256"] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    return exp


@pytest.mark.slow
def test_shard_mmfr_end_to_end(tmp_path):
    root = tmp_path / "mmfr"
    generate_mmfr(root, train_images=60, eval_images_per_generator=6, seed=7)
    expected = _expected(root)
    # bad inputs that must be skipped and listed, not lost silently
    (root / "evaluation_sets/gpt4o/0_real/zero.jpg").write_bytes(b"")
    jpg = next(p for p in sorted((root / "laion").rglob("*.jpg")))
    (root / "laion/00000/orphan.jpg").write_bytes(jpg.read_bytes())  # no annotation
    png = next(p for p in sorted((root / "diffusiondb").rglob("*.png")))
    (root / "evaluation_sets/flux/1_fake/truncated.png").write_bytes(png.read_bytes()[:-40])

    out = tmp_path / "shards"
    cmd = ["bash", str(REPO / "launch/shard_mmfr.sh"), str(root), str(out), "--workers", "2",
           "--max-samples-per-shard", "16", "--plan-ranks", "2", "--plan-workers", "2", "--seed", "1"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    for word in ("total", "zero_byte", "truncated", "no_annotation"):
        assert word in res.stdout
    assert "eval/flux: 1 shard(s) < --plan-ranks x --plan-workers = 4" in res.stderr

    urls = sorted(str(p) for p in out.rglob("shard-*.tar"))
    train_urls = [u for u in urls if "/train/" in u]
    assert len(train_urls) == 4
    # 1) webdataset
    seen: Counter = Counter()
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        img = sample[meta["image_ext"]]
        e = expected[meta["relpath"]]
        assert hashlib.sha256(img).hexdigest() == e["sha256"] == meta["sha256"]
        assert sample["__key__"] == schema.sample_key(meta["relpath"])
        for f in ("label", "generator", "split", "conversations", "attributes"):
            assert meta[f] == e[f], (meta["relpath"], f)
        assert set(schema.METADATA_FIELDS) <= set(meta)
        assert meta["has_reasoning"] == (e["attributes"] is not None)
        seen[meta["relpath"]] += 1
    assert seen == Counter({rel: 1 for rel in expected})  # every valid image exactly once
    # 2) tarfile, shard by shard: member order and no single-label training shard
    for url in urls:
        with tarfile.open(url) as tf:
            members = tf.getmembers()
        keys = [m.name.split(".", 1)[0] for m in members]
        assert keys[::2] == keys[1::2] and all(m.name.endswith(".json") for m in members[1::2])
        if url in train_urls:
            labels = set()
            with tarfile.open(url) as tf:
                for m in members[1::2]:
                    labels.add(json.loads(tf.extractfile(m).read())["label"])
            assert labels == {0, 1}, url
    # manifests: reconciliation and listed rejections
    train = json.loads((out / "train/manifest.json").read_text())
    assert train["inputs"] == {"images_seen": 61, "written": 60, "rejected": 1}
    assert [(r["path"], r["reason"]) for r in train["rejected"]] == [("laion/00000/orphan.jpg", "no_annotation")]
    gpt4o = json.loads((out / "eval/gpt4o/manifest.json").read_text())
    assert [(r["path"], r["reason"]) for r in gpt4o["rejected"]] == [("evaluation_sets/gpt4o/0_real/zero.jpg",
                                                                       "zero_byte")]
    flux = json.loads((out / "eval/flux/manifest.json").read_text())
    assert flux["inputs"] == {"images_seen": 7, "written": 6, "rejected": 1}
    assert flux["rejected"][0]["path"] == "evaluation_sets/flux/1_fake/truncated.png"
    assert json.loads((out / "eval/flux/sizes.json").read_text()) == {"shard-000000.tar": 6}
    # verification passes; a rerun of the same command reuses everything
    ver = subprocess.run([sys.executable, "-m", "sharding.verify", str(out), "--deep"],
                         capture_output=True, text=True, cwd=REPO)
    assert ver.returncode == 0, ver.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "0 shard(s) written, 14 already complete" in again.stdout
