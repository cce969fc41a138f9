"""The MMFR reader: candidates, metadata, and every annotation/input problem."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _shard_fixtures import image_bytes, make_mmfr, record, rewrite_json, write  # noqa: E402
from sharding import schema  # noqa: E402
from sharding.mmfr import scan_mmfr  # noqa: E402
from sharding.tar_writer import StrictError  # noqa: E402


def _reasons(scan, set_name="train"):
    return {(r.path, r.reason) for r in scan.rejected.get(set_name, [])}


def _by_rel(scan, set_name="train"):
    return {s.relpath: s for s in scan.samples[set_name]}


def test_valid_layout(tmp_path):
    spec = make_mmfr(tmp_path, n_train=3, gens=("flux", "dalle3"), n_eval=2)
    scan = scan_mmfr(str(tmp_path))
    assert list(scan.samples) == ["train", "eval/dalle3", "eval/flux"]  # reference generator order
    assert not any(scan.rejected.values())
    train = _by_rel(scan)
    assert len(train) == 6 and scan.images_seen("train") == 6
    fake = train["diffusiondb/part-000001/fake-000.png"]
    m = fake.metadata
    assert (m["label"], m["source"], m["generator"], m["split"]) == (1, "diffusiondb", "diffusiondb", "train")
    assert m["record_ids"] == ["f0", "f0b"] and len(m["conversations"]) == 2
    assert m["conversations"][0] == spec["records"][0]["conversations"]
    assert m["attributes"] == spec["reasoning"]["diffusiondb/diffusiondb_reasoning.json"][fake.relpath]
    assert m["reference"] == schema.reference_text(m["attributes"]) and m["has_reasoning"]
    assert fake.key == schema.sample_key(fake.relpath) and fake.size == (tmp_path / fake.relpath).stat().st_size
    assert train["laion/00000/000000001.jpg"].metadata["label"] == 0
    ev = _by_rel(scan, "eval/flux")
    real = ev["evaluation_sets/flux/0_real/flux_0_1.png"].metadata
    assert (real["label"], real["source"], real["generator"], real["split"]) == (0, "flux", "flux", "eval")
    assert real["conversations"] == [] and real["has_reasoning"]
    assert real["attributes"] == spec["reasoning"]["evaluation_sets/flux/flux_reasoning.json"]["flux/0_real/flux_0_1.png"]
    # deterministic: same scan twice
    again = scan_mmfr(str(tmp_path))
    assert [s.relpath for s in again.samples["train"]] == [s.relpath for s in scan.samples["train"]]


def test_bad_annotations_and_inputs(tmp_path):
    make_mmfr(tmp_path, n_train=3, gens=("flux",), n_eval=2)
    write(tmp_path / "diffusiondb/part-000001/orphan.png", image_bytes("PNG"))  # no annotation
    write(tmp_path / "laion/00000/empty.jpg", b"")  # zero-byte
    write(tmp_path / "laion/00000/notes.txt", b"hello")  # not an image extension
    write(tmp_path / "evaluation_sets/flux/other/x.png", image_bytes("PNG"))  # unknown label folder
    write(tmp_path / "evaluation_sets/flux/1_fake/unannotated.png", image_bytes("PNG"))  # kept

    def edit(recs):
        recs.append(record("gone", "laion/00000/999999999.jpg", 0))  # image missing on disk
        recs.append(record("conflict", "laion/00000/000000001.jpg", 1))  # real source, fake answer
        recs.append(record("empty", "laion/00000/empty.jpg", 0))
        bad = record("nocon", "laion/00000/000000002.jpg", 0)
        bad["conversations"][1]["value"] = "no conclusion tag here"
        recs.append(bad)
        recs.append({"id": "broken", "conversations": []})  # no image
        return recs

    rewrite_json(tmp_path, "forgery_reasoning_cot.json", edit)
    # laion/00000/000000002.jpg now has only its good record: it stays
    scan = scan_mmfr(str(tmp_path))
    got = _reasons(scan)
    assert ("diffusiondb/part-000001/orphan.png", "no_annotation") in got
    assert ("laion/00000/empty.jpg", "zero_byte") in got
    assert ("laion/00000/notes.txt", "unsupported_extension") in got
    assert ("laion/00000/999999999.jpg", "missing") in got
    assert ("laion/00000/000000001.jpg", "label_conflict") in got
    assert any(r == "no_conclusion" for _, r in got)
    assert any(r == "malformed_record" for _, r in got)
    assert ("evaluation_sets/flux/other/x.png", "unknown_label_folder") in _reasons(scan, "eval/flux")
    train = _by_rel(scan)
    assert "laion/00000/000000002.jpg" in train and "laion/00000/000000001.jpg" not in train
    flux = _by_rel(scan, "eval/flux")
    assert flux["evaluation_sets/flux/1_fake/unannotated.png"].metadata["has_reasoning"] is False
    assert flux["evaluation_sets/flux/1_fake/unannotated.png"].metadata["reference"] == ""
    # reconciliation at image level: every image seen is a sample or an image rejection
    image_rej = [r for r in scan.rejected["train"] if r.kind == "image"]
    assert scan.images_seen("train") == len(scan.samples["train"]) + len(image_rej)
    assert len(scan.samples["train"]) == 6 - 1  # 000000001 rejected


def test_missing_and_malformed_json_files(tmp_path):
    make_mmfr(tmp_path, n_train=2, gens=("flux",), n_eval=2)
    (tmp_path / "forgery_reasoning_cot.json").unlink()
    (tmp_path / "evaluation_sets/flux/flux_reasoning.json").write_text("{not json")
    scan = scan_mmfr(str(tmp_path))
    assert ("forgery_reasoning_cot.json", "missing_json") in _reasons(scan)
    assert scan.samples["train"] == []  # no conversations: every training image rejected
    assert sum(r.reason == "no_annotation" for r in scan.rejected["train"]) == 4
    assert ("evaluation_sets/flux/flux_reasoning.json", "malformed_json") in _reasons(scan, "eval/flux")
    assert all(not s.metadata["has_reasoning"] for s in scan.samples["eval/flux"])
    assert len(scan.samples["eval/flux"]) == 4

    (tmp_path / "forgery_reasoning_cot.json").write_text(json.dumps({"not": "a list"}))
    scan = scan_mmfr(str(tmp_path))
    assert ("forgery_reasoning_cot.json", "malformed_json") in _reasons(scan)


def test_malformed_attribute_entry(tmp_path):
    make_mmfr(tmp_path, n_train=2, gens=("flux",), n_eval=2)
    rewrite_json(tmp_path, "evaluation_sets/flux/flux_reasoning.json",
                 lambda d: {**d, "flux/1_fake/flux_1_0.png": ["not", "a", "dict"]})
    scan = scan_mmfr(str(tmp_path))
    assert any(r.reason == "malformed_attributes" for r in scan.rejected["eval/flux"])
    assert _by_rel(scan, "eval/flux")["evaluation_sets/flux/1_fake/flux_1_0.png"].metadata["has_reasoning"] is False


def test_unicode_and_space_names(tmp_path):
    make_mmfr(tmp_path, n_train=1, gens=("flux",), n_eval=2)
    rel = "laion/00000/ünïcødé näme 1.jpg"
    write(tmp_path / rel, image_bytes("JPEG"))
    rewrite_json(tmp_path, "forgery_reasoning_cot.json", lambda recs: recs + [record("u", rel, 0)])
    scan = scan_mmfr(str(tmp_path))
    s = _by_rel(scan)[rel]
    assert s.key == schema.sample_key(rel) and "." not in s.key and " " not in s.key


def test_strict_stops_naming_the_file(tmp_path):
    make_mmfr(tmp_path, n_train=2, gens=("flux",), n_eval=2)
    write(tmp_path / "diffusiondb/part-000001/orphan.png", image_bytes("PNG"))
    with pytest.raises(StrictError, match="orphan.png: no_annotation"):
        scan_mmfr(str(tmp_path), strict=True)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        scan_mmfr(str(tmp_path / "nope"))


def test_reasoning_index_is_the_position_in_the_json_file(tmp_path):
    """The reference evaluation selects images in <gen>_reasoning.json order; the
    samples are sorted by path, so the file position is kept as metadata."""
    make_mmfr(tmp_path, n_train=1, gens=("flux",), n_eval=2)
    write(tmp_path / "evaluation_sets/flux/1_fake/unlisted.png", image_bytes("PNG"))
    # Reverse the file: positions must follow the file, not the paths.
    rewrite_json(tmp_path, "evaluation_sets/flux/flux_reasoning.json", lambda d: dict(reversed(list(d.items()))))
    order = list(json.loads((tmp_path / "evaluation_sets/flux/flux_reasoning.json").read_text()))
    flux = _by_rel(scan_mmfr(str(tmp_path)), "eval/flux")
    for position, key in enumerate(order):
        assert flux[f"evaluation_sets/{key}"].metadata["reasoning_index"] == position
    assert flux["evaluation_sets/flux/1_fake/unlisted.png"].metadata["reasoning_index"] is None
    assert order[0] == "flux/1_fake/flux_1_1.png"  # the reversal did change the order
