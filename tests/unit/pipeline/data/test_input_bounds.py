"""Inputs with a bound (issue 25, item 5): a tar member larger than
data.max_member_bytes is never read, names read from files are never joined
into paths outside their folder, and `pipe:` shard URLs need an explicit opt-in."""
from __future__ import annotations

import json
import os

import pytest

from common.config_loading import ConfigError
from pipeline.data.config import DataConfig
from pipeline.data.plan import Ref
from pipeline.data.reader import ShardCursor
from pipeline.data.shards import discover_shards


def test_a_member_over_the_bound_is_a_named_bad_sample_and_reading_goes_on(tmp_path, shard_writer):
    root = shard_writer(tmp_path / "s", [3], n_conv=1)
    url = os.path.join(root, "shard-000000.tar")
    sizes = [len(m) for m in ShardCursor([url]).get(Ref(0, 0, 0, 0)).members.values()]
    limit = max(sizes) - 1  # the image member (the larger one) is over it
    cursor = ShardCursor([url], max_member_bytes=limit)
    try:
        first, second = cursor.get(Ref(0, 0, 0, 0)), cursor.get(Ref(1, 0, 0, 1))
    finally:
        cursor.close()
    assert first.error and f"bytes > {limit} bytes (data.max_member_bytes); not read" in first.error
    assert first.members == {} or all(len(v) <= limit for v in first.members.values())
    assert first.key and second.key and second.key != first.key  # reading goes on at the right position
    with pytest.raises(ConfigError, match="data.max_member_bytes"):
        DataConfig(train_shards=root, max_member_bytes=0).validate()


def test_shard_names_from_sizes_json_stay_in_their_folder(tmp_path, shard_writer):
    root = shard_writer(tmp_path / "s", [2], n_conv=1)
    (tmp_path / "outside.tar").write_bytes(b"")
    with open(os.path.join(root, "sizes.json"), "w") as fh:
        json.dump({"shard-000000.tar": 2, "../outside.tar": 1}, fh)
    with pytest.raises(ValueError, match=r"'\.\./outside\.tar' is not a plain file name"):
        discover_shards(root)


def test_weight_index_names_stay_in_the_model_folder(tmp_path):
    from modeling.checkpoints.tensor_io import CheckpointError, weight_files

    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "/etc/passwd"}}))
    with pytest.raises(CheckpointError, match=r"'/etc/passwd' is not a plain file name"):
        weight_files(tmp_path)


def test_manifest_shard_names_stay_in_their_folder(tmp_path):
    from sharding.schema import sample_key
    from sharding.shard_set import SetSpec, ShardOptions, write_shard_sets
    from sharding.tar_writer import ShardSample
    from sharding.verify import verify

    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    meta = {"relpath": "a.png", "source": "laion", "split": "train", "label": 0, "generator": "laion",
            "conversations": [], "record_ids": [], "attributes": None, "reference": "", "has_reasoning": False}
    write_shard_sets({"train": SetSpec([ShardSample(sample_key("a.png"), "a.png", None, meta, 10, buf.getvalue(),
                                                    "x")])}, str(tmp_path / "out"), ShardOptions(progress=False))
    manifest_path = tmp_path / "out" / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["name"] = "../../victim.tar"
    manifest_path.write_text(json.dumps(manifest))
    problems = verify(str(tmp_path / "out"), out=io.StringIO())
    assert any("'../../victim.tar' is not a plain file name" in p for p in problems), problems


def test_pipe_urls_and_gopen_rewrite_need_an_opt_in(tmp_path, monkeypatch, shard_writer):
    with pytest.raises(ConfigError, match=r"data.train_shards=.*pipe: URL runs a shell command"):
        DataConfig(train_shards="pipe:touch /tmp/owned; cat x.tar").validate()
    DataConfig(train_shards="pipe:cat x.tar", allow_pipe_urls=True).validate()  # the user asked for it
    root = shard_writer(tmp_path / "s", [1], n_conv=1)
    monkeypatch.setenv("GOPEN_REWRITE", f"{root}=pipe:touch /tmp/owned;cat ")
    with pytest.raises(ConfigError, match="GOPEN_REWRITE is set"):
        DataConfig(train_shards=root).validate()


def test_a_huge_answer_is_cut_before_tokenising_with_the_same_example(tmp_path, shard_writer, tokenizer):
    from modeling.template import build_training_example
    from pipeline.data.samples import MAX_CHARS_PER_TOKEN, BadSample, prepare_text

    root = shard_writer(tmp_path / "s", [1], n_conv=1)
    cursor = ShardCursor([os.path.join(root, "shard-000000.tar")])
    raw = cursor.get(Ref(0, 0, 0, 0))
    cursor.close()
    meta = json.loads(raw.members["json"])
    answer = "<REASONING>" + "edges look smooth and natural. " * 8000 + "</REASONING>"  # 248 K characters
    meta["conversations"][0][1]["value"] = answer
    raw.members["json"] = json.dumps(meta).encode()
    seen = []

    def recording(tok, question, text, **kw):
        seen.append(len(text))
        return build_training_example(tok, question, text, **kw)

    kw = dict(tokenizer=tokenizer, seed=0, epoch=0, policy="first", max_length=256)
    part = prepare_text(raw, build_example=recording, **kw)
    assert seen == [256 * MAX_CHARS_PER_TOKEN]  # the tokenizer never saw the whole answer
    question = meta["conversations"][0][0]["value"].replace("<image>", "").strip()
    whole = build_training_example(tokenizer, question, answer, max_length=256)
    assert part.example.input_ids == whole.input_ids and part.example.truncated_tokens > 0
    with pytest.raises(BadSample, match="cannot fit data.max_length=256"):
        prepare_text(raw, build_example=recording, overlong="skip", **kw)

