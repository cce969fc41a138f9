"""The stream's contract: seeded order, equal batch counts per rank, exact resume,
seeded conversation choice, counted bad samples."""
import pytest
import torch

from pipeline.data import DataConfig, batches_per_epoch, make_train_loader
from pipeline.data import reader as reader_mod
from pipeline.data.samples import choose_conversation


def batches(cfg, tok, ip, rank=0, world=1, epoch=0, start=0):
    return list(make_train_loader(cfg, tok, ip, rank=rank, world_size=world, epoch=epoch, start_batch=start))


def keys(bs):
    return [b["keys"] for b in bs]


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["batch_index"] == y["batch_index"]
        for name in ("pixel_values", "input_ids", "attention_mask", "labels", "forgery_labels"):
            assert torch.equal(x[name], y[name]), name


@pytest.fixture
def shards(tmp_path, shard_writer):
    return shard_writer(tmp_path / "train", [7, 3, 5, 9, 4])


def test_seeded_order_is_reproducible_and_depends_on_seed_and_epoch(shards, tokenizer, image_processor):
    cfg = DataConfig(train_shards=shards, batch_size=4, num_workers=0, shuffle_buffer=5, seed=3)
    first = batches(cfg, tokenizer, image_processor)
    same_batches(first, batches(cfg, tokenizer, image_processor))
    assert len(first) == 7  # ceil(28 / 4)
    flat = [k for b in keys(first) for k in b]
    assert len(set(flat)) == 28  # one rank, no wrap: every sample once
    assert keys(batches(DataConfig(**{**cfg.to_dict(), "seed": 4}), tokenizer, image_processor)) != keys(first)
    assert keys(batches(cfg, tokenizer, image_processor, epoch=1)) != keys(first)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uneven_shards_give_every_rank_the_same_batch_count(tmp_path, shard_writer, tokenizer,
                                                             image_processor, num_workers):
    root = shard_writer(tmp_path / "uneven", [11, 1, 2, 9, 1])  # rank 0 and 1 shares differ a lot
    cfg = DataConfig(train_shards=root, batch_size=3, num_workers=num_workers, shuffle_buffer=4,
                     resampled="off" if num_workers == 0 else "auto")
    expected = batches_per_epoch(cfg, 2)
    assert expected == 4  # ceil(24 / (3 x 2))
    per_rank = [batches(cfg, tokenizer, image_processor, rank=r, world=2) for r in (0, 1)]
    for r, bs in enumerate(per_rank):
        assert len(bs) == expected
        assert [b["batch_index"] for b in bs] == list(range(expected))
        assert all(len(b["keys"]) == 3 and b["rank"] == r for b in bs)
    assert keys(per_rank[0]) != keys(per_rank[1])


def test_resampled_mode_when_shards_are_fewer_than_readers(tmp_path, shard_writer, tokenizer, image_processor):
    root = shard_writer(tmp_path / "few", [5, 6, 7])  # 3 shards < 2 ranks x 2 workers
    cfg = DataConfig(train_shards=root, batch_size=2, num_workers=2, shuffle_buffer=3)
    with pytest.raises(ValueError, match="data.resampled='off'"):
        make_train_loader(DataConfig(**{**cfg.to_dict(), "resampled": "off"}), tokenizer, image_processor,
                          rank=0, world_size=2, epoch=0)
    per_rank = [batches(cfg, tokenizer, image_processor, rank=r, world=2) for r in (0, 1)]
    assert [len(bs) for bs in per_rank] == [5, 5]  # ceil(18 / 4)
    assert keys(per_rank[0]) != keys(per_rank[1])
    same_batches(per_rank[1], batches(cfg, tokenizer, image_processor, rank=1, world=2))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_any_batch_continues_the_same_stream(shards, tokenizer, image_processor, num_workers, grouped):
    cfg = DataConfig(train_shards=shards, batch_size=2, num_workers=num_workers, shuffle_buffer=6, seed=1,
                     group_by_length=grouped)
    full = batches(cfg, tokenizer, image_processor, rank=1, world=2, epoch=2)
    assert len(full) == 7
    for start in (1, 2, 5, 7):
        rest = batches(cfg, tokenizer, image_processor, rank=1, world=2, epoch=2, start=start)
        assert len(make_train_loader(cfg, tokenizer, image_processor, rank=1, world_size=2, epoch=2,
                                     start_batch=start)) == len(full) - start
        same_batches(rest, full[start:])
    with pytest.raises(ValueError, match="start_batch=8"):
        make_train_loader(cfg, tokenizer, image_processor, rank=1, world_size=2, epoch=2, start_batch=8)


@pytest.mark.parametrize("grouping,max_opened", [
    (dict(group_by_length=False), 3),  # the buffer's shard(s) and the last one, not the 10 skipped
    # batch 15 is in the window of batches 12..15: its 8 samples are read again (one
    # shard more), so that batch 15 is cut as before, but only batches 15..17 are decoded
    (dict(group_by_length=True, group_window=4), 4),
])
def test_resume_skips_without_decoding_and_opens_few_shards(tmp_path, shard_writer, tokenizer, image_processor,
                                                          monkeypatch, grouping, max_opened):
    root = shard_writer(tmp_path / "many", [3] * 12)
    decoded, opened = [], []

    def counting_processor(image):
        decoded.append(1)
        return image_processor(image)

    real_reader = reader_mod._ShardReader

    class CountingReader(real_reader):
        def __init__(self, url, *args):
            opened.append(url)
            super().__init__(url, *args)

    monkeypatch.setattr(reader_mod, "_ShardReader", CountingReader)
    cfg = DataConfig(train_shards=root, batch_size=2, num_workers=0, shuffle_buffer=2, **grouping)
    full = batches(cfg, tokenizer, counting_processor)
    assert len(decoded) == 36 and len(opened) == 12
    decoded.clear(), opened.clear()
    rest = batches(cfg, tokenizer, counting_processor, start=15)
    same_batches(rest, full[15:])
    assert len(decoded) == 6  # only the 3 remaining batches
    assert len(opened) <= max_opened


