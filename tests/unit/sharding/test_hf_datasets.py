"""Hugging Face `datasets` reads our shards as they are, with `sharding.hf_features()`.

The spec is the packaged `webdataset` builder of `datasets`: it groups tar
members into samples by key, decodes `json` members with json.loads, and,
given `features=`, fills every declared column a sample lacks with None;
without `features=` it infers the columns from the first 5 samples of the
first tar and fails on mixed image extensions or on a key that is null in
those 5. The shards here are real ones, written into tmp_path by the MMFR
sharder (from a synthetic MMFR) and by a benchmark adapter.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
from PIL import Image

import sharding
from sharding import schema
from sharding.eval_sets.cli import main as eval_sets_main
from sharding.shard_mmfr import main as shard_mmfr_main
from sharding.synthetic import generate_mmfr

from ._shard_fixtures import image_bytes

INFERENCE_SAMPLES = 5  # datasets' WebDataset.NUM_EXAMPLES_FOR_FEATURES_INFERENCE


@pytest.fixture(scope="module")
def mmfr_shards(tmp_path_factory) -> Path:
    """A synthetic MMFR sharded into train/ (3 shards) and eval/<generator>/ (1 shard each)."""
    tmp = tmp_path_factory.mktemp("hf")
    generate_mmfr(tmp / "mmfr", train_images=40, eval_images_per_generator=10, seed=0)
    out = tmp / "shards"
    assert shard_mmfr_main([str(tmp / "mmfr"), str(out), "--workers", "1", "--no-progress",
                            "--max-samples-per-shard", "16"]) == 0
    return out


def _set_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.rglob("manifest.json"))


def _tar_samples(tar: Path) -> list[tuple[str, str, dict]]:
    """(key, image extension, json) of each sample of a shard, read with tarfile."""
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
        return [(img.name.split(".", 1)[0], img.name.split(".", 1)[1], json.loads(tf.extractfile(js).read()))
                for img, js in zip(members[::2], members[1::2])]


def _null_first_attributes(samples: list[tuple[str, str, dict]]) -> set[str]:
    """Attribute names null or absent in the first samples (what inference sees) but set later."""
    def named(ss):
        return {k for _, _, m in ss for k, v in (m["attributes"] or {}).items() if v is not None}
    return named(samples[INFERENCE_SAMPLES:]) - named(samples[:INFERENCE_SAMPLES])


def _expected_row_json(meta: dict) -> dict:
    """A shard's json as the struct column returns it: attributes spread over the declared names."""
    attrs = meta["attributes"]
    return {**meta, "attributes": None if attrs is None else {**dict.fromkeys(schema.ATTRIBUTES), **attrs}}


def _check_set(set_dir: Path, cache: Path) -> datasets.Dataset:
    """Load one shard set with datasets and compare every row with the tar and the manifest."""
    ds = sharding.load_hf_dataset(set_dir, cache_dir=str(cache))
    manifest = json.loads((set_dir / "manifest.json").read_text())
    assert len(ds) == manifest["inputs"]["written"] == manifest["totals"]["samples"] > 0, set_dir
    assert ds.features == sharding.hf_features()
    raw = {key: (ext, meta) for tar in sorted(set_dir.glob("shard-*.tar")) for key, ext, meta in _tar_samples(tar)}
    assert sorted(ds["__key__"]) == sorted(raw)
    for row in ds:
        ext, meta = raw[row["__key__"]]
        assert row["json"] == _expected_row_json(meta)
        assert schema.metadata_problems(row["json"]) == [], row["__key__"]  # declared types, nulls included
        image = sharding.hf_image(row)
        assert isinstance(image, Image.Image) and image.size == (meta["width"], meta["height"])
        assert image.format == meta["format"]
        assert [e for e in schema.IMAGE_EXTENSIONS if row[e] is not None] == [ext]
    return ds


def test_the_synthetic_shards_hold_the_irregular_cases(mmfr_shards):
    """What made plain inference fail, present in the first tar of the sets read below."""
    first = {d.relative_to(mmfr_shards).as_posix(): _tar_samples(d / "shard-000000.tar")
             for d in _set_dirs(mmfr_shards)}
    assert len(first) == 11
    mixed = {s for s, ss in first.items() if len({ext for _, ext, _ in ss[:INFERENCE_SAMPLES]}) > 1}
    assert "train" in mixed and {"eval/dalle3", "eval/gigagan"} <= mixed
    assert _null_first_attributes(first["eval/gpt4o"]) and _null_first_attributes(first["eval/midjourney"])
    assert all(m["conversations"] == [] for s, ss in first.items() if s != "train" for _, _, m in ss)


