"""The epoch plan: which sample every worker emits in which batch, from counts alone.

Everything here works on sample *references* (shard index, index in shard),
never on bytes, so that the order of an epoch is a pure function of
(seed, epoch, rank, world_size, num_workers, batch_size, shard list and counts)
and a resumed stream can fast-forward past K batches with integer arithmetic
before any shard is opened.

Worker numbering. A rank with W = max(num_workers, 1) loader workers has W
*logical* workers. A rank's epoch is N batches; rank batch b comes from
logical worker b % W, as that worker's (b // W)-th batch: exactly the order in
which torch's DataLoader interleaves IterableDataset workers (round robin,
in order, an exhausted worker skipped). A stream resumed at batch K gives
DataLoader worker j the role of logical worker (j + K) % W, so its first batch
is batch K again.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator


def seeded_rng(*parts: object) -> random.Random:
    """A Random seeded by a stable hash of `parts` (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:16], "little"))


def use_resampled(mode: str, num_shards: int, world_size: int, num_workers: int) -> bool:
    """Resolve data.resampled: "auto" resamples when some worker would get no shard."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return num_shards < world_size * max(num_workers, 1)


def batches_per_rank(samples_per_epoch: int, batch_size: int, world_size: int) -> int:
    """Batches every rank runs per epoch; the same on all ranks by construction."""
    return max(1, math.ceil(samples_per_epoch / (batch_size * world_size)))


def worker_batch_count(total: int, worker: int, num_workers: int) -> int:
    """Batches of logical `worker` among `total` rank batches dealt round robin."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


def worker_skip(start_batch: int, worker: int, num_workers: int) -> int:
    """How many of logical `worker`'s batches come before rank batch `start_batch`."""
    return worker_batch_count(start_batch, worker, num_workers)


def logical_worker(loader_worker: int, start_batch: int, num_workers: int) -> int:
    """The logical worker a DataLoader worker plays when a stream starts at start_batch."""
    return (loader_worker + start_batch) % num_workers


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The same shard permutation on every rank for one epoch."""
    order = list(range(num_shards))
    if shuffle:
        seeded_rng("shards", seed, epoch).shuffle(order)
    return order


def split_by_node(items: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s share; rank and world size are passed in, never guessed from env."""
    return items[rank::world_size]


def split_by_worker(items: list[int], worker: int, num_workers: int) -> list[int]:
    return items[worker::num_workers]


@dataclass(frozen=True)
class WorkerId:
    """Who reads: the coordinates that, with the seed and epoch, fix a stream."""

    rank: int
    world_size: int
    worker: int  # logical worker
    num_workers: int  # W = max(data.num_workers, 1)


def worker_shards(num_shards: int, seed: int, epoch: int, shuffle: bool, resampled: bool,
                  who: WorkerId) -> list[int]:
    """Shards this worker reads in its first pass (resampled: every shard is a candidate)."""
    if resampled:
        return list(range(num_shards))
    mine = split_by_node(epoch_shard_order(num_shards, seed, epoch, shuffle), who.rank, who.world_size)
    return split_by_worker(mine, who.worker, who.num_workers)


def shard_visits(num_shards: int, seed: int, epoch: int, shuffle: bool, resampled: bool,
                 who: WorkerId) -> Iterator[tuple[int, int]]:
    """Endless (pass, shard index) pairs for one worker.

    Without resampling the worker goes through its own shards (pass 0), then
    again in a fresh seeded order (pass 1), and so on: a worker whose shards
    hold fewer samples than its batch quota wraps around instead of ending
    early, which is what keeps every rank's batch count equal with uneven
    shards. With resampling it draws from all shards with replacement, as one
    endless pass.
    """
    if resampled:
        rng = seeded_rng("resample", seed, epoch, who.rank, who.worker)
        while True:
            yield 0, rng.randrange(num_shards)
    mine = worker_shards(num_shards, seed, epoch, shuffle, False, who)
    if not mine:
        raise ValueError(
            f"rank {who.rank} worker {who.worker} has no shard: {num_shards} shard(s) for "
            f"{who.world_size} rank(s) x {who.num_workers} worker(s); set data.resampled to "
            "'auto' or 'on', or write more shards"
        )
    for shard in mine:
        yield 0, shard
    wrap = 1
    while True:
        again = list(mine)
        if shuffle:
            seeded_rng("wrap", seed, epoch, who.rank, who.worker, wrap).shuffle(again)
        for shard in again:
            yield wrap, shard
        wrap += 1


@dataclass(frozen=True)
class Ref:
    """One sample of the worker's input stream: the `index`-th sample of shard
    `shard`, read during the worker's `visit`-th shard visit, in pass `wrap`
    over its shards; `pos` counts samples from the start of the worker's stream."""

    pos: int
    visit: int
    shard: int
    index: int
    wrap: int = 0


def input_refs(visits: Iterator[tuple[int, int]], counts: tuple[int, ...] | list[int]) -> Iterator[Ref]:
    pos = 0
    for visit, (wrap, shard) in enumerate(visits):
        for index in range(counts[shard]):
            yield Ref(pos, visit, shard, index, wrap)
            pos += 1


