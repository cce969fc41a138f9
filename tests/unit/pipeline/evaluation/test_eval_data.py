"""Evaluation input: enumeration from sizes.json, the rank split, decoding failures."""
import io
import json

import pytest
from PIL import Image

from pipeline.evaluation.data import (
    EvalImages, EvalItem, collate, enumerate_items, expected_counts, make_eval_loader, rank_slice, read_images,
)
from sharding.tar_writer import TarWriter


class _Processor:
    """Real preprocessing is modeling's; here only the tensor shape matters."""

    def __call__(self, im):
        import torch

        return torch.zeros(3, 4, 4) + im.size[0]


def _png(w):
    buf = io.BytesIO()
    Image.new("RGB", (w, 3)).save(buf, "PNG")
    return buf.getvalue()


def _write_set(d, shards):
    """shards: list of lists of (key, image bytes or None for a missing member)."""
    d.mkdir(parents=True)
    sizes = {}
    for i, samples in enumerate(shards):
        name = f"shard-{i:06d}.tar"
        w = TarWriter(str(d / name))
        for key, data in samples:
            meta = {"label": 1, "generator": d.name, "reference": "r", "relpath": f"{key}.png", "image_ext": "png"}
            if data is not None:
                w.add(f"{key}.png", data)
            w.add(f"{key}.json", json.dumps(meta).encode())
        w.commit()
        sizes[name] = len(samples)
    (d / "sizes.json").write_text(json.dumps(sizes))


@pytest.fixture
def sets(tmp_path):
    _write_set(tmp_path / "a" / "flux", [[("k0", _png(5)), ("k1", _png(6))], [("k2", b"\x89PNG broken")]])
    _write_set(tmp_path / "a" / "dalle3", [[("k3", _png(7)), ("k4", None)]])
    _write_set(tmp_path / "b", [[("k5", _png(8))]])
    return {"mmfr": str(tmp_path / "a"), "bench": str(tmp_path / "b")}


def test_enumeration_and_limit(sets):
    items = enumerate_items(sets)
    assert expected_counts(items) == {"mmfr": 5, "bench": 1}
    # set order as given, then shard set folder, shard name and index
    assert [(i.set_name, i.url.split("/")[-2], i.index) for i in items] == [
        ("mmfr", "dalle3", 0), ("mmfr", "dalle3", 1), ("mmfr", "flux", 0), ("mmfr", "flux", 1), ("mmfr", "flux", 0),
        ("bench", "b", 0)]
    assert expected_counts(enumerate_items(sets, limit=2)) == {"mmfr": 2, "bench": 1}


@pytest.mark.parametrize("n", [0, 1, 5, 23, 24])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_slices_are_disjoint_and_cover(n, world):
    items = [EvalItem("s", f"u{i // 4}", i % 4) for i in range(n)]
    parts = [rank_slice(items, r, world) for r in range(world)]
    assert [x for p in parts for x in p] == items  # in order, each exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_every_item_once_and_failures_counted(sets, workers):
    items = enumerate_items(sets)
    batches = list(make_eval_loader(items, _Processor(), batch_size=2, num_workers=workers))
    good = [s for b in batches for s in b["samples"]]
    bad = [f for b in batches for f in b["failures"]]
    assert sorted(s["key"] for s in good) == ["k0", "k1", "k3", "k5"]
    assert sorted(f["key"] for f in bad) == ["k2", "k4"]
    assert len(good) + len(bad) == len(items)
    assert all(f["error"] for f in bad) and {f["set"] for f in bad} == {"mmfr"}
    for b in batches:
        if b["samples"]:
            assert b["pixel_values"].shape[0] == len(b["samples"])
    assert {s["key"]: s["label"] for s in good}["k5"] == 1


def test_collate_and_read_images(sets):
    items = enumerate_items(sets)
    decoded = list(EvalImages(items, _Processor()))
    batch = collate(decoded[:3])
    assert len(batch["samples"]) == 2 and batch["pixel_values"].shape == (2, 3, 4, 4)
    assert collate([d for d in decoded if d["error"]])["pixel_values"] is None
    flux0 = next(i for i in items if i.url.endswith("flux/shard-000000.tar") and i.index == 1)
    assert read_images([(flux0.url, flux0.index)]) == [_png(6)]
