"""The training stream: shards -> per-rank batches, deterministic and resumable.

Stages per logical worker (open_clip's webdataset pipeline, with every random
choice seeded and rank/world passed in explicitly):

  epoch shard order (seed, epoch)  -> split_by_node(rank, world)
  -> split_by_worker(worker, W)    (or seeded resampling of all shards)
  -> sample references, endless    -> seeded shuffle buffer
  -> read bytes (tar)              -> batch-sized slots
  -> [data.group_by_length: json + tokenise a window of data.group_window slots,
      sort it by token length, re-cut its batches, seeded batch order]
  -> decode + preprocess + tokenise -> collate -> stop after the worker's quota

The stage order lives in `wds.DataPipeline`; the first two stages work on
(shard, index) references only (pipeline/data/plan.py), so skipping the first
K batches of an epoch costs integer arithmetic plus reading the few shards that
still hold samples of the shuffle buffer, and no decoding.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..process_signals import exit_on_the_parents_sigterm
from .config import DataConfig
from .plan import (RefShuffle, WorkerId, batches_per_rank, group_window, input_refs, logical_worker,
                   seeded_rng, shard_visits, use_resampled, window_start, worker_batch_count,
                   worker_shards, worker_skip, Ref)
from .reader import RawSample, ShardCursor
from .samples import BadSample, Example, TextPart, collate, prepare_text, preprocess
from .shards import ShardSet, discover_shards

log = logging.getLogger("pipeline.data")

# One row of a slot: the raw sample and, when length grouping already parsed
# its json, the prepare_text result (or the BadSample it raised).
Pending = tuple[RawSample, "TextPart | BadSample | None"]

_LOG_FIRST = 5


class BadSampleBudget:
    """Counts a worker's bad samples, logs them rate-limited, raises past the limit."""

    def __init__(self, cfg: DataConfig, where: str):
        self.cfg, self.where = cfg, where
        self.seen = 0
        self.bad = 0
        self.by_shard: Counter[str] = Counter()
        self._logged = 0
        self._last_log = 0.0
        self._since_log = 0

    def ok(self) -> None:
        self.seen += 1

    def record(self, key: str | None, shard: str, reason: str) -> str:
        self.seen += 1
        self.bad += 1
        self.by_shard[shard] += 1
        line = f"{key or '?'} in {shard}: {reason}"
        now = time.monotonic()
        self._since_log += 1
        if self._logged < _LOG_FIRST:
            log.warning("%s: bad sample %s", self.where, line)
            self._logged += 1
            self._since_log, self._last_log = 0, now
        elif now - self._last_log >= self.cfg.bad_log_interval_s:
            log.warning("%s: %d bad samples of %d read (%d since last report); latest: %s",
                        self.where, self.bad, self.seen, self._since_log, line)
            self._last_log, self._since_log = now, 0
        if self.seen >= self.cfg.bad_check_min_samples and self.bad > self.cfg.max_bad_fraction * self.seen:
            worst = ", ".join(f"{s} ({n})" for s, n in self.by_shard.most_common(3))
            raise RuntimeError(
                f"{self.where}: {self.bad} bad samples of {self.seen} read exceeds "
                f"data.max_bad_fraction={self.cfg.max_bad_fraction}; latest: {line}; "
                f"most bad samples in: {worst}"
            )
        return line