def test_train_and_every_eval_set_load_with_datasets(mmfr_shards, tmp_path):
    for set_dir in _set_dirs(mmfr_shards):
        _check_set(set_dir, tmp_path / "cache")


def test_image_columns_hold_the_original_bytes(mmfr_shards, tmp_path):
    seen = set()
    for set_dir in (mmfr_shards / "train", mmfr_shards / "eval" / "dalle3"):
        ds = sharding.load_hf_dataset(set_dir, cache_dir=str(tmp_path))
        for ext in schema.IMAGE_EXTENSIONS:
            ds = ds.cast_column(ext, datasets.Image(decode=False))
        for row in ds:
            stored = row[row["json"]["image_ext"]]["bytes"]
            assert hashlib.sha256(stored).hexdigest() == row["json"]["sha256"]
            seen.add(row["json"]["image_ext"])
    assert seen == {"jpg", "png", "webp"}


def test_glob_list_and_streaming_give_the_same_rows(mmfr_shards, tmp_path):
    tars = sorted(str(p) for p in (mmfr_shards / "train").glob("shard-*.tar"))
    assert len(tars) == 3
    by_glob = sharding.load_hf_dataset(str(mmfr_shards / "train" / "shard-*.tar"), cache_dir=str(tmp_path))
    by_list = sharding.load_hf_dataset(tars, split="test", cache_dir=str(tmp_path))
    streamed = sharding.load_hf_dataset(tars, streaming=True)
    assert by_list.split == "test"
    keys = by_glob["__key__"]
    assert by_list["__key__"] == keys == [row["__key__"] for row in streamed] and len(keys) == 40


def test_plain_load_dataset_with_the_features(mmfr_shards, tmp_path):
    """The one-liner without our helper: load_dataset("webdataset", data_files=..., features=...)."""
    tars = sorted(str(p) for p in (mmfr_shards / "train").glob("shard-*.tar"))
    ds = datasets.load_dataset("webdataset", data_files=tars, features=sharding.hf_features(), split="train",
                               cache_dir=str(tmp_path))
    assert len(ds) == 40 and {r["json"]["source"] for r in ds} == {"diffusiondb", "laion"}
    assert {r["json"]["image_ext"] for r in ds} == {"png", "jpg"}


def test_a_benchmark_set_with_mixed_formats_and_null_first_attributes(tmp_path):
    """A manifest listing (benchmark adapter writer): png/jpg/webp, and its reasoning only from row 6 on."""
    src = tmp_path / "bench"
    rows = []
    for i, (fmt, ext) in enumerate([("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")] * 3):
        rel = f"imgs/{i}.{ext}"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(image_bytes(fmt, seed=i))
        reasoning = {schema.FORGERY_ATTRIBUTES[0]: f"text {i}", schema.FORGERY_ATTRIBUTES[1]: None}
        rows.append({"path": rel, "label": i % 2, "generator": "g", **({"reasoning": reasoning} if i >= 6 else {})})
    (src / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert eval_sets_main(["manifest", str(src / "list.jsonl"), str(out), "--workers", "1", "--no-progress"]) == 0
    samples = _tar_samples(out / "g" / "shard-000000.tar")
    assert all(m["reasoning_index"] is None for _, _, m in samples)  # present although the adapter omits it
    metas = sorted((m for _, _, m in samples), key=lambda m: m["relpath"])
    assert [m["attributes"] is None for m in metas] == [True] * 6 + [False] * 3
    ds = _check_set(out / "g", tmp_path / "cache")
    assert sorted({m["image_ext"] for m in ds["json"]}) == ["jpg", "png", "webp"]
    with_reasoning = [m for m in ds["json"] if m["attributes"] is not None]
    assert len(with_reasoning) == 3 and all(m["attributes"][schema.FORGERY_ATTRIBUTES[0]] for m in with_reasoning)


def test_features_follow_the_schema_and_extensions():
    features = sharding.hf_features()
    assert list(features["json"]) == [f.name for f in schema.METADATA_SCHEMA]
    assert all(isinstance(features[e], datasets.Image) for e in schema.IMAGE_EXTENSIONS)
    assert set(features) == {"__key__", "__url__", "json", *schema.IMAGE_EXTENSIONS}
    assert set(features["json"]["attributes"]) == set(schema.ATTRIBUTES)
    assert set(sharding.hf_features(["x"])["json"]["attributes"]) == {"x"}
    # the schema module documents what the writer enforces
    assert schema.metadata_table() in schema.__doc__


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard tar found"):
        sharding.load_hf_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="gone.tar does not exist"):
        sharding.load_hf_dataset([tmp_path / "gone.tar"])


def test_importing_sharding_does_not_import_datasets():
    code = "import sys, sharding, sharding.schema; sys.exit('datasets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
