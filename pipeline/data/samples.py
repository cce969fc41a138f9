"""Raw sample -> model inputs (in the loader workers), and the padding collate.

One image can carry several conversations (MMFR has 378K annotations for 120K
images); each epoch trains on one of them, picked by `choose_conversation`
from (seed, epoch, key) so that the pick is the same on any rank, worker, or
resumed run, and changes between epochs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from modeling.image_processing import ImageLimits, open_image
from modeling.template import IGNORE_INDEX
from sharding.schema import IMAGE_EXTENSIONS

from .reader import RawSample


class BadSample(Exception):
    """A sample that cannot be trained on; the message is the reason."""


# What a malformed sample makes each step raise; only these become a BadSample,
# anything else (TypeError, AttributeError, ...) is a bug and ends the run.
# The template (modeling.template) refuses an unusable text with ValueError
# (PromptTooLongError is one).
TEMPLATE_ERRORS = (ValueError,)
# PIL reports an unidentifiable, truncated or corrupt file as OSError
# (UnidentifiedImageError is one), a broken chunk as SyntaxError, a stream cut
# short as EOFError, bad header values as ValueError, and a too-large image as
# DecompressionBombError (an Exception of its own). An image outside
# data.max_image_side / max_image_aspect_ratio is an ImageSizeError (a ValueError), raised before decoding.
# MemoryError: an allocation for this one image failed (under a memory limit,
# e.g. ulimit -v); what it allocated is freed with the exception, so the sample
# is counted and the run goes on instead of dying on one file.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, MemoryError, Image.DecompressionBombError)
# The image processor on a decoded image: a mode or size it cannot convert.
IMAGE_PROCESS_ERRORS = (OSError, ValueError, MemoryError)


# Text longer than max_length x this many characters cannot fit in max_length tokens
# (no token of a tokenizer this pipeline uses spans more characters), so it is cut
# before tokenising: a 100 MB answer is not tokenised whole to keep 2048 ids.
MAX_CHARS_PER_TOKEN = 64


@dataclass
class Example:
    """One preprocessed sample, ready for `collate`."""

    key: str
    shard: str
    pixel_values: torch.Tensor  # [3, S, S]
    input_ids: list[int]
    labels: list[int]
    image_position: int
    forgery_label: int
    conversation_index: int
    truncated_tokens: int = 0  # answer ids cut by data.max_length


def choose_conversation(num: int, seed: int, epoch: int, key: str, policy: str) -> int:
    """Index of the conversation that `key` trains on in `epoch`."""
    if num < 1:
        raise ValueError("no conversation to choose from")
    if policy == "first" or num == 1:
        return 0
    if policy == "cycle":
        h = hashlib.sha256(f"conv\x1f{seed}\x1f{key}".encode("utf-8")).digest()
        return (int.from_bytes(h[:8], "little") + epoch) % num
    if policy == "random":
        h = hashlib.sha256(f"conv\x1f{seed}\x1f{epoch}\x1f{key}".encode("utf-8")).digest()
        return int.from_bytes(h[:8], "little") % num
    raise ValueError(f"data.conversation_choice={policy!r}: unknown policy")


def question_answer(conversation: Any) -> tuple[str, str]:
    """(question without the <image> placeholder, answer) of a LLaVA-style turn pair."""
    if not isinstance(conversation, list) or len(conversation) != 2:
        raise BadSample(
            f"conversation must be one human turn and one gpt turn, got "
            f"{len(conversation) if isinstance(conversation, list) else type(conversation).__name__}"
        )
    human, gpt = conversation
    if not isinstance(human, dict) or not isinstance(gpt, dict):
        raise BadSample("conversation turns must be objects with 'from' and 'value'")
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        raise BadSample(f"turns are from {human.get('from')!r}, {gpt.get('from')!r}; expected human, gpt")
    question, answer = human.get("value"), gpt.get("value")
    if not isinstance(question, str) or not isinstance(answer, str) or not answer.strip():
        raise BadSample("turn values must be strings and the answer non-empty")
    # The template puts the image first, as LLaVA's preprocess_multimodal does.
    return question.replace("<image>", "").strip(), answer


@dataclass
class TextPart:
    """The json half of a sample, prepared before its image is decoded: what
    length-grouped batching sorts by (pipeline/data/plan.py group_window)."""

    label: int
    choice: int  # index of the conversation trained on (choose_conversation)
    example: Any  # modeling.template.TrainingExample of that conversation

    @property
    def length(self) -> int:
        """Token ids of the example, the <image> placeholder counted as one."""
        return len(self.example.input_ids)


def prepare_text(raw: RawSample, *, tokenizer, build_example: Callable, seed: int, epoch: int,
                 policy: str, max_length: int, overlong: str = "truncate") -> TextPart:
    """Parse the json, pick the epoch's conversation and tokenise it; raise BadSample.

    Reads no image byte, so the stream can learn a sample's length (to group
    batches by it) before paying for the decode.
    """
    if raw.error is not None:
        raise BadSample(raw.error)
    if "json" not in raw.members:
        raise BadSample(f"no json member (members: {sorted(raw.members)})")
    try:
        meta = json.loads(raw.members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample(f"bad json: {e}") from None
    if not isinstance(meta, dict):
        raise BadSample("json is not an object")
    label = meta.get("label")
    if label not in (0, 1) or isinstance(label, bool):
        raise BadSample(f"json label is {label!r}, expected 0 or 1")
    conversations = meta.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("no conversation in json")
    choice = choose_conversation(len(conversations), seed, epoch, raw.key, policy)
    question, answer = question_answer(conversations[choice])
    budget = max_length * MAX_CHARS_PER_TOKEN
    if len(question) > budget:
        raise BadSample(f"question of {len(question)} characters cannot fit data.max_length={max_length} tokens")
    cut = len(answer) > budget
    if cut and overlong != "truncate":
        raise BadSample(f"answer of {len(answer)} characters cannot fit data.max_length={max_length} tokens "
                        f"(data.overlong={overlong})")
    if cut:
        answer = answer[:budget]  # still more than max_length tokens: the template truncates as before
    try:
        if overlong == "truncate":
            ex = build_example(tokenizer, question, answer, max_length=max_length)
        else:
            ex = build_example(tokenizer, question, answer)
    except TEMPLATE_ERRORS as e:
        raise BadSample(f"template failed: {type(e).__name__}: {e}") from None
    if len(ex.input_ids) != len(ex.labels):
        raise BadSample(f"template gave {len(ex.input_ids)} ids but {len(ex.labels)} labels")
    if len(ex.input_ids) > max_length:
        raise BadSample(f"{len(ex.input_ids)} tokens > data.max_length={max_length} (data.overlong={overlong})")
    if cut and not getattr(ex, "truncated_tokens", 0):
        # The cut text fit after all: its end (and eos) would be trained on as if complete.
        raise BadSample(f"answer cut to {budget} characters fits data.max_length={max_length} tokens: the "
                        f"tokenizer has tokens longer than {MAX_CHARS_PER_TOKEN} characters")
    return TextPart(int(label), choice, ex)


def preprocess(raw: RawSample, *, tokenizer, image_processor, build_example: Callable,
               seed: int, epoch: int, policy: str, max_length: int,
               overlong: str = "truncate", text: TextPart | BadSample | None = None,
               image_limits: ImageLimits | None = None) -> Example:
    """Decode, preprocess and tokenise one sample; raise BadSample with the reason.

    image_limits: bounds on the image's declared size, checked before it is
    decoded (DataConfig.image_limits(); None: the defaults).

    text: the sample's `prepare_text` result (or the BadSample it raised) when
    the stream already computed it to sort by length; None computes it here.
    """
    if isinstance(text, BadSample):
        raise text
    if text is None:
        text = prepare_text(raw, tokenizer=tokenizer, build_example=build_example, seed=seed, epoch=epoch,
                            policy=policy, max_length=max_length, overlong=overlong)
    image_ext = [ext for ext in raw.members if ext.lower() in IMAGE_EXTENSIONS]
    if len(image_ext) != 1:
        raise BadSample(f"expected one image member, found {image_ext or sorted(raw.members)}")
    try:
        image = open_image(raw.members[image_ext[0]], image_limits or ImageLimits())
    except IMAGE_DECODE_ERRORS as e:
        raise BadSample(f"undecodable image .{image_ext[0]}: {type(e).__name__}: {e}") from None
    try:
        with image:
            pixel_values = image_processor(image)
    except IMAGE_PROCESS_ERRORS as e:
        raise BadSample(f"image processor failed: {type(e).__name__}: {e}") from None
    ex = text.example
    return Example(raw.key, raw.shard, pixel_values, list(ex.input_ids), list(ex.labels),
                   int(ex.image_position), text.label, text.choice, int(getattr(ex, "truncated_tokens", 0)))


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Right-pad to the longest example: pad id, label -100, attention mask 0."""
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of > 1:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    n = len(examples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, e in enumerate(examples):
        t = len(e.input_ids)
        input_ids[i, :t] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :t] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[i, :t] = 1
    return {
        "pixel_values": torch.stack([e.pixel_values for e in examples]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "forgery_labels": torch.tensor([e.forgery_label for e in examples], dtype=torch.long),
        "image_positions": torch.tensor([e.image_position for e in examples], dtype=torch.long),
        "conversation_index": torch.tensor([e.conversation_index for e in examples], dtype=torch.long),
        "truncated_samples": sum(1 for e in examples if e.truncated_tokens),
        "keys": [e.key for e in examples],
        "shards": [e.shard for e in examples],
    }
