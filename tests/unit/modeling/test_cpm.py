"""Locating the CPM decision token on the real MMFR answer format, whatever the
whitespace after <CONCLUSION>, on two tokenizer families; the prefix helpers."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from modeling import cpm as cpm_math
from modeling.config import DEFAULT_CPM_PREFIX, ModelConfig
from modeling.model import FakeReasoningModel
from modeling.template import build_training_example
from modeling.tokenization.tokenizer import (
    build_bpe_tokenizer,
    build_llama_style_tokenizer,
    cpm_context,
    cpm_decision_tokens,
    demo_corpus,
)
from sharding import schema
from sharding.synthetic.annotations import CANONICAL_SPACING, IRREGULAR_SPACINGS, layout_answer

torch.set_num_threads(1)

# What follows <CONCLUSION> (and precedes </CONCLUSION>, and sits between blocks).
SPACINGS = [CANONICAL_SPACING, *IRREGULAR_SPACINGS, ("\t \n", " "), ("   ", "\n\n")]


def real_style_answer(word: str, inside: str = " ", between: str = " ") -> str:
    # The text mentions "real"/"fake" before the conclusion too: only the
    # conclusion's word may be taken.
    return layout_answer("I will check whether the image is real or fake.",
                         "A fake flower next to a real vase.",
                         "The lighting is real enough but the edges look fake.",
                         f"This image is {word}.", inside, between)


def corpus() -> list[str]:
    texts = list(demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION]))
    texts += [real_style_answer(w, i, b) for w in ("real", "fake") for i, b in SPACINGS] * 3
    return texts


def sentencepiece_folder(folder):
    """A LLaMA-shaped SentencePiece BPE model (byte fallback, no normalisation, the
    tags not special) trained by sentencepiece itself, as LLaVA/Vicuna folders ship it."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=700,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
    return folder


