"""Texts of the training shards, for what must be read from the data before the
run starts: the corpus of a tokenizer built from the data (tokenizer.path is
null) and the answers the CPM conclusion prefix is checked against.

The shards are found exactly as the training stream finds them
(`discover_shards`: a directory with its sizes.json, or a brace pattern such as
/data/train-{000000..000003}.tar next to one) and read with the stream's own
reader (`ShardCursor`, which groups tar members into samples the way
webdataset does), so the corpus is made of the samples the run trains on.

Damage does not end the read: a shard that cannot be opened or read to its end
contributes the samples before the damage, a sample whose json is not valid is
passed over, each with a warning naming the shard; only when no sample at all
could be read is it an error.
"""
from __future__ import annotations

import json
import logging
from typing import Iterator

from .plan import input_refs
from .reader import ShardCursor
from .shards import discover_shards

log = logging.getLogger(__name__)

TOKENIZER_PURPOSE = "the tokenizer is built from data.train_shards (tokenizer.path is null)"


def conversation_texts(meta: object, roles: tuple[str, ...] | None = None) -> list[str]:
    """The turn texts of a sample's metadata (without the <image> placeholder);
    `roles`: only the turns of these speakers. Malformed parts are passed over:
    the corpus only needs text, the training stream judges the sample."""
    convs = meta.get("conversations") if isinstance(meta, dict) else None
    return [str(turn.get("value", "")).replace("<image>", "")
            for conv in (convs if isinstance(convs, list) else []) if isinstance(conv, list)
            for turn in conv if isinstance(turn, dict) and (roles is None or turn.get("from") in roles)]


def shard_corpus(train_shards: str, limit: int, roles: tuple[str, ...] | None = None,
                 purpose: str = TOKENIZER_PURPOSE, remedy: str = "set tokenizer.path",
                 sizes_file: str | None = None) -> Iterator[str]:
    """Question and answer texts (`roles`: only the turns of these speakers, e.g.
    ("gpt",)) of the first `limit` samples of the training shards, in shard order.

    `purpose` and `remedy` complete the error messages (why the shards are read,
    what to change). Raises FileNotFoundError or ValueError when the shards
    cannot be found (discover_shards' reason) or no sample could be read.
    """
    try:
        shards = discover_shards(train_shards, sizes_file)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{purpose}, but {e}; {remedy}") from None
    cursor = ShardCursor(shards.urls)
    read, failed, unreadable = 0, None, []
    try:
        for ref in input_refs(((0, shard) for shard in range(len(shards))), shards.counts):
            if read >= limit:
                return
            if ref.shard == failed:
                continue  # the rest of a shard that could not be read
            raw = cursor.get(ref)
            if raw.error is not None:
                failed = ref.shard
                unreadable.append(f"{raw.shard} ({raw.error})")
                log.warning("reading the training shards: skipped the rest of %s: %s", raw.shard, raw.error)
                continue
            try:
                meta = json.loads(raw.members["json"])
            except (KeyError, ValueError) as e:  # no json member, or not (UTF-8) JSON
                reason = "no json member" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
                unreadable.append(f"{raw.shard} sample {raw.key} ({reason})")
                log.warning("reading the training shards: skipped sample %r of %s: %s", raw.key, raw.shard, reason)
                continue
            read += 1
            yield from conversation_texts(meta, roles)
    finally:
        cursor.close()
    if read == 0:
        raise ValueError(f"{purpose}, but no sample of {train_shards} could be read; unreadable: "
                         f"{'; '.join(unreadable)}; {remedy} or repair the shards")


def tokenizer_corpus(train_shards: str, limit: int, sizes_file: str | None = None) -> list[str]:
    """What a tokenizer built for a run (tokenizer.path null) learns from: the
    texts of the first `limit` training samples, then the project's fixed texts
    (system prompt, evaluation question, attribute names: modeling.tokenization.tokenizer.demo_corpus)."""
    from modeling.tokenization.tokenizer import demo_corpus
    from sharding.schema import ATTRIBUTES, EVAL_QUESTION

    texts = list(shard_corpus(train_shards, limit, sizes_file=sizes_file))
    return texts + list(demo_corpus(ATTRIBUTES, [EVAL_QUESTION]))