@pytest.mark.parametrize("policy", ["random", "cycle", "first"])
def test_conversation_choice_is_seeded_per_epoch(shards, tokenizer, image_processor, answer_text, policy):
    cfg = DataConfig(train_shards=shards, batch_size=4, num_workers=0, seed=7, conversation_choice=policy)
    seen: dict[str, set] = {}
    for epoch in range(3):
        for b in batches(cfg, tokenizer, image_processor, epoch=epoch):
            for i, key in enumerate(b["keys"]):
                idx = int(b["conversation_index"][i])
                assert idx == choose_conversation(3, 7, epoch, key, policy)
                # the tokens trained on are the chosen conversation's answer
                answer_ids = [t for t in b["labels"][i].tolist() if t != -100][:-1]  # drop eos
                text = tokenizer.decode(answer_ids)
                assert f"variant {idx} " in text, text
                assert text.strip() == answer_text(int(b["forgery_labels"][i]), idx)
                seen.setdefault(key, set()).add(idx)
    if policy == "first":
        assert all(s == {0} for s in seen.values())
    elif policy == "cycle":
        assert all(s == {0, 1, 2} for s in seen.values())
    else:
        assert sum(len(s) > 1 for s in seen.values()) > len(seen) // 2
        assert choose_conversation(3, 8, 0, "k", "random") in range(3)


def test_bad_samples_are_counted_replaced_and_reported(tmp_path, shard_writer, tokenizer, image_processor):
    root = shard_writer(tmp_path / "bad", [6, 6], bad={1: "image", 4: "json", 9: "noconv"})
    cfg = DataConfig(train_shards=root, batch_size=3, num_workers=0, shuffle_buffer=3,
                     bad_check_min_samples=1000)
    bs = batches(cfg, tokenizer, image_processor)
    assert len(bs) == 4 and all(len(b["keys"]) == 3 for b in bs)
    # The 3 bad samples, plus any seeded spare that happened to be one of them.
    assert sum(b["bad_samples"] for b in bs) == sum(len(b["bad_reasons"]) for b in bs) >= 3
    reasons = " | ".join(r for b in bs for r in b["bad_reasons"])
    for text in ("undecodable image", "bad json", "no conversation", "shard-000000.tar", "shard-000001.tar"):
        assert text in reasons
    bad_keys = {r.split(" in ")[0] for b in bs for r in b["bad_reasons"]}
    assert len(bad_keys) == 3 and not bad_keys & {k for b in bs for k in b["keys"]}
    # the spares are seeded too: a rerun gives the same batches
    same_batches(bs, batches(cfg, tokenizer, image_processor))


def test_bad_rate_above_limit_raises_naming_the_shard(tmp_path, shard_writer, tokenizer, image_processor):
    root = shard_writer(tmp_path / "rotten", [8, 8], bad={i: "image" for i in range(8, 16)})
    cfg = DataConfig(train_shards=root, batch_size=2, num_workers=0, shuffle_buffer=0, shuffle_shards=False,
                     max_bad_fraction=0.2, bad_check_min_samples=4)
    with pytest.raises(RuntimeError, match="shard-000001.tar.*max_bad_fraction|max_bad_fraction.*shard-000001.tar"):
        batches(cfg, tokenizer, image_processor)


def test_shard_shorter_than_sizes_json_is_counted(tmp_path, shard_writer, tokenizer, image_processor):
    import json, os
    root = shard_writer(tmp_path / "short", [4, 4])
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump({"shard-000000.tar": 6, "shard-000001.tar": 4}, f)
    cfg = DataConfig(train_shards=root, batch_size=2, num_workers=0, shuffle_buffer=0, shuffle_shards=False,
                     bad_check_min_samples=1000)
    bs = batches(cfg, tokenizer, image_processor)
    assert len(bs) == 5 and all(len(b["keys"]) == 2 for b in bs)
    reasons = [r for b in bs for r in b["bad_reasons"]]
    # the two missing samples, plus any seeded spare that happened to hit them again
    assert sum(b["bad_samples"] for b in bs) == len(reasons) >= 2
    assert all("sizes.json disagrees" in r and "shard-000000.tar" in r for r in reasons)
    assert {"sample 4 was expected", "sample 5 was expected"} <= {r.rsplit(" but ", 1)[1][:21] for r in reasons}


@pytest.mark.parametrize("interval,expected_logs", [(3600.0, 5), (0.0, 50)])
def test_bad_sample_logging_is_rate_limited(caplog, interval, expected_logs):
    from pipeline.data.stream import BadSampleBudget

    cfg = DataConfig(train_shards="/x", bad_check_min_samples=10**6, bad_log_interval_s=interval)
    budget = BadSampleBudget(cfg, "rank 0 worker 0")
    with caplog.at_level("WARNING", logger="pipeline.data"):
        for i in range(50):
            budget.record(f"k{i}", "s.tar", "broken")
    assert budget.bad == 50 and budget.by_shard["s.tar"] == 50
    assert len(caplog.records) == expected_logs
    assert "k0 in s.tar: broken" in caplog.records[0].getMessage()
    if interval == 0.0:
        assert "50 bad samples of 50 read" in caplog.records[-1].getMessage()
