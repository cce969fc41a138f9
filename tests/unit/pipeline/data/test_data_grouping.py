"""Length-grouped batches (data.group_by_length): less padding, and everything the
ungrouped stream promises: equal batch counts per rank, the same samples (each
window's samples, each once), exact mid-epoch resume, the seeded conversation
choice, and batches that keep both labels (data.group_min_label_share)."""
import itertools
import random
from collections import Counter

import pytest
import torch

from pipeline.data import DataConfig, batches_per_epoch, make_train_loader, stream_identity
from pipeline.data.plan import group_window, seeded_rng, window_start
from pipeline.data.samples import choose_conversation


def batches(cfg, tok, ip, rank=0, world=1, epoch=0, start=0):
    return list(make_train_loader(cfg, tok, ip, rank=rank, world_size=world, epoch=epoch, start_batch=start))


def with_(cfg, **changes):
    return DataConfig(**{**cfg.to_dict(), **changes})


def padded(bs):
    """Padding positions / all positions of the batches."""
    pad = sum(int((b["attention_mask"] == 0).sum()) for b in bs)
    return pad / sum(b["attention_mask"].numel() for b in bs)


def varied(n, label, variant):
    """Filler words: lengths spread over 0..11 words, uncorrelated with the label."""
    return (n * 7 + variant * 5) % 12


@pytest.fixture
def shards(tmp_path, shard_writer):
    return shard_writer(tmp_path / "varied", [13, 5, 9, 11, 7, 3], extra_words=varied)  # 48 samples


# --------------------------------------------------------------------------- the plan


def pad_tokens(lengths, cut):
    return sum(len(rows) * max(lengths[i] for i in rows) - sum(lengths[i] for i in rows) for rows in cut)


def random_window(seed, n=40, fake_offset=0):
    rng = random.Random(seed)
    labels = [rng.randrange(2) for _ in range(n)]
    return [rng.randrange(50, 150) + fake_offset * lab for lab in labels], labels


@pytest.mark.parametrize("share", [0.0, 0.375, 0.5])
def test_group_window_is_a_seeded_partition_into_whole_batches(share):
    lengths, labels = random_window(0)
    cut = group_window(lengths, labels, 8, seeded_rng("g", 1), share)
    assert len(cut) == 5 and all(len(rows) == 8 for rows in cut)
    assert sorted(i for rows in cut for i in rows) == list(range(40))
    assert cut == group_window(lengths, labels, 8, seeded_rng("g", 1), share)
    assert cut != group_window(lengths, labels, 8, seeded_rng("g", 2), share)
    with pytest.raises(ValueError, match="not whole batches of 8"):
        group_window(lengths[:-1], labels[:-1], 8, seeded_rng("g", 1), share)
    with pytest.raises(ValueError, match="min_label_share=0.6"):
        group_window(lengths, labels, 8, seeded_rng("g", 1), 0.6)


def test_by_length_alone_cuts_the_length_order():
    lengths, _ = random_window(1, n=64)
    cut = group_window(lengths, [0] * 64, 8, seeded_rng("g", 0), 0.0)
    spans = sorted((min(lengths[i] for i in rows), max(lengths[i] for i in rows)) for rows in cut)
    # consecutive runs of the sorted lengths: no batch overlaps the next one
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
    # the batches come out in a shuffled order, not short to long
    firsts = [min(lengths[i] for i in rows) for rows in cut]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    # with two labels it pads no more than cutting the sorted order
    lengths, labels = random_window(2, n=64)
    order = sorted(range(64), key=lambda i: (lengths[i], i))
    sorted_cut = [order[b:b + 8] for b in range(0, 64, 8)]
    assert pad_tokens(lengths, group_window(lengths, labels, 8, seeded_rng(0), 0.0)) <= pad_tokens(lengths, sorted_cut)


