"""Deterministic tar writing: fixed headers, member order, bytes unchanged, atomicity."""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helper importable
from _shard_fixtures import image_bytes  # noqa: E402
from sharding import schema  # noqa: E402
from sharding.tar_writer import (RECORD, ShardJob, ShardSample, StrictError, TarWriter,  # noqa: E402
                                 _header, write_shard)


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")


@pytest.mark.parametrize("name,size", [("a.png", 0), ("k-0123456789ab.json", 12345),
                                       ("x" * 100, 8 ** 11 - 1), ("é.jpg", 7)])
def test_hand_built_header_equals_tarfile(name, size):
    assert _header(name, size) == _tarfile_header(name, size)


def test_long_names_fall_back_to_pax():
    h = _header("y" * 150 + ".png", 10)
    assert len(h) % 512 == 0 and len(h) > 512


def _sample(tmp_path: Path, rel: str, data: bytes, label: int = 1) -> ShardSample:
    p = tmp_path / "src" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    meta = {"relpath": rel, "source": "diffusiondb", "split": "train", "label": label,
            "generator": "diffusiondb", "conversations": [[{"from": "gpt", "value": "ü"}]],
            "record_ids": ["1"], "attributes": None, "reference": "", "has_reasoning": False}
    return ShardSample(schema.sample_key(rel), rel, str(p), meta, len(data), fingerprint="x")


def test_write_shard_is_deterministic_with_fixed_fields(tmp_path):
    samples = [_sample(tmp_path, "a/one.png", image_bytes("PNG", seed=1)),
               _sample(tmp_path, "a/two.JPG", image_bytes("JPEG", seed=2), 0),
               _sample(tmp_path, "a/three.webp", image_bytes("WEBP", seed=3))]
    r1 = write_shard(ShardJob("train", 0, str(tmp_path / "s1.tar"), samples))
    r2 = write_shard(ShardJob("train", 0, str(tmp_path / "s2.tar"), samples))
    b1 = (tmp_path / "s1.tar").read_bytes()
    assert b1 == (tmp_path / "s2.tar").read_bytes() and r1.sha256 == r2.sha256
    assert r1.sha256 == hashlib.sha256(b1).hexdigest() and r1.bytes == len(b1) and len(b1) % RECORD == 0
    assert (r1.samples, r1.inputs, r1.rejected) == (3, 3, [])
    assert r1.counts["label"] == {"0": 1, "1": 2}
    with tarfile.open(tmp_path / "s1.tar") as tf:
        members = tf.getmembers()
        names = [m.name for m in members]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        # image first, then json, for every sample; extension as on disk, lower-cased
        assert names == [f"{s.key}.{ext}" for s, e in zip(samples, ["png", "jpg", "webp"])
                         for ext in (e, "json")]
        for s in samples:
            data = tf.extractfile(f"{s.key}.{s.relpath.rsplit('.', 1)[1].lower()}").read()
            assert data == Path(s.path).read_bytes()  # never re-encoded
            meta = json.loads(tf.extractfile(f"{s.key}.json").read())
            assert set(schema.METADATA_FIELDS) <= set(meta)
            assert meta["sha256"] == hashlib.sha256(data).hexdigest()
            assert meta["conversations"][0][0]["value"] == "ü"
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_bad_image_is_skipped_or_strict(tmp_path):
    good = _sample(tmp_path, "a/good.png", image_bytes("PNG"))
    bad = _sample(tmp_path, "a/bad.png", image_bytes("PNG")[:40])
    res = write_shard(ShardJob("train", 0, str(tmp_path / "s.tar"), [good, bad]))
    assert res.samples == 1 and res.inputs == 2
    assert res.rejected == [{"path": "a/bad.png", "reason": "truncated", "kind": "image",
                             "detail": res.rejected[0]["detail"]}]
    with pytest.raises(StrictError, match="bad.png: truncated"):
        write_shard(ShardJob("train", 0, str(tmp_path / "t.tar"), [good, bad], strict=True))
    assert not (tmp_path / "t.tar").exists()  # nothing under the final name
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_in_memory_samples_and_partial_never_visible(tmp_path):
    s = ShardSample("k", "x/k.png", None, _sample(tmp_path, "x/k.png", b"z").metadata, data=image_bytes("PNG"))
    write_shard(ShardJob("train", 0, str(tmp_path / "m.tar"), [s]))
    with tarfile.open(tmp_path / "m.tar") as tf:
        assert tf.extractfile("k.png").read() == s.data
    w = TarWriter(str(tmp_path / "p.tar"))
    w.add("a.png", b"123")
    assert not (tmp_path / "p.tar").exists() and os.path.exists(w.tmp_path)
    w.abort()
    assert not os.path.exists(w.tmp_path)


def test_tar_readable_by_stream_reader(tmp_path):
    s = _sample(tmp_path, "a/one.png", image_bytes("PNG"))
    write_shard(ShardJob("train", 0, str(tmp_path / "s.tar"), [s]))
    with tarfile.open(fileobj=io.BytesIO((tmp_path / "s.tar").read_bytes()), mode="r|") as tf:
        assert [m.name for m in tf] == [f"{s.key}.png", f"{s.key}.json"]