class ShardStream(IterableDataset):
    """One rank's batches for one epoch, starting at rank batch `start_batch`.

    Each item is a dict: the model inputs of `samples.collate` plus
    `bad_samples` (int, bad samples replaced while building this batch),
    `bad_reasons` (their "key in shard: reason"), `epoch`, `batch_index` (the
    rank batch number within the epoch), `rank` and `worker` (logical worker).
    """

    def __init__(self, cfg: DataConfig, tokenizer, image_processor, *, rank: int, world_size: int,
                 epoch: int, start_batch: int = 0, shard_set: ShardSet | None = None,
                 build_example: Callable | None = None):
        super().__init__()
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; collate needs one to right-pad batches")
        if build_example is None:
            from modeling.template import build_training_example as build_example
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.build_example = build_example
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.shards = shard_set if shard_set is not None else discover_shards(cfg.train_shards, cfg.sizes_file)
        self.num_workers = max(cfg.num_workers, 1)
        self.resampled = use_resampled(cfg.resampled, len(self.shards), world_size, cfg.num_workers)
        if not self.resampled and len(self.shards) < world_size * self.num_workers:
            raise ValueError(
                f"data.resampled='off' with {len(self.shards)} shard(s) for {world_size} rank(s) x "
                f"{self.num_workers} worker(s): some worker would have no shard; use 'auto' or 'on'"
            )
        samples = cfg.samples_per_epoch or self.shards.total
        self.batches_per_epoch = batches_per_rank(samples, cfg.batch_size, world_size)
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} is outside [0, {self.batches_per_epoch}] "
                             f"(the rank's batches in epoch {epoch})")
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers but data.num_workers "
                               f"is {self.cfg.num_workers}")
        who = WorkerId(self.rank, self.world_size,
                       logical_worker(loader_worker, self.start_batch, self.num_workers), self.num_workers)
        return iter(self.pipeline(who))

    # -- stages --------------------------------------------------------------------------
    def pipeline(self, who: WorkerId) -> wds.DataPipeline:
        """The stage chain of one logical worker (usable without a DataLoader)."""
        quota = worker_batch_count(self.batches_per_epoch, who.worker, who.num_workers)
        skip = worker_skip(self.start_batch, who.worker, who.num_workers)
        if not self.cfg.group_by_length:
            return wds.DataPipeline(
                lambda: self._raw_slots(who, skip, quota),
                lambda slots: ([(raw, None) for raw in slot] for slot in slots),
                lambda slots: self._batches(slots, who, skip),
            )
        # A resume inside a window reads the window from its start: its earlier
        # batches' samples are needed to cut its later batches.
        first = window_start(skip, self.cfg.group_window)
        return wds.DataPipeline(
            lambda: self._raw_slots(who, first, quota),
            lambda slots: self._grouped(slots, who, first, skip, quota),
            lambda slots: self._batches(slots, who, skip),
        )

    def _raw_slots(self, who: WorkerId, skip: int, quota: int) -> Iterator[list[RawSample]]:
        """Batch-sized lists of raw samples for the worker's batches skip..quota-1
        (in ungrouped order: slot j holds what batch j would hold ungrouped)."""
        cfg, B = self.cfg, self.cfg.batch_size
        visits = shard_visits(len(self.shards), cfg.seed, self.epoch, cfg.shuffle_shards,
                              self.resampled, who)
        shuffle = RefShuffle(input_refs(visits, self.shards.counts), cfg.shuffle_buffer,
                             seeded_rng("samples", cfg.seed, self.epoch, who.rank, who.worker))
        # Fast-forward: the batches before `skip` are drawn as references only.
        for _ in range(skip * B):
            next(shuffle)
        cursor = ShardCursor(self.shards.urls, self.cfg.max_member_bytes)
        raw: dict[int, RawSample] = {}
        try:
            # The buffer's references were pulled before the resume point: read
            # just those (shards holding none of them are never opened).
            for ref in sorted(shuffle.buffer, key=lambda r: r.pos):
                raw[ref.pos] = cursor.get(ref)
            shuffle.on_pull = lambda r: raw.__setitem__(r.pos, cursor.get(r))
            for _ in range(skip, quota):
                yield [raw.pop(next(shuffle).pos) for _ in range(B)]
        finally:
            cursor.close()

    def _grouped(self, slots: Iterator[list[RawSample]], who: WorkerId, first: int, skip: int,
                 quota: int) -> Iterator[list[Pending]]:
        """Re-cut the slots of each window by token length (plan.group_window);
        yields the worker's batches skip..quota-1, whose samples are the
        window's samples, each once.

        `slots` starts at worker batch `first`, the start of skip's window. Only
        the json of a sample is parsed here (to know its length); images are
        decoded in _batches for the batches actually emitted, so the batches of
        a partial window before `skip` cost reading and tokenising only.
        """
        cfg, B, K = self.cfg, self.cfg.batch_size, self.cfg.group_window
        for start in range(first, quota, K):
            end = min(start + K, quota)
            rows: list[Pending] = []
            for _ in range(start, end):
                for raw in next(slots):
                    try:
                        rows.append((raw, self._text(raw)))
                    except BadSample as e:  # counted when its batch is built, like any bad sample
                        rows.append((raw, e))
            # A bad row sorts first among the reals; its spare keeps its own length and label.
            lengths = [t.length if isinstance(t, TextPart) else 0 for _, t in rows]
            labels = [t.label if isinstance(t, TextPart) else -1 for _, t in rows]
            rng = seeded_rng("group", cfg.seed, self.epoch, who.rank, who.worker, start // K)
            order = group_window(lengths, labels, B, rng, float(cfg.group_min_label_share))
            for j, idx in enumerate(order, start=start):
                if j >= skip:
                    yield [rows[i] for i in idx]

    def _batches(self, slots: Iterator[list[Pending]], who: WorkerId, skip: int) -> Iterator[dict]:
        where = f"rank {who.rank} worker {who.worker} epoch {self.epoch}"
        budget = BadSampleBudget(self.cfg, where)
        pad_id = self.tokenizer.pad_token_id
        for j, slot in enumerate(slots, start=skip):
            examples: list[Example] = []
            reasons: list[str] = []
            for i, (sample, text) in enumerate(slot):
                attempt = 0
                tried: list[tuple[int, int]] = []  # (shard, index) that failed for this slot
                while True:
                    try:
                        examples.append(self._preprocess(sample, text))
                        budget.ok()
                        break
                    except BadSample as e:
                        # Raises once the worker's bad share passes data.max_bad_fraction: the
                        # one limit. Every failed spare counts, so spares that keep failing end
                        # here too, after at most max(f/(1-f) x good samples read so far,
                        # data.bad_check_min_samples) of them.
                        reasons.append(budget.record(sample.key, sample.shard, str(e)))
                    tried.append((sample.ref.shard, sample.ref.index))
                    sample, text = self._spare(who, j, i, attempt, tried), None
                    attempt += 1
            batch = collate(examples, pad_id, self.cfg.pad_to_multiple_of)
            batch.update(bad_samples=len(reasons), bad_reasons=reasons, epoch=self.epoch,
                         batch_index=j * who.num_workers + who.worker, rank=who.rank, worker=who.worker)
            yield batch

    def _text(self, sample: RawSample) -> TextPart:
        cfg = self.cfg
        return prepare_text(sample, tokenizer=self.tokenizer, build_example=self.build_example, seed=cfg.seed,
                            epoch=self.epoch, policy=cfg.conversation_choice, max_length=cfg.max_length,
                            overlong=cfg.overlong)

    def _preprocess(self, sample: RawSample, text: TextPart | BadSample | None = None) -> Example:
        cfg = self.cfg
        return preprocess(sample, tokenizer=self.tokenizer, image_processor=self.image_processor,
                          build_example=self.build_example, seed=cfg.seed, epoch=self.epoch,
                          policy=cfg.conversation_choice, max_length=cfg.max_length,
                          overlong=cfg.overlong, text=text, image_limits=cfg.image_limits())

    def _spare(self, who: WorkerId, batch: int, slot: int, attempt: int,
               tried: list[tuple[int, int]]) -> RawSample:
        """A replacement for a bad sample, drawn with a seed of (batch, slot,
        attempt), so a resumed run draws the same spares and batches keep both
        their size and their reproducibility.

        The shard is drawn from the worker's own shards not yet `tried` for this
        slot, then from the other shards of the set, and only when every shard
        has failed once for this slot from all of them again: a truncated or
        unreadable shard would otherwise hand out bad spare after bad spare.
        A sample that already failed for the slot is not drawn again while its
        shard has others.
        """
        cfg = self.cfg
        n = len(self.shards)
        failed = {s for s, _ in tried}
        own = worker_shards(n, cfg.seed, self.epoch, cfg.shuffle_shards, self.resampled, who)
        readable = [s for s in range(n) if self.shards.counts[s] > 0]  # sizes.json may list empty shards
        pool = ([s for s in own if s not in failed and self.shards.counts[s] > 0]
                or [s for s in readable if s not in failed]
                or readable)
        rng = seeded_rng("spare", cfg.seed, self.epoch, who.rank, who.worker, batch, slot, attempt)
        shard = rng.choice(pool)
        count = self.shards.counts[shard]
        seen = sorted({i for s, i in tried if s == shard and 0 <= i < count})
        if len(seen) < count:
            index = rng.randrange(count - len(seen))
            for i in seen:  # -> the index-th of the samples not yet tried, in shard order
                if i <= index:
                    index += 1
        else:
            index = rng.randrange(count)
        cursor = ShardCursor(self.shards.urls, self.cfg.max_member_bytes)
        try:
            return cursor.get(Ref(-1, -1, shard, index))
        finally:
            cursor.close()


def _identity(batch: dict) -> dict:
    return batch


def _worker_init(_: int) -> None:
    # Loader workers run one sample at a time; intra-op threads only oversubscribe cores.
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Inherited from a rank that blocks the stop signals: the rank must still be able to end us.
    exit_on_the_parents_sigterm()


def make_train_loader(cfg: DataConfig, tokenizer, image_processor, *, rank: int, world_size: int,
                      epoch: int, start_batch: int = 0, shard_set: ShardSet | None = None,
                      build_example: Callable | None = None) -> DataLoader:
    """A DataLoader over one epoch of this rank's batches, from rank batch `start_batch`.

    len(loader) == batches_per_epoch - start_batch on every rank.
    """
    dataset = ShardStream(cfg, tokenizer, image_processor, rank=rank, world_size=world_size,
                          epoch=epoch, start_batch=start_batch, shard_set=shard_set,
                          build_example=build_example)
    extra = {}
    if cfg.num_workers > 0:
        extra = dict(prefetch_factor=cfg.prefetch_factor, worker_init_fn=_worker_init,
                     persistent_workers=False)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                      collate_fn=_identity, pin_memory=cfg.pin_memory, **extra)


