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


# --- selection -------------------------------------------------------------------------------
def _write_meta_set(d, shards, with_index=True):
    """shards: lists of (relpath, label, reasoning_index or None); generator = d.name.
    A None metadata entry writes a sample without a json member."""
    d.mkdir(parents=True)
    sizes = {}
    for i, samples in enumerate(shards):
        name = f"shard-{i:06d}.tar"
        w = TarWriter(str(d / name))
        for j, s in enumerate(samples):
            key = f"s{i}_{j}"
            w.add(f"{key}.png", _png(3 + j))
            if s is None:
                continue
            rel, label, position = s
            meta = {"label": label, "generator": d.name, "reference": "r", "relpath": rel, "image_ext": "png",
                    "has_reasoning": position is not None}
            if with_index:
                meta["reasoning_index"] = position
            w.add(f"{key}.json", json.dumps(meta).encode())
        w.commit()
        sizes[name] = len(samples)
    (d / "sizes.json").write_text(json.dumps(sizes))


@pytest.fixture
def listed(tmp_path):
    """Two generators. JSON order differs from path order and from shard order; flux has
    an image that its reasoning JSON does not list."""
    g = "evaluation_sets/flux"
    _write_meta_set(tmp_path / "eval" / "flux", [
        [(f"{g}/0_real/a.png", 0, 5), (f"{g}/1_fake/a.png", 1, 1), (f"{g}/0_real/b.png", 0, 0)],
        [(f"{g}/1_fake/b.png", 1, 4), (f"{g}/1_fake/unlisted.png", 1, None), (f"{g}/0_real/c.png", 0, 2),
         (f"{g}/1_fake/c.png", 1, 3)],
    ])
    g = "evaluation_sets/dalle3"
    _write_meta_set(tmp_path / "eval" / "dalle3", [
        [(f"{g}/1_fake/z.png", 1, 0), (f"{g}/0_real/z.png", 0, 1), (f"{g}/0_real/y.png", 0, 2),
         (f"{g}/0_real/x.png", 0, 3)],
    ])
    return {"mmfr": str(tmp_path / "eval")}


def _rel(items):
    from pipeline.evaluation.data import read_shard_metadata

    metas = {}
    return [metas.setdefault(i.url, read_shard_metadata(i.url))[i.index]["relpath"].split("/", 1)[1] for i in items]


def test_reference_selection_first_per_class_in_json_order(listed):
    from pipeline.evaluation.data import plan_items

    items, sel = plan_items(listed, max_per_class=2, reasoning_sets=("mmfr",))
    # Per generator the 2 reals and 2 fakes that come first in the JSON, in shard order.
    assert _rel(items) == ["dalle3/1_fake/z.png", "dalle3/0_real/z.png", "dalle3/0_real/y.png",
                           "flux/1_fake/a.png", "flux/0_real/b.png", "flux/0_real/c.png", "flux/1_fake/c.png"]
    s = sel["mmfr"]
    assert (s.available, s.selected, s.not_in_reasoning_json, s.over_max_per_class) == (11, 7, 1, 3)
    assert s.per_generator == {"dalle3": {"real": 2, "fake": 1}, "flux": {"real": 2, "fake": 2}}
    # Without a cap: every listed image, the unlisted one left out.
    items, sel = plan_items(listed, reasoning_sets=("mmfr",))
    assert len(items) == 10 and "flux/1_fake/unlisted.png" not in _rel(items)


def test_balanced_selection_in_our_protocol_keeps_unlisted_images_last(listed):
    from pipeline.evaluation.data import plan_items

    items, sel = plan_items(listed, max_per_class=4)
    rel = _rel(items)
    assert "flux/1_fake/unlisted.png" in rel  # 3 listed fakes + the unlisted one = 4
    assert sel["mmfr"].per_generator == {"dalle3": {"real": 3, "fake": 1}, "flux": {"real": 3, "fake": 4}}
    items, _ = plan_items(listed, max_per_class=3)
    assert "flux/1_fake/unlisted.png" not in _rel(items)  # JSON-listed images come first


def test_limit_takes_the_first_images_of_the_set_in_shard_order(listed):
    from pipeline.evaluation.data import plan_items

    everything = enumerate_items(listed)
    items, sel = plan_items(listed, limit=4)
    assert items == everything[:4] and sel["mmfr"].over_limit == 7
    assert {r.split("/")[0] for r in _rel(items)} == {"dalle3"}  # not balanced: the first generator only
    # limit applies after the balanced selection
    items, _ = plan_items(listed, limit=3, max_per_class=1, reasoning_sets=("mmfr",))
    assert _rel(items) == ["dalle3/1_fake/z.png", "dalle3/0_real/z.png", "flux/1_fake/a.png"]


def test_old_shards_without_reasoning_index_are_ordered_by_path(tmp_path):
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.data import plan_items
    from pipeline.evaluation.runner import plan

    g = "evaluation_sets/flux"
    _write_meta_set(tmp_path / "eval" / "flux", [[(f"{g}/0_real/b.png", 0, 0), (f"{g}/0_real/a.png", 0, 1),
                                                  None, (f"{g}/1_fake/a.png", 1, 2)]], with_index=False)
    sets = {"mmfr": str(tmp_path / "eval")}
    items, sel = plan_items(sets, max_per_class=1)
    # a.png before b.png (path); the sample without metadata is kept: decoding will report it
    assert [(i.index) for i in items] == [1, 2, 3]
    assert (sel["mmfr"].without_reasoning_index, sel["mmfr"].unreadable_metadata) == (3, 1)
    cfg = EvalConfig(checkpoint=str(tmp_path), out="o", shards=sets["mmfr"], protocol="reference", max_per_class=1)
    with pytest.raises(RuntimeError, match="reasoning_index.*re-shard"):
        plan(cfg)
    cfg.max_per_class = None  # the whole set needs no order
    assert len(plan(cfg)[0]) == 4


@pytest.mark.parametrize("n,batch", [(0, 3), (7, 3), (23, 3), (24, 4), (5, 8)])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_slices_keep_whole_batches(n, batch, world):
    items = [EvalItem("s", "u", i) for i in range(n)]
    parts = [rank_slice(items, r, world, batch) for r in range(world)]
    assert [x for p in parts for x in p] == items
    fixed = [items[k:k + batch] for k in range(0, n, batch)]
    assert [p[k:k + batch] for p in parts for k in range(0, len(p), batch)] == fixed


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_fixed_batches_whatever_the_workers(tmp_path, workers):
    _write_set(tmp_path / "one", [[(f"k{i}", _png(4 + i)) for i in range(7)]])
    items = enumerate_items({"s": str(tmp_path / "one")})
    keys = [[s["key"] for s in b["samples"]] for b in make_eval_loader(items, _Processor(), 2, workers)]
    assert sorted(keys) == [["k0", "k1"], ["k2", "k3"], ["k4", "k5"], ["k6"]]


def test_a_selection_that_keeps_nothing_is_an_error(tmp_path):
    from pipeline.evaluation.data import plan_items

    # Shards written without the annotation files: no image is listed in a reasoning JSON.
    _write_set(tmp_path / "a" / "flux", [[("k0", _png(5)), ("k1", _png(6))]])
    with pytest.raises(ValueError, match=r"set 'mmfr' .*kept none of its 2 images \(not in the reasoning JSON: 2"):
        plan_items({"mmfr": str(tmp_path / "a")}, reasoning_sets=["mmfr"])
