"""Spare samples: a dead shard cannot exhaust them, data.max_bad_fraction alone
decides when the stream stops."""
import os

import pytest

from pipeline.data import DataConfig, make_train_loader


def batches(cfg, tok, ip, rank=0, world=1, start=0):
    return list(make_train_loader(cfg, tok, ip, rank=rank, world_size=world, epoch=0, start_batch=start))


def truncate(path: str, keep: float) -> None:
    """Cut a shard mid-member, like a copy or a write that was interrupted."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep) // 512 * 512 + 100)


@pytest.fixture
def cut_shard(tmp_path, shard_writer):
    """2 shards of 20: with 2 ranks x 1 worker and no resampling, rank 1 reads
    only the shard that is cut about half-way."""
    root = shard_writer(tmp_path / "cut", [20, 20])
    cfg = DataConfig(train_shards=root, batch_size=4, num_workers=0, shuffle_buffer=0, shuffle_shards=False,
                     resampled="off", max_bad_fraction=0.9, bad_check_min_samples=10)
    return root, cfg


def test_a_dead_shard_gets_spares_from_the_other_shards(cut_shard, tokenizer, image_processor):
    root, cfg = cut_shard
    intact = batches(cfg, tokenizer, image_processor, rank=1, world=2)
    assert len(intact) == 5 and not any(b["bad_samples"] for b in intact)  # ceil(40 / (4 x 2))
    truncate(os.path.join(root, "shard-000001.tar"), keep=0.5)
    bs = batches(cfg, tokenizer, image_processor, rank=1, world=2)
    assert len(bs) == 5 and all(len(b["keys"]) == 4 for b in bs)
    reasons = [r for b in bs for r in b["bad_reasons"]]
    assert sum(b["bad_samples"] for b in bs) == len(reasons)
    assert reasons and all(r.startswith(f"? in {root}/shard-000001.tar: ") for r in reasons), reasons[:3]
    # Every sample after the cut failed exactly once: its spare came from the
    # readable shard at the first attempt. (Before, every spare came from the
    # rank's only shard, the cut one, and the stream stopped after 8 of them
    # whatever max_bad_fraction said.)
    own_shard = {k for b in intact for k in b["keys"]}
    kept = [k for b in bs for k in b["keys"] if k in own_shard]
    spares = [k for b in bs for k in b["keys"] if k not in own_shard]
    assert 5 <= len(reasons) == 20 - len(kept) == len(spares) <= 15
    other_shard = {k for b in batches(cfg, tokenizer, image_processor, rank=0, world=2) for k in b["keys"]}
    assert set(spares) <= other_shard
    # Seeded: a rerun, and a run resumed past the cut, see the same batches.
    again = batches(cfg, tokenizer, image_processor, rank=1, world=2)
    assert [b["keys"] for b in again] == [b["keys"] for b in bs]
    resumed = batches(cfg, tokenizer, image_processor, rank=1, world=2, start=4)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in bs[4:]]
    assert resumed[0]["bad_samples"] == bs[4]["bad_samples"] > 0


def test_max_bad_fraction_is_the_limit_for_a_dead_shard(cut_shard, tokenizer, image_processor):
    root, cfg = cut_shard
    truncate(os.path.join(root, "shard-000001.tar"), keep=0.5)
    strict = DataConfig(**{**cfg.to_dict(), "max_bad_fraction": 0.2, "bad_check_min_samples": 10})
    with pytest.raises(RuntimeError, match=r"exceeds data.max_bad_fraction=0.2.*shard-000001.tar"):
        batches(strict, tokenizer, image_processor, rank=1, world=2)


def test_every_shard_dead_ends_at_the_fraction_limit_not_in_a_loop(tmp_path, shard_writer, tokenizer,
                                                                    image_processor):
    root = shard_writer(tmp_path / "dead", [6, 6, 6])
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        truncate(os.path.join(root, name), keep=0.0)  # 100 bytes: not even a header
    cfg = DataConfig(train_shards=root, batch_size=2, num_workers=0, shuffle_buffer=0,
                     max_bad_fraction=0.9, bad_check_min_samples=50)
    with pytest.raises(RuntimeError, match=r"(\d+) bad samples of \1 read exceeds data.max_bad_fraction=0.9"):
        batches(cfg, tokenizer, image_processor)


def test_a_sample_that_failed_for_the_slot_is_not_drawn_again(tmp_path, shard_writer, tokenizer,
                                                               image_processor):
    from pipeline.data.plan import WorkerId
    from pipeline.data.stream import ShardStream

    root = shard_writer(tmp_path / "small", [3, 3])
    stream = ShardStream(DataConfig(train_shards=root, batch_size=2, num_workers=0), tokenizer,
                         image_processor, rank=0, world_size=1, epoch=0)
    who = WorkerId(0, 1, 0, 1)
    tried = [(0, 0), (0, 1), (1, 0), (1, 1)]  # both shards failed for this slot, each with one untried sample
    picks = {(s.ref.shard, s.ref.index) for a in range(20) for s in [stream._spare(who, 0, 0, a, tried)]}
    assert picks == {(0, 2), (1, 2)}
    # Only one shard failed so far: the spare comes from the other one.
    assert {stream._spare(who, 0, 0, a, [(1, 2)]).ref.shard for a in range(20)} == {0}
