"""The json schema is stable: the writer writes every METADATA_SCHEMA key with its
declared type in every sample, and stops on metadata that does not match."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from sharding import schema
from sharding.eval_sets.common import eval_metadata
from sharding.mmfr import scan_mmfr
from sharding.tar_writer import ShardJob, ShardSample, write_shard

from ._shard_fixtures import image_bytes, make_mmfr, rewrite_json


def _write(tmp_path: Path, **changes) -> list[dict]:
    """Write one sample (benchmark metadata plus `changes`; None deletes a key) and return its json."""
    meta = eval_metadata("g/1_fake/a.png", "bench", "g", 1)
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    sample = ShardSample(schema.sample_key("g/1_fake/a.png"), "g/1_fake/a.png", None, meta,
                         data=image_bytes("PNG"))
    write_shard(ShardJob("eval/g", 0, str(tmp_path / "s.tar"), [sample]))
    with tarfile.open(tmp_path / "s.tar") as tf:
        return [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]


def test_every_key_is_written_and_a_left_out_optional_one_is_null(tmp_path):
    assert "reasoning_index" not in eval_metadata("x.png", "b", "g", 0)  # the adapters leave it out
    (meta,) = _write(tmp_path)
    assert list(meta) == sorted(f.name for f in schema.METADATA_SCHEMA)
    assert meta["reasoning_index"] is None and meta["schema"] == schema.SCHEMA_VERSION == 2
    assert schema.metadata_problems(meta) == []


@pytest.mark.parametrize("changes, message", [
    ({"label": "1"}, r"'label' is '1', expected integer$"),
    ({"label": True}, r"'label' is True, expected integer$"),
    ({"has_reasoning": None}, r"metadata lacks \['has_reasoning'\]"),
    ({"reference": None, "relpath": None}, r"lacks \['relpath', 'reference'\]"),
    ({"conversations": [[{"from": "gpt", "value": "a", "weight": 1}]]}, r"'conversations' is .* expected list of list"),
    ({"attributes": {"Low Image Quality": 3}}, r"'attributes' is .* or null$"),
    ({"record_ids": [1]}, r"'record_ids' is \[1\], expected list of string"),
    ({"mask": "m.png"}, r"keys \['mask'\] are not declared in sharding.schema.METADATA_SCHEMA"),
    ({"reasoning_index": "0"}, r"'reasoning_index' is '0', expected integer or null"),
])
def test_metadata_off_the_schema_stops_the_writer_naming_sample_and_field(tmp_path, changes, message):
    with pytest.raises(ValueError, match=r"^sample g/1_fake/a.png: .*" + message):
        _write(tmp_path, **changes)
    assert not list(tmp_path.glob("s.tar*"))  # nothing half-written left behind


def test_nullable_keys_accept_null_and_non_nullable_ones_do_not():
    nullable = {f.name for f in schema.METADATA_SCHEMA if f.nullable}
    assert nullable == {"attributes", "reasoning_index"}
    assert set(schema.OPTIONAL_METADATA_FIELDS) <= nullable  # the writer fills those with null
    full = {f.name: None for f in schema.METADATA_SCHEMA}
    problems = schema.metadata_problems(full)
    assert len(problems) == len(schema.METADATA_SCHEMA) - len(nullable)
    assert not any(repr(n) in p for p in problems for n in nullable)


def test_mmfr_turns_keep_exactly_from_and_value(tmp_path):
    make_mmfr(tmp_path)

    def add_key(records):
        records[0]["conversations"][1]["weight"] = 0.5
        return records
    rewrite_json(tmp_path, "forgery_reasoning_cot.json", add_key)
    scan = scan_mmfr(str(tmp_path))
    turns = [t for s in scan.samples["train"] for c in s.metadata["conversations"] for t in c]
    assert turns and all(set(t) == {"from", "value"} for t in turns)
