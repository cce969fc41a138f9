"""The tiny byte-level BPE builder and the CPM token lookup."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from modeling.template import build_training_example
from modeling.tokenization.tokenizer import (
    CPM_PREFIX,
    TAG_TOKENS,
    CpmTokenError,
    build_bpe_tokenizer,
    build_llama_style_tokenizer,
    cpm_context,
    cpm_decision_tokens,
    cpm_token_ids,
    demo_corpus,
)
from sharding import schema

CORPUS = [
    "This image is real. This image is fake. The lighting looks natural.",
    "USER: describe ASSISTANT: the edges are smooth and the texture is consistent.",
] * 10


def sp_tokenizer(legacy: bool = False):
    return build_llama_style_tokenizer(CORPUS + list(demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION])), 900, legacy)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_bpe_tokenizer(demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION]), out, vocab_size=800)
    return AutoTokenizer.from_pretrained(str(out))


def test_saved_directory_loads_with_autotokenizer_and_matches(tmp_path):
    built = build_bpe_tokenizer(CORPUS, tmp_path, vocab_size=400)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert (loaded.bos_token, loaded.eos_token, loaded.unk_token, loaded.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert len({loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id, loaded.pad_token_id}) == 4
    assert len(loaded) == len(built) <= 400
    text = "This image is fake. Ünïcødé ✓ 画像\n\ttabs"
    assert loaded.encode(text) == built.encode(text)
    # bos is added like LLaMA's tokenizer; byte-level BPE round-trips any text.
    assert loaded.encode(text)[0] == loaded.bos_token_id
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text


def test_tags_are_single_normal_tokens(bpe):
    for tag in TAG_TOKENS:
        ids = bpe.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, (tag, bpe.convert_ids_to_tokens(ids))
    answer = "<REASONING>x</REASONING>\n<CONCLUSION>This image is real.</CONCLUSION>"
    # Not special: generated tags survive skip_special_tokens, so answers parse.
    assert bpe.decode(bpe.encode(answer), skip_special_tokens=True) == answer


def test_real_and_fake_are_single_tokens_with_the_demo_corpus(bpe):
    assert bpe.convert_ids_to_tokens(bpe.encode(" real", add_special_tokens=False)) == ["Ġreal"]
    assert bpe.convert_ids_to_tokens(bpe.encode(" fake", add_special_tokens=False)) == ["Ġfake"]
    real_id, fake_id = cpm_token_ids(bpe)
    assert (real_id, fake_id) == (bpe.convert_tokens_to_ids("Ġreal"), bpe.convert_tokens_to_ids("Ġfake"))


def test_vocab_size_too_small_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_bpe_tokenizer(CORPUS, tmp_path, vocab_size=100)


@pytest.mark.parametrize("kind", ["bpe", "sp", "sp_legacy"])
@pytest.mark.parametrize("spacing", [" ", "", "\n"])
def test_cpm_ids_are_where_the_training_labels_put_the_word(kind, spacing, bpe):
    tok = {"bpe": bpe, "sp": None, "sp_legacy": None}[kind] or sp_tokenizer(legacy=kind == "sp_legacy")
    prefix_ids, real_id, fake_id = cpm_context(tok)
    decision = cpm_decision_tokens(tok)
    assert real_id != fake_id and decision[real_id] == 0 and decision[fake_id] == 1
    assert tok.decode([real_id]).strip().startswith("real")
    assert tok.decode([fake_id]).strip().startswith("fake")
    for word, label in (("real", 0), ("fake", 1)):
        s = spacing
        answer = (f"<SUMMARY>{s}Look.{s}</SUMMARY>{s}<REASONING>{s}Looks fine.{s}</REASONING>{s}"
                  f"<CONCLUSION>{s}This image is {word}.{s}</CONCLUSION>")
        ex = build_training_example(tok, schema.EVAL_QUESTION, answer)
        sup = [t for t in ex.labels if t != -100]
        # The word follows " image is" inside the supervised answer (the tokens
        # before "image" depend on the whitespace after the tag), and whatever
        # token the spelling gives it is one of the decision tokens, with its label.
        tail = prefix_ids[-2:]
        hits = [i + len(tail) for i in range(len(sup) - len(tail)) if sup[i : i + len(tail)] == tail]
        assert hits and decision.get(sup[hits[-1]]) == label, (tok.convert_ids_to_tokens(sup), tail)


def test_cpm_error_when_real_and_fake_are_not_separable():
    # A word-level tokenizer that knows neither word: both become <unk>.
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<CONCLUSION>This", "image", "is", "ASSISTANT:"])}
    wl = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(CpmTokenError, match="without a differing position"):
        cpm_token_ids(tok)


def test_cpm_error_when_the_difference_is_not_aligned():
    # No pre-tokenizer: BPE merges whole sentences, so the first difference
    # is a piece that swallows "This image is" and is not the word's token.
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    texts = [f"{CPM_PREFIX} real.</CONCLUSION>", f"{CPM_PREFIX} fake.</CONCLUSION>"] * 50
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(CpmTokenError, match="does not directly follow"):
        cpm_token_ids(tok)


def test_demo_corpus_covers_the_schema_vocabulary():
    texts = list(demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION]))
    joined = "\n".join(texts)
    assert all(a in joined for a in schema.ATTRIBUTES)
    assert schema.EVAL_QUESTION in joined
    assert schema.REAL_CONCLUSION in joined and schema.FAKE_CONCLUSION in joined
    assert all(schema.conclusion_label(t) is not None for t in texts if "<CONCLUSION>" in t)
