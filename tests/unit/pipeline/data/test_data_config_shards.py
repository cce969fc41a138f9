import json
import os

import pytest

from pipeline.data import DataConfig, discover_shards


@pytest.mark.parametrize("field,value", [
    ("batch_size", 0), ("num_workers", -1), ("resampled", "maybe"), ("conversation_choice", "best"),
    ("max_bad_fraction", 1.5), ("samples_per_epoch", 0), ("overlong", "wrap"), ("train_shards", ""),
    ("group_window", 0), ("group_by_length", "yes"), ("group_min_label_share", 0.6),
    ("group_min_label_share", True), ("group_min_label_share", "half"),
])
def test_validate_names_the_field(field, value):
    cfg = DataConfig(train_shards="/x")
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"data\.{field}"):
        cfg.validate()


def test_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValueError, match="batchsize"):
        DataConfig.from_dict({"train_shards": "/x", "batchsize": 4})
    cfg = DataConfig.from_dict({"train_shards": "/x", "batch_size": 4})
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_discover_dir_and_brace_pattern(tmp_path, shard_writer):
    root = shard_writer(tmp_path / "s", [3, 0, 2])
    by_dir = discover_shards(root)
    # the empty shard is left out: it would give a worker nothing to read
    assert [os.path.basename(u) for u in by_dir.urls] == ["shard-000000.tar", "shard-000002.tar"]
    assert by_dir.counts == (3, 2) and by_dir.total == 5
    by_pattern = discover_shards(f"{root}/shard-{{000000..000002}}.tar")
    assert by_pattern.urls == by_dir.urls and by_pattern.counts == by_dir.counts


def test_discover_errors_name_the_file(tmp_path, shard_writer):
    root = shard_writer(tmp_path / "s", [3, 2])
    os.remove(os.path.join(root, "shard-000001.tar"))
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        discover_shards(root)
    with pytest.raises(ValueError, match="no count for shard .shard-000002.tar"):
        discover_shards(f"{root}/shard-{{000000..000007}}.tar")
    os.remove(os.path.join(root, "sizes.json"))
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        discover_shards(root)
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump({"shard-000000.tar": "three"}, f)
    with pytest.raises(ValueError, match="shard-000000.tar"):
        discover_shards(root)
