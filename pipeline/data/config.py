"""Typed configuration of the training data stream (shards -> batches).

The training config (pipeline/training/config.py) nests one `DataConfig` under `data`;
every error raised here names the field as `data.<field>` so that a bad recipe
or command-line override points at the line to fix.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from common.config_loading import ConfigError, check_fields, load_section
from modeling.image_processing import ImageLimits

from .reader import MAX_MEMBER_BYTES


@dataclass
class DataConfig:
    """How training shards become per-rank batches."""

    train_shards: str = ""
    """Training shard set: a directory holding `sizes.json` (and the sharder's
    `manifest.json`) next to its `shard-*.tar`, or a brace pattern such as
    `/data/train/shard-{000000..000127}.tar` (also `pipe:`/`http(s):` URLs of
    webdataset's `gopen`). Per-shard sample counts always come from sizes.json:
    the epoch length and mid-epoch resume are computed from them."""

    allow_pipe_urls: bool = False
    """Allow `pipe:COMMAND` shard URLs (webdataset runs COMMAND in a shell for every
    shard) and webdataset's GOPEN_REWRITE environment variable (which can turn any
    URL into one). Off: both are refused at start-up, so a recipe or an environment
    cannot run a shell command by naming a shard."""

    sizes_file: str | None = None
    """sizes.json to use with a brace pattern whose shards do not sit next to
    one (remote shards). None: `sizes.json` in the pattern's directory."""

    batch_size: int = 8
    """Micro-batch size per rank (DeepSpeed's train_micro_batch_size_per_gpu)."""

    num_workers: int = 2
    """DataLoader worker processes per rank; 0 decodes in the training process.
    Part of the stream's identity: resuming with another value gives other
    batches (see pipeline/data/__init__.py)."""

    prefetch_factor: int = 2
    """Batches each worker prepares ahead (ignored when num_workers is 0)."""

    pin_memory: bool = False
    """Pin batch tensors in page-locked memory (useful on GPU hosts)."""

    shuffle_buffer: int = 256
    """Sample shuffle buffer per worker, in samples; 0 or 1 keeps shard order.
    The buffer holds raw (undecoded) image bytes: about shuffle_buffer x mean
    image file size per worker (256 x ~0.5 MB DiffusionDB PNG = ~128 MB). The
    sharder already interleaves sources and labels with a seeded permutation,
    so the buffer only has to break up the order within and across shards."""

    shuffle_shards: bool = True
    """Shuffle the shard order every epoch, seeded by (seed, epoch)."""

    seed: int = 0
    """Data seed: with (epoch, rank, world size, num_workers, batch_size) it fixes
    every batch, so a resumed run sees the same batches as an uninterrupted one."""

    resampled: Literal["auto", "on", "off"] = "auto"
    """"on": every worker draws shards with replacement (seeded) forever;
    "off": shards are split between ranks then workers without replacement;
    "auto": "on" exactly when there are fewer shards than world_size x
    max(num_workers, 1), where splitting would leave a worker without data."""

    samples_per_epoch: int | None = None
    """Samples in one epoch over all ranks; None: the total of sizes.json. The
    per-rank batch count is ceil(samples_per_epoch / (batch_size x world_size)),
    identical on every rank (unequal counts hang ZeRO-3 collectives)."""

    max_length: int = 2048
    """Longest tokenised example, the <image> placeholder counted as one id (the
    model widens it to its image tokens; pipeline/training/config.py checks the sum
    against the LLM's positions)."""

    overlong: Literal["truncate", "skip"] = "truncate"
    """An example longer than max_length: "truncate" cuts the answer from its
    end like the reference (the template drops the eos too; counted per batch
    as `truncated_samples`, and such a row may lose the <CONCLUSION> the CPM
    reads); "skip" treats it as a bad sample (replaced, counted)."""

    pad_to_multiple_of: int = 1
    """Right-pad each batch to a multiple of this many tokens (8 helps tensor
    cores); 1 pads to the longest example of the batch."""

    group_by_length: bool = True
    """Length-grouped batches: each worker takes its samples `group_window`
    batches at a time, sorts that window by token length (of the conversation
    the epoch trains on, known before the image is decoded), cuts it into
    batches and emits them in a seeded random order, so that right padding is
    small. It permutes samples within a window only: batch counts per rank, the
    samples of an epoch and exact mid-epoch resume are unchanged. Part of the
    stream's identity: a run started with another value resumes valid but with
    other batches (set it false to continue a run started before it existed)."""

    group_window: int = 16
    """Batches per length-grouping window (per worker). Larger: less padding,
    more raw samples held (group_window x batch_size per worker, on top of the
    shuffle buffer), and a resume inside a window reads (without decoding an
    image) the window's earlier samples again."""

    group_min_label_share: float = 0.375
    """Least share of each label (real, fake) in every length-grouped batch,
    rounded down to rows (batch 8: at least 3 of each). Fake and real answers
    differ in length, so sorting by length alone makes long batches mostly fake
    and short ones mostly real; within this bound each batch's label counts are
    chosen to pad least (pipeline/data/plan.py group_window). 0: by length
    alone; 0.5: even batches. Random batches of 8 average min(real, fake) / 8 =
    0.36 with 0.8% label-pure; see benchmarks/bench_padding.py for the padding
    each value costs."""

    conversation_choice: Literal["random", "cycle", "first"] = "random"
    """Which of an image's conversations an epoch trains on: "random" draws one
    with a hash of (seed, epoch, key); "cycle" starts at a seeded offset per
    image and advances by one each epoch, so every conversation is used once
    per len(conversations) epochs; "first" always takes the first."""

    max_bad_fraction: float = 0.01
    """Largest tolerated share of bad samples (undecodable image, bad json, no
    usable conversation, template failure, too long, missing from its shard,
    unreadable or truncated shard) per worker and epoch; above it the stream
    raises naming the shards with the most bad samples. This is the only limit:
    bad samples are replaced by seeded spare samples, so batches keep their size,
    and a spare is drawn first from shards that have not yet failed for that
    batch slot (the worker's own, then the rest of the set), so one dead shard
    cannot exhaust the spares. Failed spares count as bad samples too."""

    bad_check_min_samples: int = 200
    """Samples a worker must have read before max_bad_fraction is enforced, so
    that one early bad sample in a tiny run does not stop training."""

    bad_log_interval_s: float = 30.0
    """Rate limit of bad-sample log lines per worker: the first 5 are logged
    one by one, then at most one summary line per this many seconds."""

    max_member_bytes: int = MAX_MEMBER_BYTES
    """Largest tar member read into memory, in bytes (default 256 MiB); a sample with
    a larger member is a bad sample and its bytes are never read (a tar header can
    declare 4 GB, which every loader worker would otherwise hold)."""

    max_image_side: int = ImageLimits.max_side
    """Longest side in pixels an image may declare; checked before it is decoded
    or padded, a larger one is a bad sample (replaced, counted). The same default
    as the sharder's --max-side, so shards it wrote always pass."""

    max_image_aspect_ratio: float = ImageLimits.max_aspect_ratio
    """Largest longer-side / shorter-side ratio of an image (same check and default
    as max_image_side; the sharder's --max-aspect-ratio). A 1 KB PNG can declare
    1,000,000 x 1 pixels: cheap to decode, 3 TB once padded to a square."""

    def validate(self) -> "DataConfig":
        """Check field types (common.config_loading), values and combinations;
        raise ConfigError naming the field as data.<field>."""
        check_fields(self, "data")

        def bad(name: str, why: str) -> None:
            raise ConfigError(f"data.{name}={getattr(self, name)!r}: {why}")

        if not self.train_shards.strip():
            bad("train_shards", "required: a shard directory with sizes.json or a brace pattern")
        if not self.allow_pipe_urls:
            if self.train_shards.strip().startswith("pipe:"):
                bad("train_shards", "a pipe: URL runs a shell command per shard; set data.allow_pipe_urls=true "
                                    "if that is what you want")
            if os.environ.get("GOPEN_REWRITE"):
                raise ConfigError("GOPEN_REWRITE is set: webdataset would rewrite shard URLs with it (possibly "
                                  "into pipe: commands); unset it, or set data.allow_pipe_urls=true")
        for name in ("batch_size", "prefetch_factor", "max_length", "pad_to_multiple_of", "group_window"):
            if getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        for name in ("num_workers", "shuffle_buffer", "bad_check_min_samples", "seed"):
            if getattr(self, name) < 0:
                bad(name, "must be an integer >= 0")
        if not 0.0 <= self.group_min_label_share <= 0.5:
            bad("group_min_label_share", "must be a number in [0, 0.5]")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            bad("samples_per_epoch", "must be None (whole shard set) or an integer >= 1")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            bad("max_bad_fraction", "must be in [0, 1)")
        if self.bad_log_interval_s < 0:
            bad("bad_log_interval_s", "must be >= 0")
        if self.max_member_bytes < 1:
            bad("max_member_bytes", "must be an integer >= 1")
        if self.max_image_side < 1:
            bad("max_image_side", "must be an integer >= 1")
        if not self.max_image_aspect_ratio >= 1:
            bad("max_image_aspect_ratio", "must be a number >= 1")
        return self

    def image_limits(self) -> ImageLimits:
        """max_image_side and max_image_aspect_ratio as the loaders take them."""
        return ImageLimits(self.max_image_side, self.max_image_aspect_ratio)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        """Build from a plain dict (YAML section) through the typed loader; unknown
        keys and wrong types are errors naming data.<field>."""
        return load_section(cls, values, "data").validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

