import pytest
import torch

from pipeline.data.samples import BadSample, Example, collate, question_answer


def example(key, ids, labels, label, pos=1):
    return Example(key, "s.tar", torch.full((3, 4, 4), float(label)), ids, labels, pos, label, 0)


def test_collate_right_pads_ids_labels_and_mask_exactly():
    a = example("a", [1, -200, 5], [-100, -100, 5], 1)
    b = example("b", [1, -200, 6, 7, 2], [-100, -100, 6, 7, 2], 0, pos=1)
    out = collate([a, b], pad_id=9)
    assert out["input_ids"].tolist() == [[1, -200, 5, 9, 9], [1, -200, 6, 7, 2]]
    assert out["labels"].tolist() == [[-100, -100, 5, -100, -100], [-100, -100, 6, 7, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["forgery_labels"].tolist() == [1, 0] and out["forgery_labels"].dtype == torch.long
    assert out["pixel_values"].shape == (2, 3, 4, 4) and out["pixel_values"][0].eq(1).all()
    assert out["keys"] == ["a", "b"] and out["image_positions"].tolist() == [1, 1]
    padded = collate([a, b], pad_id=9, pad_to_multiple_of=4)
    assert padded["input_ids"].shape == (2, 8) and padded["attention_mask"].sum().item() == 8
    assert padded["labels"][:, 5:].eq(-100).all()


def test_question_answer_strips_the_image_placeholder_and_checks_turns():
    conv = [{"from": "human", "value": "<image>\nIs it real?"}, {"from": "gpt", "value": "It is."}]
    assert question_answer(conv) == ("Is it real?", "It is.")
    with pytest.raises(BadSample, match="human, gpt"):
        question_answer(list(reversed(conv)))
    with pytest.raises(BadSample, match="one human turn and one gpt turn"):
        question_answer(conv + conv)