class RefShuffle:
    """A seeded shuffle buffer over references (webdataset's `shuffle`, made
    replayable): fill `size` slots, then emit a random slot and refill it.

    The buffer drains at the end of each pass over the worker's shards before
    the next pass enters it, so a pass emits each of its samples exactly once
    (an endless stream would otherwise keep `size` samples per worker stuck
    in the buffer at the end of every epoch and repeat others in their place).

    `on_pull` sees every reference as it enters the buffer, in stream order;
    the reader attaches there once the fast-forward of a resume is done.
    """

    def __init__(self, refs: Iterator[Ref], size: int, rng: random.Random,
                 on_pull: Callable[[Ref], None] | None = None):
        self._refs = refs
        self._size = size
        self._rng = rng
        self.on_pull = on_pull
        self.buffer: list[Ref] = []
        self._next: Ref | None = None
        self._wrap = 0

    def _peek(self) -> Ref:
        if self._next is None:
            self._next = next(self._refs)
        return self._next

    def _take(self) -> Ref:
        ref, self._next = self._peek(), None
        if self.on_pull is not None:
            self.on_pull(ref)
        return ref

    def __iter__(self) -> "RefShuffle":
        return self

    def __next__(self) -> Ref:
        if self._size <= 1:
            return self._take()
        while len(self.buffer) < self._size and self._peek().wrap == self._wrap:
            self.buffer.append(self._take())
        if not self.buffer:  # this pass is drained: the next one starts filling
            self._wrap = self._peek().wrap
            return next(self)
        k = self._rng.randrange(len(self.buffer))
        out = self.buffer[k]
        if self._peek().wrap == self._wrap:
            self.buffer[k] = self._take()
        else:
            self.buffer[k] = self.buffer[-1]
            self.buffer.pop()
        return out


# --------------------------------------------------------------------------- length grouping
#
# Windows are counted in the logical worker's own batches: window w holds its
# batches [w x group_window, (w + 1) x group_window), the last one cut at the
# worker's quota. Grouping only permutes the samples inside a window, so the
# worker's quota, the set of samples it emits and every rank's batch count are
# those of the ungrouped stream; a window's permutation is seeded by
# (seed, epoch, rank, logical worker, window), so a resumed stream rebuilds it.

def window_start(batch: int, window: int) -> int:
    """First worker batch of the window that holds worker batch `batch`."""
    return batch // window * window


def group_window(lengths: list[int], labels: list[int], batch_size: int, rng: random.Random,
                 min_label_share: float) -> list[list[int]]:
    """Cut a window of k x batch_size samples into k batches of similar lengths.

    Returns, for each batch in the order it is emitted, the window indices of
    its rows. Each label's samples (1: fake; anything else, bad samples too,
    counts as real) are sorted by (length, window index); batch j takes the next
    r_j reals and batch_size - r_j fakes of those orders, where every batch
    holds at least m = floor(min_label_share x batch_size) rows of each label
    (fewer when the window has fewer than m x k of a label) and the counts r_j
    minimise the window's padding, sum_j (batch_size x longest_j - lengths),
    found by dynamic programming over (batches cut, reals used).

    min_label_share 0 is grouping by length alone (the sorted order cut into
    batches is one of the candidates, so padding is never worse); 0.5 splits
    every batch evenly, which costs padding when one label's answers are longer
    (reals padded to fakes); in between, the counts bend where lengths and
    labels disagree. The batch order and the rows of each batch are then
    shuffled with `rng`: the cut runs from short to long, with the labels in
    blocks.
    """
    n = len(lengths)
    if len(labels) != n or n % batch_size:
        raise ValueError(f"a window of {n} lengths and {len(labels)} labels is not whole batches of {batch_size}")
    if not 0.0 <= min_label_share <= 0.5:
        raise ValueError(f"min_label_share={min_label_share} is not in [0, 0.5]")
    B, k = batch_size, n // batch_size
    by_length = lambda i: (lengths[i], i)
    fake = sorted((i for i in range(n) if labels[i] == 1), key=by_length)
    real = sorted((i for i in range(n) if labels[i] != 1), key=by_length)
    m = int(min_label_share * B)
    lo = min(m, len(real) // k)  # reals per batch: lo..hi, so each label gets its share
    hi = B - min(m, len(fake) // k)
    # best[j][a]: least sum of batch maxima with j batches cut from the a shortest
    # reals and the j x B - a shortest fakes; back[j][a]: the reals of batch j - 1.
    inf = float("inf")
    best = [[inf] * (len(real) + 1) for _ in range(k + 1)]
    back = [[0] * (len(real) + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(k):
        for a, cost in enumerate(best[j]):
            if cost == inf:
                continue
            b = j * B - a
            for r in range(lo, hi + 1):
                a2, b2 = a + r, b + B - r
                if a2 > len(real) or b2 > len(fake):
                    continue
                longest = max(lengths[real[a2 - 1]] if r else 0, lengths[fake[b2 - 1]] if r < B else 0)
                if cost + longest < best[j + 1][a2]:
                    best[j + 1][a2], back[j + 1][a2] = cost + longest, r
    batches: list[list[int]] = []
    a = len(real)
    for j in range(k, 0, -1):
        r = back[j][a]
        b = j * B - a
        batches.append(real[a - r:a] + fake[b - (B - r):b])
        a -= r
    rng.shuffle(batches)
    for rows in batches:
        rng.shuffle(rows)
    return batches