@pytest.mark.parametrize("seed,fake_offset", [(3, 0), (4, 30)])
def test_label_counts_pad_least_within_the_share(seed, fake_offset):
    # Brute force over every choice of reals per batch (the rows of a batch being
    # the next reals and fakes in length order): the DP finds the least padding.
    B, k = 4, 4
    lengths, labels = random_window(seed, n=B * k, fake_offset=fake_offset)
    n_real = labels.count(0)
    real = sorted((i for i in range(16) if labels[i] == 0), key=lambda i: (lengths[i], i))
    fake = sorted((i for i in range(16) if labels[i] == 1), key=lambda i: (lengths[i], i))
    pads = []
    for share in (0.0, 0.25, 0.5):
        m = int(share * B)
        lo, hi = min(m, n_real // k), B - min(m, (16 - n_real) // k)
        best = None
        for counts in itertools.product(range(lo, hi + 1), repeat=k):
            if sum(counts) != n_real:
                continue
            a = b = 0
            cut = []
            for r in counts:
                cut.append(real[a:a + r] + fake[b:b + B - r])
                a, b = a + r, b + B - r
            best = min(best if best is not None else 10**9, pad_tokens(lengths, cut))
        got = group_window(lengths, labels, B, seeded_rng(0), share)
        assert pad_tokens(lengths, got) == best
        assert all(lo <= sum(labels[i] == 0 for i in rows) <= hi for rows in got)
        pads.append(best)
    assert pads == sorted(pads)  # a looser share never pads more


def test_label_share_keeps_batches_mixed_when_lengths_separate_the_labels():
    # Fakes 100-139 tokens, reals 40-79: sorting alone makes every batch label-pure.
    lengths = [40 + i for i in range(40)] + [100 + i for i in range(40)]
    labels = [0] * 40 + [1] * 40
    counts = lambda share: [Counter(labels[i] for i in rows)[1]
                            for rows in group_window(lengths, labels, 8, seeded_rng("g", 0), share)]
    assert set(counts(0.0)) == {0, 8}
    assert set(counts(0.5)) == {4}
    assert set(counts(0.375)) <= {3, 4, 5} and len(set(counts(0.375))) > 1  # bends to pad less
    # An unbalanced window: each batch holds what the window can give of the scarce label.
    labels = [1] * 50 + [0] * 30
    assert set(counts(0.5)) == set(counts(0.375)) == {5}
    # One label only: nothing to balance, still a partition into batches.
    one = group_window(lengths, [1] * 80, 8, seeded_rng(0), 0.375)
    assert sorted(i for rows in one for i in rows) == list(range(80))


def test_window_start():
    assert [window_start(b, 4) for b in range(9)] == [0, 0, 0, 0, 4, 4, 4, 4, 8]


# --------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("num_workers", [0, 2])
def test_grouping_permutes_each_window_and_cuts_padding(shards, tokenizer, image_processor, num_workers):
    base = DataConfig(train_shards=shards, batch_size=4, num_workers=num_workers, shuffle_buffer=6, seed=2,
                      group_by_length=False)
    grouped = with_(base, group_by_length=True, group_window=3, group_min_label_share=0.0)
    W, K = max(num_workers, 1), 3
    assert batches_per_epoch(grouped, 2) == batches_per_epoch(base, 2) == 6
    pads = {}
    for rank in (0, 1):
        plain, cut = (batches(c, tokenizer, image_processor, rank=rank, world=2) for c in (base, grouped))
        assert [b["batch_index"] for b in cut] == [b["batch_index"] for b in plain] == list(range(6))
        assert all(len(b["keys"]) == 4 for b in cut)
        # the same samples in every (logical worker, window): nothing lost or repeated
        def windows(bs):
            out = {}
            for b in bs:
                w = b["batch_index"] % W
                out.setdefault((w, b["batch_index"] // W // K), Counter()).update(b["keys"])
            return out
        assert windows(cut) == windows(plain)
        assert [b["keys"] for b in cut] != [b["keys"] for b in plain]
        # each row is the same example as ungrouped: same conversation, same tokens
        rows = lambda bs: {k: (int(b["conversation_index"][i]), b["input_ids"][i][b["attention_mask"][i] == 1].tolist())
                           for b in bs for i, k in enumerate(b["keys"])}
        assert rows(cut) == rows(plain)
        pads[rank] = padded(plain), padded(cut)
    for rank, (plain_pad, cut_pad) in pads.items():
        assert cut_pad < 0.6 * plain_pad, (rank, plain_pad, cut_pad)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_grouped_resume_at_any_batch_continues_the_same_stream(shards, tokenizer, image_processor, num_workers):
    cfg = DataConfig(train_shards=shards, batch_size=3, num_workers=num_workers, shuffle_buffer=5, seed=4,
                     group_window=3)
    full = batches(cfg, tokenizer, image_processor, rank=1, world=2, epoch=1)
    assert len(full) == 8
    for start in range(1, 9):  # inside windows, at their starts, and at the end
        rest = batches(cfg, tokenizer, image_processor, rank=1, world=2, epoch=1, start=start)
        assert [b["keys"] for b in rest] == [b["keys"] for b in full[start:]], start
        assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
                   for a, b in zip(rest, full[start:]))


def test_grouped_stream_keeps_the_seeded_conversation_choice(shards, tokenizer, image_processor, answer_text):
    cfg = DataConfig(train_shards=shards, batch_size=4, num_workers=0, seed=9, group_window=4)
    for epoch in (0, 1):
        for b in batches(cfg, tokenizer, image_processor, epoch=epoch):
            for i, key in enumerate(b["keys"]):
                idx = int(b["conversation_index"][i])
                assert idx == choose_conversation(3, 9, epoch, key, "random")
                text = tokenizer.decode([t for t in b["labels"][i].tolist() if t != -100][:-1]).strip()
                assert text.startswith(f"<REASONING>variant {idx} of")


def test_balanced_grouping_keeps_batches_mixed_when_fakes_are_longer(tmp_path, shard_writer, tokenizer,
                                                                     image_processor):
    # Like MMFR: fake answers longer than real ones (here by 8-11 filler words).
    root = shard_writer(tmp_path / "skewed", [16, 16, 16, 16],
                        extra_words=lambda n, label, v: (8 if label else 0) + (n * 3 + v) % 4)
    cfg = DataConfig(train_shards=root, batch_size=4, num_workers=0, shuffle_buffer=16, group_window=16)

    def stats(c):
        bs = batches(c, tokenizer, image_processor)
        fakes = [int(b["forgery_labels"].sum()) for b in bs]
        return sum(f in (0, 4) for f in fakes) / len(bs), set(fakes), padded(bs)

    alone_pure, _, alone_pad = stats(with_(cfg, group_min_label_share=0.0))
    default_pure, default_fakes, default_pad = stats(cfg)  # batch 4 x 0.375: at least 1 of each label
    even_pure, even_fakes, even_pad = stats(with_(cfg, group_min_label_share=0.5))
    random_pure, _, random_pad = stats(with_(cfg, group_by_length=False))
    assert alone_pure >= 0.75  # sorting by length sorts by label
    assert default_pure == even_pure == 0.0 < random_pure
    assert default_fakes <= {1, 2, 3} and even_fakes == {2}
    # The price: when lengths separate the labels, a mixed batch pads its real rows
    # to its fake ones (an even split here about as much as a random batch).
    assert alone_pad < 0.5 * default_pad and default_pad <= even_pad < 1.2 * random_pad


def test_bad_samples_in_a_grouped_window_are_replaced_and_counted(tmp_path, shard_writer, tokenizer,
                                                                  image_processor):
    root = shard_writer(tmp_path / "bad", [8, 8], bad={2: "json", 5: "image", 11: "noconv"}, extra_words=varied)
    cfg = DataConfig(train_shards=root, batch_size=4, num_workers=0, shuffle_buffer=4, group_window=4,
                     bad_check_min_samples=1000)
    bs = batches(cfg, tokenizer, image_processor)
    assert len(bs) == 4 and all(len(b["keys"]) == 4 for b in bs)
    reasons = " | ".join(r for b in bs for r in b["bad_reasons"])
    for text in ("bad json", "undecodable image", "no conversation"):
        assert text in reasons
    assert [b["keys"] for b in batches(cfg, tokenizer, image_processor, start=2)] == [b["keys"] for b in bs[2:]]


def test_stream_identity_records_the_grouping(shards):
    off = DataConfig(train_shards=shards, group_by_length=False)
    assert "length_grouping" not in stream_identity(off, 2)  # = the identity checkpoints stored before grouping
    on = stream_identity(with_(off, group_by_length=True), 2)
    assert on["length_grouping"] == {"window": 16, "min_label_share": 0.375}
    assert on != stream_identity(with_(off, group_by_length=True, group_window=8), 2)
    assert on != stream_identity(with_(off, group_by_length=True, group_min_label_share=0.5), 2)
    assert {k: v for k, v in on.items() if k != "length_grouping"} == stream_identity(off, 2)
