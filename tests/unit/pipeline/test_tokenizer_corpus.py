"""The built tokenizer's corpus survives damaged shards: the rest of such a shard
is skipped with a warning naming it, never the run."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from pipeline.training.run import shard_corpus


def write_shard(path, first: int, n: int) -> list[int]:
    """n samples (image member, then json member); returns each image's data offset."""
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(first, first + n):
            for ext, data in (("png", os.urandom(3000)),
                              ("json", json.dumps({"conversations": [[
                                  {"from": "human", "value": f"<image>\nquestion {i}"},
                                  {"from": "gpt", "value": f"answer {i}"}]]}).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        offsets = [m.offset_data for m in tar if m.name.endswith(".png")]
    return offsets


def test_truncated_shard_contributes_what_precedes_the_cut(tmp_path, caplog):
    offsets = write_shard(tmp_path / "shard-000000.tar", 0, 5)
    write_shard(tmp_path / "shard-000001.tar", 5, 3)
    with open(tmp_path / "shard-000000.tar", "r+b") as f:
        f.truncate(offsets[2] + 1000)  # mid-image of sample 2, like an interrupted copy
    with caplog.at_level("WARNING", logger="pipeline.training"):
        texts = list(shard_corpus(str(tmp_path), 100))
    assert texts == ["\nquestion 0", "answer 0", "\nquestion 1", "answer 1"] + [
        t for i in range(5, 8) for t in (f"\nquestion {i}", f"answer {i}")]
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"reading the training shards: skipped the rest of {tmp_path / 'shard-000000.tar'}: ReadError")
    assert "unexpected end of data" in warning


def test_corrupt_metadata_skips_the_rest_of_its_shard(tmp_path, caplog):
    write_shard(tmp_path / "shard-000000.tar", 0, 2)
    with tarfile.open(tmp_path / "shard-000001.tar", "w") as tar:
        info = tarfile.TarInfo("bad.json")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"{oops"))
    write_shard(tmp_path / "shard-000002.tar", 2, 1)
    with caplog.at_level("WARNING", logger="pipeline.training"):
        texts = list(shard_corpus(str(tmp_path), 100))
    assert texts[-2:] == ["\nquestion 2", "answer 2"] and len(texts) == 6
    assert "shard-000001.tar: JSONDecodeError" in caplog.records[0].getMessage()


def test_limit_counts_samples(tmp_path):
    write_shard(tmp_path / "shard-000000.tar", 0, 3)
    write_shard(tmp_path / "shard-000001.tar", 3, 3)
    assert list(shard_corpus(str(tmp_path), 4))[-1] == "answer 3"


def test_nothing_readable_raises_naming_the_shards(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    (tmp_path / "shard-000001.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(ValueError) as e:
        list(shard_corpus(str(tmp_path), 10))
    msg = str(e.value)
    assert "no sample" in msg and "tokenizer.path" in msg
    assert "shard-000000.tar (ReadError" in msg and "shard-000001.tar (ReadError" in msg
    with pytest.raises(FileNotFoundError, match="no \\*.tar shard"):
        list(shard_corpus(str(tmp_path / "missing"), 10))


def test_a_brace_pattern_is_read_like_the_data_stream_lists_it(tmp_path):
    write_shard(tmp_path / "shard-000000.tar", 0, 2)
    write_shard(tmp_path / "shard-000001.tar", 2, 1)
    texts = list(shard_corpus(str(tmp_path / "shard-{000000..000001}.tar"), 100, roles=("gpt",)))
    assert texts == ["answer 0", "answer 1", "answer 2"]
