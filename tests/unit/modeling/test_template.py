"""The Vicuna v1 template: ids, masks and image position for several tokenizer families."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from modeling.template import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    VICUNA_SYSTEM,
    PromptTooLongError,
    build_prompt,
    build_training_example,
    render_text,
)
from modeling.tokenization.tokenizer import build_bpe_tokenizer, build_llama_style_tokenizer, demo_corpus
from sharding import schema

QUESTION = schema.EVAL_QUESTION
ANSWERS = [
    "<REASONING>The edges look smooth; lighting is consistent.</REASONING>\n<CONCLUSION>This image is real.</CONCLUSION>",
    "The texture is anomalous (über-smooth ✓). This image is fake.",
]


def _corpus():
    return list(demo_corpus(schema.ATTRIBUTES, [QUESTION])) + ANSWERS * 5


def _unigram_no_bos() -> PreTrainedTokenizerFast:
    """Sentencepiece-unigram-like: Metaspace that prefixes every segment, bos defined but never added."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(
        _corpus() * 3,
        trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False),
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    build_bpe_tokenizer(_corpus(), out, vocab_size=600)
    return {
        "bpe": AutoTokenizer.from_pretrained(str(out)),
        "llama": build_llama_style_tokenizer(_corpus(), 800),
        "llama_legacy": build_llama_style_tokenizer(_corpus(), 800, legacy=True),
        "unigram_no_bos": _unigram_no_bos(),
    }


KINDS = ["bpe", "llama", "llama_legacy", "unigram_no_bos"]


def llava_reference_ids(tokenizer, text: str) -> list[int]:
    """LLaVA's tokenizer_image_token, written out: chunks around <image> tokenised on their own."""
    chunks = [tokenizer(c).input_ids for c in text.split(IMAGE_PLACEHOLDER)]
    bos = tokenizer.bos_token_id
    offset = 1 if chunks[0] and chunks[0][0] == bos else 0
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + chunk[offset:]
    return ids


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("answer", ANSWERS)
def test_mask_is_exactly_the_answer_and_eos(kind, answer, tokenizers):
    tok = tokenizers[kind]
    ex = build_training_example(tok, QUESTION, answer)
    assert len(ex.input_ids) == len(ex.labels)
    assert ex.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ex.input_ids[ex.image_position] == IMAGE_TOKEN_INDEX
    assert ex.truncated_tokens == 0
    start = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:start])
    assert ex.labels[start:] == ex.input_ids[start:]
    assert ex.labels[-1] == tok.eos_token_id and tok.eos_token_id not in ex.input_ids[:-1]
    # Supervised ids are exactly " {answer}</s>": decoded behind the prompt
    # (so a sentencepiece decoder keeps the leading space) they add exactly it.
    text_ids = [i for i in ex.input_ids if i != IMAGE_TOKEN_INDEX]
    n_prompt = start - 1
    assert tok.decode(text_ids) == tok.decode(text_ids[:n_prompt]) + f" {answer}</s>"
    # The unsupervised part is the prompt, ending with "ASSISTANT:".
    prompt_ids, image_position = build_prompt(tok, QUESTION)
    assert ex.input_ids[:start] == prompt_ids and image_position == ex.image_position


@pytest.mark.parametrize("kind", KINDS)
def test_ids_match_llava_tokenisation_of_the_whole_text(kind, tokenizers):
    tok = tokenizers[kind]
    for answer in ANSWERS:
        ex = build_training_example(tok, QUESTION, answer)
        assert ex.input_ids == llava_reference_ids(tok, render_text(QUESTION, answer))
    prompt_ids, _ = build_prompt(tok, QUESTION)
    assert prompt_ids == llava_reference_ids(tok, render_text(QUESTION))


@pytest.mark.parametrize("kind", KINDS)
def test_bos_follows_the_tokenizer_convention_and_is_never_doubled(kind, tokenizers):
    tok = tokenizers[kind]
    ex = build_training_example(tok, QUESTION, ANSWERS[0])
    adds_bos = tok("a").input_ids[0] == tok.bos_token_id
    assert adds_bos == (kind != "unigram_no_bos")
    assert ex.input_ids.count(tok.bos_token_id) == (1 if adds_bos else 0)
    assert (ex.input_ids[0] == tok.bos_token_id) == adds_bos


