"""Bad input is a BadSample (counted and skipped by the stream); a bug is a bug.

Only the errors malformed data raises become a BadSample: the template's
ValueError for an unusable text, PIL's errors for an undecodable image. A
TypeError or AttributeError from the code that builds the example is raised
as it is, so a broken build fails the run at once instead of being counted as
bad data until the bad-sample budget runs out."""
from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest
from PIL import Image

from modeling.template import build_training_example
from pipeline.data.plan import Ref
from pipeline.data.reader import ShardCursor
from pipeline.data.samples import BadSample, prepare_text, preprocess


@pytest.fixture
def raw(tmp_path, shard_writer):
    """The one sample of a real shard, as the stream's reader returns it."""
    root = shard_writer(tmp_path / "train", [1], n_conv=1)
    cursor = ShardCursor([os.path.join(root, "shard-000000.tar")])
    try:
        return cursor.get(Ref(pos=0, visit=0, shard=0, index=0))
    finally:
        cursor.close()


def run(raw, tokenizer, image_processor, build_example=build_training_example, max_length=256, overlong="truncate"):
    return preprocess(raw, tokenizer=tokenizer, image_processor=image_processor, build_example=build_example,
                      seed=0, epoch=0, policy="first", max_length=max_length, overlong=overlong)


def with_answer(raw, text: str):
    """A copy of `raw` whose answer is `text`."""
    meta = json.loads(raw.members["json"])
    meta["conversations"][0][1]["value"] = text
    return dataclasses.replace(raw, members={**raw.members, "json": json.dumps(meta).encode()})


def test_a_good_sample_is_an_example(raw, tokenizer, image_processor):
    ex = run(raw, tokenizer, image_processor)
    assert ex.key == raw.key and len(ex.input_ids) == len(ex.labels) and ex.pixel_values.shape[0] == 3


def test_text_the_template_refuses_is_a_bad_sample(raw, tokenizer, image_processor):
    # A literal eos in the answer would end the sequence mid-answer: the template's ValueError.
    with pytest.raises(BadSample, match=r"template failed: ValueError: answer contains the special token"):
        run(with_answer(raw, f"It is real{tokenizer.eos_token} really."), tokenizer, image_processor)
    # No room for the answer (PromptTooLongError, a ValueError) with data.overlong=truncate.
    with pytest.raises(BadSample, match=r"template failed: PromptTooLongError"):
        run(raw, tokenizer, image_processor, max_length=4)


def test_an_undecodable_image_is_a_bad_sample(raw, tokenizer, image_processor):
    good = raw.members["png"]
    raw.members["png"] = good[:-30]  # the pixel data cut short, like an interrupted copy
    with pytest.raises(BadSample, match=r"undecodable image \.png: OSError: image file is truncated"):
        run(raw, tokenizer, image_processor)
    raw.members["png"] = b"GIF89a" + good[6:]  # a header that names another format
    with pytest.raises(BadSample, match=r"undecodable image \.png: UnidentifiedImageError"):
        run(raw, tokenizer, image_processor)


def test_a_bug_in_the_example_builder_is_raised_as_it_is(raw, tokenizer):
    def misnamed_keyword(tok, question, answer, max_length=None):
        return build_training_example(tok, question, answer, max_len=max_length)

    with pytest.raises(TypeError, match="max_len"):
        prepare_text(raw, tokenizer=tokenizer, build_example=misnamed_keyword, seed=0, epoch=0, policy="first",
                     max_length=256)

    def wrong_attribute(tok, question, answer, max_length=None):
        return build_training_example(tok.backend_tokenizer, question, answer, max_length=max_length)

    with pytest.raises(AttributeError):
        prepare_text(raw, tokenizer=tokenizer, build_example=wrong_attribute, seed=0, epoch=0, policy="first",
                     max_length=256)


def test_a_bug_in_the_image_step_is_raised_as_it_is(raw, tokenizer, image_processor):
    def processes_bytes(image):  # hands the processor what it does not take
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return image_processor(buf.getvalue())

    with pytest.raises(TypeError, match="expects a PIL image"):
        run(raw, tokenizer, processes_bytes)
    assert isinstance(Image.open(io.BytesIO(raw.members["png"])), Image.Image)  # the data itself is fine
