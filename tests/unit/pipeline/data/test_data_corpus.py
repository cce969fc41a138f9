"""The texts read from the training shards before a run starts (pipeline/data/corpus.py):
found like the training stream finds its shards (a directory or a brace pattern,
with sizes.json), read with the stream's reader, and surviving damaged shards:
the rest of such a shard is skipped with a warning naming it, never the run."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.data.corpus import shard_corpus

WARNINGS = "pipeline.data.corpus"


def write_shard(path, first: int, n: int, word: str = "") -> list[int]:
    """n samples (image member, then json member) whose texts name their number (and
    `word`), listed in the sizes.json next to the shard; returns each image's data offset."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(first, first + n):
            for ext, data in (("png", os.urandom(3000)),
                              ("json", json.dumps({"conversations": [[
                                  {"from": "human", "value": f"<image>\nquestion {i}"},
                                  {"from": "gpt", "value": f"answer {i}{word}"}]]}).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sizes = path.parent / "sizes.json"
    counts = json.loads(sizes.read_text()) if sizes.exists() else {}
    sizes.write_text(json.dumps({**counts, path.name: n}))
    with tarfile.open(path) as tar:
        return [m.offset_data for m in tar if m.name.endswith(".png")]


def texts_of(numbers) -> list[str]:
    return [t for i in numbers for t in (f"\nquestion {i}", f"answer {i}")]


def test_truncated_shard_contributes_what_precedes_the_cut(tmp_path, caplog):
    offsets = write_shard(tmp_path / "shard-000000.tar", 0, 5)
    write_shard(tmp_path / "shard-000001.tar", 5, 3)
    with open(tmp_path / "shard-000000.tar", "r+b") as f:
        f.truncate(offsets[2] + 1000)  # mid-image of sample 2, like an interrupted copy
    with caplog.at_level("WARNING", logger=WARNINGS):
        texts = list(shard_corpus(str(tmp_path), 100))
    assert texts == texts_of([0, 1, 5, 6, 7])
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"reading the training shards: skipped the rest of {tmp_path / 'shard-000000.tar'}: ")
    assert "ReadError: unexpected end of data" in warning


def test_corrupt_metadata_skips_that_sample(tmp_path, caplog):
    write_shard(tmp_path / "shard-000000.tar", 0, 2)
    with tarfile.open(tmp_path / "shard-000001.tar", "w") as tar:
        for name, data in (("bad.json", b"{oops"), ("good.json", b'{"conversations": [[{"value": "kept"}]]}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 2, "shard-000001.tar": 2}))
    with caplog.at_level("WARNING", logger=WARNINGS):
        texts = list(shard_corpus(str(tmp_path), 100))
    assert texts == texts_of([0, 1]) + ["kept"]
    [warning] = [r.getMessage() for r in caplog.records]
    assert "skipped sample 'bad' of" in warning and "shard-000001.tar: JSONDecodeError" in warning


def test_limit_counts_samples(tmp_path):
    write_shard(tmp_path / "shard-000000.tar", 0, 3)
    write_shard(tmp_path / "shard-000001.tar", 3, 3)
    assert list(shard_corpus(str(tmp_path), 4)) == texts_of(range(4))


def test_nothing_readable_raises_naming_the_shards(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    (tmp_path / "shard-000001.tar").write_bytes(b"not a tar at all" * 40)
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 3, "shard-000001.tar": 3}))
    with pytest.raises(ValueError) as e:
        list(shard_corpus(str(tmp_path), 10))
    msg = str(e.value)
    assert "no sample" in msg and "tokenizer.path" in msg
    assert "shard-000000.tar (cannot open shard: ReadError" in msg
    assert "shard-000001.tar (cannot open shard: ReadError" in msg


def test_the_shards_are_the_ones_the_stream_would_read(tmp_path):
    """Found by discover_shards: a directory needs its sizes.json, and a shard it
    does not list (or lists as empty) is not read, exactly as in training."""
    write_shard(tmp_path / "shard-000000.tar", 0, 2)
    write_shard(tmp_path / "extra.tar", 2, 1)
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 2}))
    assert list(shard_corpus(str(tmp_path), 100)) == texts_of([0, 1])
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.path is null\), but .*/missing\b.*; set tokenizer\.path$"):
        list(shard_corpus(str(tmp_path / "missing"), 10))


def test_a_brace_pattern_is_read_like_the_data_stream_lists_it(tmp_path):
    write_shard(tmp_path / "shard-000000.tar", 0, 2)
    write_shard(tmp_path / "shard-000001.tar", 2, 1)
    write_shard(tmp_path / "shard-000002.tar", 3, 1)  # outside the pattern
    texts = list(shard_corpus(str(tmp_path / "shard-{000000..000001}.tar"), 100, roles=("gpt",)))
    assert texts == ["answer 0", "answer 1", "answer 2"]


def test_a_run_with_a_brace_pattern_builds_its_tokenizer_from_those_shards(tmp_path):
    """tokenizer.path: null with data.train_shards a brace pattern: the run's BPE
    tokenizer is built from the pattern's shards (a word of every answer there
    becomes one token of the vocabulary) and saved under <output_dir>/tokenizer."""
    from pipeline.distributed import DistInfo
    from pipeline.training.config import load_train_config
    from pipeline.training.build import prepare_tokenizer

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(4):
        write_shard(shards / f"train-{s:06d}.tar", 50 * s, 50, word=" quokkaesque")
    tiny = str(Path(__file__).resolve().parents[4] / "launch" / "recipes" / "tiny-cpu.yaml")
    cfg = load_train_config(tiny, [f"data.train_shards={shards}/train-{{000000..000003}}.tar", "tokenizer.path=null",
                                   "tokenizer.vocab_size=400", f"output_dir={tmp_path / 'run'}"])
    tok = prepare_tokenizer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo"))
    assert os.path.isfile(tmp_path / "run" / "tokenizer" / "tokenizer.json")
    assert len(tok.tokenize(" quokkaesque")) == 1
    assert len(tok.tokenize(" xylophonic")) > 1  # a word of no shard: pieces