def test_bpe_prompt_decodes_to_the_template_text(tokenizers):
    # Byte-level BPE adds no dummy prefix, so the ids are the text verbatim.
    tok = tokenizers["bpe"]
    ex = build_training_example(tok, QUESTION, ANSWERS[0])
    ids = ex.input_ids[: ex.image_position] + [0] + ex.input_ids[ex.image_position + 1 :]
    text = tok.decode(ids).replace(tok.convert_ids_to_tokens(0), IMAGE_PLACEHOLDER)
    assert text == "<s>" + render_text(QUESTION, ANSWERS[0])
    assert render_text(QUESTION, ANSWERS[0]).startswith(f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT: ")


@pytest.mark.parametrize("kind", KINDS)
def test_image_placeholder_in_the_question_is_moved_to_its_place(kind, tokenizers):
    tok = tokenizers[kind]
    want = build_training_example(tok, QUESTION, ANSWERS[0]).input_ids
    for q in (f"<image>\n{QUESTION}", f"{QUESTION}\n<image>", f"  {QUESTION} "):
        assert build_training_example(tok, q, ANSWERS[0]).input_ids == want


@pytest.mark.parametrize("kind", KINDS)
def test_forced_answer_prefix_matches_the_training_ids(kind, tokenizers):
    tok = tokenizers[kind]
    answer = "<CONCLUSION>This image is fake.</CONCLUSION>"
    ex = build_training_example(tok, QUESTION, answer)
    forced, _ = build_prompt(tok, QUESTION, answer_prefix="<CONCLUSION>This image is")
    assert ex.input_ids[: len(forced)] == forced
    assert len(forced) > len(build_prompt(tok, QUESTION)[0])


@pytest.mark.parametrize("kind", ["bpe", "llama"])
def test_truncation_cuts_the_answer_never_the_prompt(kind, tokenizers):
    tok = tokenizers[kind]
    full = build_training_example(tok, QUESTION, ANSWERS[0])
    n_answer = sum(lab != IGNORE_INDEX for lab in full.labels)
    prompt_len = len(full.input_ids) - n_answer

    exact = build_training_example(tok, QUESTION, ANSWERS[0], max_length=len(full.input_ids))
    assert exact == full

    cut = build_training_example(tok, QUESTION, ANSWERS[0], max_length=len(full.input_ids) - 3)
    assert cut.truncated_tokens == 3
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    assert tok.eos_token_id not in cut.labels  # a cut answer must not teach stopping

    # The image counts as image_seq_len positions of the budget.
    img = build_training_example(tok, QUESTION, ANSWERS[0], max_length=len(full.input_ids) + 9, image_seq_len=10)
    assert img.truncated_tokens == 0
    img = build_training_example(tok, QUESTION, ANSWERS[0], max_length=prompt_len + 9 + 1, image_seq_len=10)
    assert img.truncated_tokens == n_answer - 1 and img.input_ids[img.image_position] == IMAGE_TOKEN_INDEX

    with pytest.raises(PromptTooLongError, match="no room for the answer"):
        build_training_example(tok, QUESTION, ANSWERS[0], max_length=prompt_len)


def test_bad_inputs_are_clear_errors(tokenizers):
    tok = tokenizers["bpe"]
    with pytest.raises(ValueError, match="special token '</s>'"):
        build_training_example(tok, QUESTION, "This image is real.</s> more")
    with pytest.raises(ValueError, match="answer is empty"):
        build_training_example(tok, QUESTION, "  ")
    with pytest.raises(ValueError, match="question is empty"):
        build_training_example(tok, "<image>\n", "x")
    with pytest.raises(ValueError, match="image_seq_len"):
        build_training_example(tok, QUESTION, "x", max_length=100, image_seq_len=0)


def test_tokenizer_that_merges_across_the_answer_boundary_is_refused():
    # No pre-tokenizer: BPE learns pieces spanning "ASSISTANT: This", so the
    # answer's first token would include prompt text; the mask cannot be exact.
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.train_from_iterator(["ASSISTANT: This image is real."] * 50, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(ValueError, match="merges 'ASSISTANT:' with the answer"):
        build_training_example(tok, QUESTION, "This image is real.")


def test_llava_v1_conversation_text():
    from modeling.template import CONVERSATIONS, LLAVA_V1_SYSTEM

    assert LLAVA_V1_SYSTEM == (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.")
    assert CONVERSATIONS == {"vicuna_v1": VICUNA_SYSTEM, "llava_v1": LLAVA_V1_SYSTEM}
    # Same layout as Vicuna v1; only the system text differs.
    assert render_text(QUESTION, conversation="llava_v1") == f"{LLAVA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    assert render_text(QUESTION, ANSWERS[0], "llava_v1") == render_text(QUESTION, ANSWERS[0]).replace(
        VICUNA_SYSTEM, LLAVA_V1_SYSTEM)
    with pytest.raises(ValueError, match="chatml"):
        render_text(QUESTION, conversation="chatml")


@pytest.mark.parametrize("kind", KINDS)
def test_llava_v1_prompt_ids_match_llava_tokenisation(kind, tokenizers):
    tok = tokenizers[kind]
    ids, image_position = build_prompt(tok, QUESTION, conversation="llava_v1")
    assert ids == llava_reference_ids(tok, render_text(QUESTION, conversation="llava_v1"))
    assert ids[image_position] == IMAGE_TOKEN_INDEX and ids != build_prompt(tok, QUESTION)[0]
    # The default stays Vicuna v1, and training examples use it whatever the prompt option.
    assert build_prompt(tok, QUESTION)[0] == build_prompt(tok, QUESTION, conversation="vicuna_v1")[0]
    ex = build_training_example(tok, QUESTION, ANSWERS[0])
    assert ex.input_ids[: len(build_prompt(tok, QUESTION)[0])] == build_prompt(tok, QUESTION)[0]
    forced, _ = build_prompt(tok, QUESTION, answer_prefix="<CONCLUSION>This image is", conversation="llava_v1")
    assert forced[: len(ids)] == ids and len(forced) > len(ids)
