"""Tests of the synthetic MMFR generator (sharding/synthetic)."""
from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sharding.schema import (
    AUTHENTICITY_ATTRIBUTES,
    EVAL_QUESTION,
    FORGERY_ATTRIBUTES,
    GENERATORS,
    conclusion_label,
)
from sharding.synthetic import SyntheticSummary, generate_mmfr

REPO = Path(__file__).resolve().parents[3]
TRAIN, EVAL_M = 40, 6


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def image_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix != ".json"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, SyntheticSummary]:
    root = tmp_path_factory.mktemp("mmfr")
    summary = generate_mmfr(root, TRAIN, EVAL_M, seed=7)
    return root, summary


def test_layout_is_exactly_the_released_one(dataset):
    root, summary = dataset
    assert sorted(p.name for p in root.iterdir()) == [
        "diffusiondb", "evaluation_sets", "forgery_reasoning_cot.json", "laion"]

    parts = sorted(p.name for p in (root / "diffusiondb").iterdir() if p.is_dir())
    assert parts == [f"part-{i:06d}" for i in range(1, len(parts) + 1)] and len(parts) > 1
    fakes = sorted((root / "diffusiondb").glob("part-*/*"))
    assert len(fakes) == TRAIN // 2 and all(p.suffix == ".png" for p in fakes)
    for p in fakes:  # uuid-shaped names
        assert [len(x) for x in p.stem.split("-")] == [8, 4, 4, 4, 12]
        assert Image.open(p).format == "PNG"

    folders = sorted(p.name for p in (root / "laion").iterdir() if p.is_dir())
    assert folders == [f"{i:05d}" for i in range(len(folders))] and len(folders) > 1
    reals = sorted((root / "laion").glob("*/*"))
    assert len(reals) == TRAIN // 2
    for p in reals:
        assert p.suffix == ".jpg" and len(p.stem) == 9 and p.stem.isdigit() and p.stem.startswith(p.parent.name)
        assert Image.open(p).format == "JPEG"

    evals = root / "evaluation_sets"
    assert sorted(p.name for p in evals.iterdir()) == sorted(GENERATORS)
    for gen in GENERATORS:
        assert sorted(p.name for p in (evals / gen).iterdir()) == ["0_real", "1_fake", f"{gen}_reasoning.json"]
        n_real = len(list((evals / gen / "0_real").iterdir()))
        n_fake = len(list((evals / gen / "1_fake").iterdir()))
        assert n_real == n_fake == EVAL_M // 2
    assert list(summary.eval_per_generator) == list(GENERATORS)
    assert summary.images == TRAIN + 10 * EVAL_M == len(image_files(root))


