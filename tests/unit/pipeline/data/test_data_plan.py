import itertools

import pytest

from pipeline.data.plan import (Ref, RefShuffle, WorkerId, input_refs, logical_worker, seeded_rng,
                                shard_visits, use_resampled, worker_batch_count, worker_skip)


@pytest.mark.parametrize("total,workers", [(0, 1), (7, 1), (7, 3), (9, 3), (2, 4)])
def test_round_robin_deal_matches_worker_counts(total, workers):
    # rank batch b comes from logical worker b % W as its (b // W)-th batch
    dealt = [sum(1 for b in range(total) if b % workers == w) for w in range(workers)]
    assert [worker_batch_count(total, w, workers) for w in range(workers)] == dealt
    for start in range(total + 1):
        for w in range(workers):
            assert worker_skip(start, w, workers) == sum(1 for b in range(start) if b % workers == w)


def test_resumed_loader_worker_roles_continue_the_interleaving():
    W = 3
    for start in range(7):
        # DataLoader worker j serves remaining batches start + j, start + j + W, ...
        for j in range(W):
            assert logical_worker(j, start, W) == (start + j) % W


def test_use_resampled():
    assert use_resampled("auto", 3, 2, 2) is True
    assert use_resampled("auto", 4, 2, 2) is False
    assert use_resampled("auto", 2, 2, 0) is False  # num_workers 0 is one worker
    assert use_resampled("on", 100, 1, 1) is True and use_resampled("off", 1, 4, 4) is False


def test_shard_split_is_a_partition_and_wraps():
    n, world, W = 11, 2, 2
    first_pass = []
    for rank in range(world):
        for w in range(W):
            who = WorkerId(rank, world, w, W)
            visits = list(itertools.islice(shard_visits(n, 5, 0, True, False, who), 30))
            mine = [shard for _, shard in visits]
            assert [wrap for wrap, _ in visits][: len(set(mine)) + 1] == [0] * len(set(mine)) + [1]
            k = len(set(mine))
            assert sorted(mine[:k]) == sorted(set(mine))  # the wrap repeats the same shards
            assert set(mine[k:]) == set(mine[:k])
            first_pass += mine[:k]
    assert sorted(first_pass) == list(range(n))


def test_ref_shuffle_is_seeded_and_each_pass_is_a_permutation():
    # two shards of 5 samples per pass, passes 0..9
    refs = lambda: input_refs(iter([(p, s) for p in range(10) for s in (0, 1)]), [5, 5])
    a = [r.pos for r in itertools.islice(RefShuffle(refs(), 4, seeded_rng(1)), 40)]
    b = [r.pos for r in itertools.islice(RefShuffle(refs(), 4, seeded_rng(1)), 40)]
    c = [r.pos for r in itertools.islice(RefShuffle(refs(), 4, seeded_rng(2)), 40)]
    assert a == b and a != c and a[:10] != list(range(10))
    for p in range(4):  # the buffer drains at each pass end: no sample leaks into the next pass
        assert sorted(a[10 * p: 10 * p + 10]) == list(range(10 * p, 10 * p + 10))
    assert [r.pos for r in itertools.islice(RefShuffle(refs(), 1, seeded_rng(1)), 5)] == [0, 1, 2, 3, 4]
    big = [r.pos for r in itertools.islice(RefShuffle(refs(), 50, seeded_rng(1)), 20)]
    assert sorted(big[:10]) == list(range(10))  # a buffer larger than the pass still drains it


def test_input_refs_positions():
    got = list(input_refs(iter([(0, 1), (1, 0)]), [2, 3]))
    assert got == [Ref(0, 0, 1, 0), Ref(1, 0, 1, 1), Ref(2, 0, 1, 2), Ref(3, 1, 0, 0, 1), Ref(4, 1, 0, 1, 1)]