def batches_per_epoch(cfg: DataConfig, world_size: int, shard_set: ShardSet | None = None) -> int:
    """Batches every rank runs per epoch (for schedules and resume arithmetic)."""
    cfg.validate()
    shards = shard_set if shard_set is not None else discover_shards(cfg.train_shards, cfg.sizes_file)
    return batches_per_rank(cfg.samples_per_epoch or shards.total, cfg.batch_size, world_size)


def stream_identity(cfg: DataConfig, world_size: int, shard_set: ShardSet | None = None) -> dict[str, Any]:
    """Everything besides (epoch, start_batch) that fixes the batches; store it in a
    checkpoint and compare on resume to know whether the continuation is exact.

    "length_grouping" is present only when data.group_by_length is on, so a run
    without grouping has the identity that checkpoints written before grouping
    existed recorded: resuming one of those with data.group_by_length=false is
    exact, and with grouping on it is reported as a different stream."""
    shards = shard_set if shard_set is not None else discover_shards(cfg.train_shards, cfg.sizes_file)
    identity = {
        "seed": cfg.seed,
        "world_size": world_size,
        "num_workers": max(cfg.num_workers, 1),
        "batch_size": cfg.batch_size,
        "shuffle_buffer": cfg.shuffle_buffer,
        "shuffle_shards": cfg.shuffle_shards,
        "resampled": use_resampled(cfg.resampled, len(shards), world_size, cfg.num_workers),
        "samples_per_epoch": cfg.samples_per_epoch or shards.total,
        "conversation_choice": cfg.conversation_choice,
        "shards": [os.path.basename(u) for u in shards.urls],
        "counts": list(shards.counts),
    }
    if cfg.group_by_length:
        identity["length_grouping"] = {"window": cfg.group_window,
                                       "min_label_share": float(cfg.group_min_label_share)}
    return identity