def test_formats_vary_like_the_real_sets(dataset):
    root, summary = dataset
    evals = root / "evaluation_sets"
    real_exts = {p.suffix for p in evals.glob("*/0_real/*")}
    fake_exts = {p.suffix for p in evals.glob("*/1_fake/*")}
    assert real_exts == {".jpg", ".png"}
    assert fake_exts == {".png", ".jpg", ".webp"}
    for p in evals.glob("*/*/*.*"):
        if p.suffix != ".json":
            fmt = Image.open(p).format
            assert {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[fmt] == p.suffix, p
    sizes = {Image.open(p).size for p in root.glob("laion/*/*.jpg")}
    assert len(sizes) > 1, "image sizes should vary a little"
    assert sum(summary.formats.values()) == summary.images


def test_reasoning_json_keys_match_files_and_use_real_attribute_names(dataset):
    root, _ = dataset
    for source, names in (("diffusiondb", FORGERY_ATTRIBUTES), ("laion", AUTHENTICITY_ATTRIBUTES)):
        data = json.loads((root / source / f"{source}_reasoning.json").read_text())
        on_disk = {p for p in image_files(root) if p.startswith(source + "/")}
        assert set(data) == on_disk
        for attrs in data.values():
            assert tuple(sorted(attrs)) == tuple(sorted(names))
            assert any(attrs.values())
    nulls = 0
    for gen in GENERATORS:
        data = json.loads((root / "evaluation_sets" / gen / f"{gen}_reasoning.json").read_text())
        on_disk = {p.split("/", 1)[1] for p in image_files(root) if p.startswith(f"evaluation_sets/{gen}/")}
        assert set(data) == on_disk and all(k.startswith(f"{gen}/") for k in data)
        for key, attrs in data.items():
            expected = FORGERY_ATTRIBUTES if "/1_fake/" in key else AUTHENTICITY_ATTRIBUTES
            assert set(attrs) == set(expected)
            assert all(v is None or (isinstance(v, str) and v) for v in attrs.values())
            nulls += sum(v is None for v in attrs.values())
    assert nulls > 0, "some attributes should be null"


def test_cot_records_cover_every_training_image_with_right_conclusions(dataset):
    root, summary = dataset
    records = json.loads((root / "forgery_reasoning_cot.json").read_text())
    assert isinstance(records, list) and len(records) == summary.records
    train_images = {p for p in image_files(root) if not p.startswith("evaluation_sets/")}
    per_image: dict[str, int] = {}
    spellings: collections.Counter[str] = collections.Counter()
    ids = set()
    questions = set()
    for rec in records:
        assert set(rec) == {"id", "image", "conversations"}
        assert rec["id"] not in ids
        ids.add(rec["id"])
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt"
        questions.add(human["value"].split("\n", 1)[1])
        answer = gpt["value"]
        # The real MMFR layout: SUMMARY, CAPTION, REASONING, CONCLUSION, in order.
        tags = ["<SUMMARY>", "</SUMMARY>", "<CAPTION>", "</CAPTION>", "<REASONING>", "</REASONING>",
                "<CONCLUSION>", "</CONCLUSION>"]
        assert [answer.index(t) for t in tags] == sorted(answer.index(t) for t in tags)
        assert answer.startswith("<SUMMARY>") and answer.endswith("</CONCLUSION>")
        spellings[answer[answer.index("<CONCLUSION>"):].split("This image is")[0]] += 1
        expected = 1 if rec["image"].startswith("diffusiondb/") else 0
        assert conclusion_label(answer) == expected
        names = FORGERY_ATTRIBUTES if expected else AUTHENTICITY_ATTRIBUTES
        assert any(f"{n}:" in answer for n in names)
        per_image[rec["image"]] = per_image.get(rec["image"], 0) + 1
    assert set(per_image) == train_images
    # Most records put one space after the tag, as the real data does; a minority
    # use other whitespace, so that every stage meets both.
    canonical = spellings["<CONCLUSION> "] / sum(spellings.values())
    assert 0.7 < canonical < 0.97 and len(spellings) >= 3, spellings
    several = sum(n > 1 for n in per_image.values())
    assert 0 < several < len(train_images) and several == summary.images_with_several_records
    assert EVAL_QUESTION in questions and len(questions) > 1


def test_same_seed_same_bytes_regardless_of_workers_and_other_seed_differs(tmp_path):
    a = generate_mmfr(tmp_path / "a", 12, 2, seed=3)
    b = generate_mmfr(tmp_path / "b", 12, 2, seed=3, workers=2)
    c = generate_mmfr(tmp_path / "c", 12, 2, seed=4)
    assert a.images == b.images == c.images == 32
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    # Per-image seeding: the first images do not change when more are asked for.
    generate_mmfr(tmp_path / "d", 14, 2, seed=3)
    for rel in ("laion/00000/000000000.jpg", "evaluation_sets/flux/1_fake/flux_00000.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "d" / rel).read_bytes()


def test_refuses_to_mix_with_an_existing_dataset_unless_overwrite(tmp_path):
    generate_mmfr(tmp_path, 8, 2, seed=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_mmfr(tmp_path, 4, 2, seed=0)
    generate_mmfr(tmp_path, 4, 2, seed=0, overwrite=True)
    assert len(list(tmp_path.glob("diffusiondb/part-*/*.png"))) == 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(train_images=10, eval_images_per_generator=3), "eval_images_per_generator"),
    (dict(train_images=1, eval_images_per_generator=2), "train_images"),
    (dict(train_images=10, eval_images_per_generator=2, image_size=60), "image_size"),
    (dict(train_images=10, eval_images_per_generator=2, null_fraction=1.5), "null_fraction"),
])
def test_bad_arguments_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate_mmfr(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def _fold_feature(path: Path) -> np.ndarray:
    """Signed 8x8-periodic component of the high-pass residual (what a conv filter sees)."""
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).mean(axis=2)
    h, w = a.shape[0] // 8 * 8, a.shape[1] // 8 * 8
    a = a[:h, :w]
    pad = np.pad(a, 1, mode="edge")
    residual = a - sum(pad[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    return residual.reshape(h // 8, 8, w // 8, 8).mean(axis=(0, 2)).ravel()


def test_trace_is_learnable_and_transfers_unevenly(tmp_path):
    generate_mmfr(tmp_path, 160, 40, seed=11)
    fakes = sorted(tmp_path.glob("diffusiondb/*/*.png"))
    reals = sorted(tmp_path.glob("laion/*/*.jpg"))
    x_fake = np.stack([_fold_feature(p) for p in fakes])
    x_real = np.stack([_fold_feature(p) for p in reals])
    # Nearest centroid fitted on half of the training images, tested on the rest.
    fit_f, test_f = x_fake[::2], x_fake[1::2]
    fit_r, test_r = x_real[::2], x_real[1::2]
    direction = fit_f.mean(0) - fit_r.mean(0)
    bias = -direction @ (fit_f.mean(0) + fit_r.mean(0)) / 2

    def accuracy(xf: np.ndarray, xr: np.ndarray) -> float:
        return float(np.r_[(xf @ direction + bias) > 0, (xr @ direction + bias) <= 0].mean())

    assert accuracy(test_f, test_r) >= 0.9
    per_gen = {}
    for gen in GENERATORS:
        d = tmp_path / "evaluation_sets" / gen
        per_gen[gen] = accuracy(np.stack([_fold_feature(p) for p in sorted((d / "1_fake").iterdir())]),
                                np.stack([_fold_feature(p) for p in sorted((d / "0_real").iterdir())]))
    assert per_gen["stablediffusion"] >= 0.9, per_gen
    assert per_gen["pixart"] >= 0.8, per_gen
    for hard in ("styleganxl", "gigagan", "gpt4o", "flux"):
        assert per_gen[hard] <= 0.7, per_gen
    assert max(per_gen.values()) - min(per_gen.values()) >= 0.3, per_gen


def test_cli_help_and_run(tmp_path):
    env_cmd = [sys.executable, "-m", "sharding.synthetic"]
    helped = subprocess.run(env_cmd + ["--help"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "--eval-images-per-generator" in helped.stdout and "stablediffusion" in helped.stdout
    ran = subprocess.run(env_cmd + ["--out", str(tmp_path / "d"), "--train-images", "6",
                                    "--eval-images-per-generator", "2", "--seed", "1", "--quiet"],
                         cwd=REPO, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert "3 fakes (diffusiondb), 3 reals (laion)" in ran.stdout
    bad = subprocess.run(env_cmd + ["--out", str(tmp_path / "e"), "--train-images", "6",
                                    "--eval-images-per-generator", "3"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "eval_images_per_generator" in bad.stderr