@pytest.fixture(scope="module", params=["byte_bpe", "sentencepiece", "llama_sp", "llama_sp_legacy"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte_bpe":
        return build_bpe_tokenizer(corpus(), tmp_path_factory.mktemp("bpe"), vocab_size=700)
    if request.param == "sentencepiece":
        from modeling.tokenization.loading import load_tokenizer

        return load_tokenizer(sentencepiece_folder(tmp_path_factory.mktemp("spm")))
    return build_llama_style_tokenizer(corpus(), 700, legacy=request.param.endswith("legacy"))


def _locator(tok, prefix=DEFAULT_CPM_PREFIX):
    prefix_ids, _, _ = cpm_context(tok, prefix)
    return cpm_math.DecisionLocator(tok, prefix, cpm_decision_tokens(tok, prefix), len(prefix_ids))


@pytest.mark.parametrize("inside,between", SPACINGS)
def test_the_decision_token_is_found_whatever_whitespace_follows_the_tag(tokenizer, inside, between):
    loc = _locator(tokenizer)
    decision = cpm_decision_tokens(tokenizer)
    for word, label in (("real", 0), ("fake", 1)):
        answer = real_style_answer(word, inside, between)
        ex = build_training_example(tokenizer, schema.EVAL_QUESTION, answer)
        pos = loc.positions(torch.tensor([ex.labels])).item()
        assert pos >= 0, (answer, tokenizer.convert_ids_to_tokens([t for t in ex.labels if t >= 0]))
        assert decision[ex.labels[pos + 1]] == label
        # It is the conclusion's word, not an earlier "real"/"fake" of the text.
        before = tokenizer.decode([t for t in ex.labels[: pos + 1] if t >= 0])
        assert before.rstrip().endswith("is") and "<CONCLUSION>" in before[-40:]
        assert "</CONCLUSION>" not in before


def test_the_old_prefix_without_the_space_missed_every_real_answer(tmp_path):
    # Before the fix the labels were matched against the tokens of
    # "<CONCLUSION>This image is" (no space), minus the first: on the real layout
    # no position was found and the CPM loss was silently zero. The same
    # token-pattern match is written out here, to show the answers defeat it
    # wherever the tag is its own token and "This" != " This" (LLaMA's tokenizer
    # too: 910 "▁This" vs 4013 "This"; the toy SentencePiece-style vocabularies
    # merge the tag with the word, and the dropped first token hid the difference).
    tokenizer = build_bpe_tokenizer(corpus(), tmp_path, vocab_size=700)
    old_prefix = "<CONCLUSION>This image is"
    old_ids, real_id, fake_id = cpm_context(tokenizer, old_prefix)
    pattern = old_ids[1:]
    found_old = found_new = 0
    loc = _locator(tokenizer)
    for word in ("real", "fake"):
        ex = build_training_example(tokenizer, schema.EVAL_QUESTION, real_style_answer(word))
        lab = ex.labels
        found_old += any(lab[t + 1 - len(pattern): t + 1] == pattern and lab[t + 1] in (real_id, fake_id)
                         for t in range(len(pattern), len(lab) - 1))
        found_new += loc.positions(torch.tensor([lab])).item() >= 0
    assert (found_old, found_new) == (0, 2)


def test_truncated_and_unsupervised_conclusions_have_no_position(tokenizer):
    loc = _locator(tokenizer)
    ex = build_training_example(tokenizer, schema.EVAL_QUESTION, real_style_answer("fake"))
    pos = loc.positions(torch.tensor([ex.labels])).item()
    cut = ex.labels[: pos + 1]  # the decision word itself cut off (max_length)
    hidden = list(ex.labels)
    hidden[pos + 1] = -100  # the word present but not supervised
    assert loc.positions(torch.tensor([cut, hidden[: len(cut)]])).tolist() == [-1, -1]
    assert loc.positions(torch.tensor([hidden])).item() == -1


def _word_level():
    words = ["<unk>", "<s>", "</s>", "<CONCLUSION>", "</CONCLUSION>", "This", "image", "is", "real", "fake", "x"]
    wl = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok, {w: i for i, w in enumerate(words)}


def test_locator_by_hand_takes_the_last_conclusion_only():
    tok, v = _word_level()
    loc = cpm_math.DecisionLocator(tok, DEFAULT_CPM_PREFIX, [v["real"], v["fake"]], 4)
    C, E, T, I, S = v["<CONCLUSION>"], v["</CONCLUSION>"], v["This"], v["image"], v["is"]
    labels = torch.tensor([
        [-100, v["fake"], C, T, I, S, v["fake"], E, -100],  # fake at 6 -> position 5
        [-100, -100, v["real"], v["x"], C, T, I, S, v["real"]],  # the conclusion's real at 8 -> 7
        [-100, C, T, I, v["x"], v["fake"], E, -100, -100],  # "image x fake": no prefix -> none
    ])
    assert loc.positions(labels).tolist() == [5, 7, -1]


def test_prefix_regex_and_spellings():
    assert cpm_math.last_prefix_end("a <conclusion>\n\tThis  image is fake.", DEFAULT_CPM_PREFIX) == \
        len("a <conclusion>\n\tThis  image is")
    assert cpm_math.last_prefix_end("This image is fake.", DEFAULT_CPM_PREFIX) == -1
    assert cpm_math.last_prefix_end("<CONCLUSION> Thisimage is", DEFAULT_CPM_PREFIX) == -1
    assert cpm_math.last_prefix_end("<CONCLUSION> This image is", "<CONCLUSION>This image is") == 26
    answers = [real_style_answer("fake")] * 3 + [real_style_answer("real", "", "")] + ["no conclusion"]
    counts = cpm_math.prefix_spellings(answers, DEFAULT_CPM_PREFIX)
    assert counts == {"<CONCLUSION> This image is": 3, "<CONCLUSION>This image is": 1}


def test_a_sentencepiece_tokenizer_spells_the_reference_ids_shape(tmp_path):
    # The reference's ids of "<CONCLUSION> This image is" are 6007 6154 3308 2725
    # 29958 910 1967 338: the tag in pieces, then "▁This ▁image ▁is" (the word
    # after the tag carries the space marker), and the decision word follows.
    from modeling.tokenization.loading import load_tokenizer

    tok = load_tokenizer(sentencepiece_folder(tmp_path))
    prefix_ids, real_id, fake_id = cpm_context(tok)
    pieces = tok.convert_ids_to_tokens(prefix_ids)
    assert pieces[-3:] == ["▁This", "▁image", "▁is"]
    assert "".join(pieces[:-3]).replace("▁", "") == "<CONCLUSION>"
    assert [tok.convert_ids_to_tokens([i])[0][:5] for i in (real_id, fake_id)] == ["▁real", "▁fake"]


def test_model_forward_finds_the_cpm_on_real_style_batches(tmp_path):
    tok = build_bpe_tokenizer(corpus(), tmp_path, vocab_size=700)
    torch.manual_seed(0)
    model = FakeReasoningModel.from_config(ModelConfig.preset("tiny"), tok).eval()
    answers = [(real_style_answer(w, i, b), lab) for (i, b) in SPACINGS for w, lab in (("real", 0), ("fake", 1))]
    exs = [build_training_example(tok, schema.EVAL_QUESTION, a) for a, _ in answers]
    t = max(len(e.input_ids) for e in exs)
    ids = torch.full((len(exs), t), tok.pad_token_id)
    labels = torch.full((len(exs), t), -100)
    mask = torch.zeros((len(exs), t), dtype=torch.long)
    for k, e in enumerate(exs):
        n = len(e.input_ids)
        ids[k, :n], labels[k, :n], mask[k, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    px = torch.randn(len(exs), 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(px, ids, mask, labels, forgery_labels=torch.tensor([lab for _, lab in answers]))
    assert out.cpm_found.all() and out.cpm_loss.item() > 0
    # score_p_fake reads the same position inside each answer, whatever its spacing.
    with torch.no_grad():
        scored = model.score_p_fake(px, [schema.EVAL_QUESTION] * len(exs), [a for a, _ in answers])
    torch.testing.assert_close(scored, out.p_fake, atol=1e-5, rtol=1e-5)
