"""Training data stream: webdataset shards -> deterministic, resumable per-rank batches.

API
---
    from pipeline.data import DataConfig, make_train_loader, batches_per_epoch

    loader = make_train_loader(
        data_cfg,            # DataConfig (validated here)
        tokenizer,           # transformers tokenizer with a pad token
        image_processor,     # modeling.image_processing.ImageProcessor
        rank=rank, world_size=world_size,   # explicit; never read from the env
        epoch=epoch,         # 0-based; seeds the shard order, shuffle and conversation choice
        start_batch=0,       # rank batches of this epoch already consumed (resume)
    )                        # -> torch DataLoader; len(loader) == batches_per_epoch - start_batch
    n = batches_per_epoch(data_cfg, world_size)   # same on every rank

Each batch is a dict:
    pixel_values   float [B, 3, S, S]   (pad to square with the CLIP mean, resize, normalise)
    input_ids      long  [B, T]         right-padded with tokenizer.pad_token_id; the image
                                        placeholder is IMAGE_TOKEN_INDEX (-200)
    attention_mask long  [B, T]         1 on real tokens, 0 on padding
    labels         long  [B, T]         -100 except answer tokens and the closing eos
    forgery_labels long  [B]            json "label": 0 real, 1 fake
    image_positions, conversation_index long [B]
    keys, shards   list[str]            sample keys and shard URLs, for error messages
    bad_samples    int                  bad samples replaced while building this batch
    bad_reasons    list[str]            "key in shard: reason" for each of them
    truncated_samples int               rows whose answer was cut by data.max_length
    epoch, batch_index, rank, worker    batch_index: position in the rank's epoch

Sum `bad_samples` over steps (and all-reduce over ranks) to report the bad
rate; a worker raises by itself, naming the shard, when its rate passes
data.max_bad_fraction. Bad samples are replaced by seeded spares, so every
batch has exactly data.batch_size rows.

Determinism and resume
----------------------
Batch b of (epoch, rank) is a pure function of (data.seed, epoch, rank,
world_size, data.num_workers, data.batch_size, data.shuffle_buffer,
data.shuffle_shards, data.resampled, data.samples_per_epoch, the length-grouping
settings, the shard list and its sizes.json counts); decoding and the
conversation choice add nothing random. Hence:

    make_train_loader(..., epoch=e, start_batch=k)  yields exactly batches k, k+1, ...
    of                  make_train_loader(..., epoch=e, start_batch=0)

To resume, store in the checkpoint the epoch and the number of micro-batches
this rank has consumed in it (optimizer steps in the epoch x gradient
accumulation; every rank has the same count) and pass that as start_batch;
when it equals batches_per_epoch the epoch is over: start epoch+1 at 0.
Resuming with a different world size, worker count, batch size or shard set
is possible but gives a different (still valid) stream; `stream_identity()`
returns the values to store and compare.

Skipping is cheap: each worker fast-forwards its seeded shard order and
shuffle buffer over (shard, index) references (integers, no I/O), then reads
only the samples still in its shuffle buffer (shards holding none of them are
never opened) and decodes nothing it skips.

Length-grouped batches (data.group_by_length, on by default)
------------------------------------------------------------
Each logical worker takes its batches data.group_window at a time (window w:
its batches w x group_window onwards, in the ungrouped order above), parses
the json and tokenises the epoch's conversation of those samples (no image is
decoded for that), sorts them by token length per label, cuts the window into
batches holding at least data.group_min_label_share of each label with the
least padding, and emits them in an order shuffled with a seed of (data.seed,
epoch, rank, logical worker, window). Only samples inside a window move, so the
batch count of every rank, the samples of each window and of the epoch (each
once) are those of the ungrouped stream. A resume inside a window
fast-forwards to the window's start as above and reads (without decoding
images) the window's earlier samples again, which rebuilds the same cut.
Bad samples are replaced after the cut, in their batch's slot, with the same
seeded spares. benchmarks/bench_padding.py measures padding and label balance.
"""
from .config import DataConfig
from .shards import ShardSet, discover_shards
from .stream import ShardStream, batches_per_epoch, make_train_loader, stream_identity

__all__ = [
    "DataConfig",
    "ShardSet",
    "ShardStream",
    "batches_per_epoch",
    "discover_shards",
    "make_train_loader",
    "stream_identity",
]
