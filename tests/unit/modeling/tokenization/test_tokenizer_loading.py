"""load_tokenizer: SentencePiece-exact tokenizers from LLaVA-style `tokenizer.model` folders.

The SentencePiece models are trained here by `sentencepiece` itself, shaped
like LLaMA's: BPE, byte fallback, split digits, no normalisation, a dummy
prefix, whitespace kept as is and whitespace-only pieces allowed, with
<unk>=0, <s>=1, </s>=2. The folder holds tokenizer.model and a
tokenizer_config.json like LLaVA-1.5's (LlamaTokenizer, no pad token).
"""
from __future__ import annotations

import json
import logging
import random

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import normalizers
from transformers import AutoTokenizer

from modeling.template import IMAGE_TOKEN_INDEX, build_training_example, encode_answer
from modeling.tokenization.tokenizer import build_bpe_tokenizer, cpm_token_ids
from modeling.tokenization.loading import (
    PROBE_TEXTS,
    TokenizerLoadError,
    TokenizerMismatchError,
    check_against_sentencepiece,
    load_tokenizer,
    sentencepiece_mismatches,
    tokenizer_from_sentencepiece,
)

WORDS = ("the image shows a woman man dog street building face hands hair edges lighting shadow texture "
         "background natural unnatural blurry sharp consistent inconsistent reflection eyes skin").split()
QUESTION = "Is this image real or fake? Explain your reasoning."


def _answer(rng: random.Random, i: int) -> str:
    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))
    return (f"<SUMMARY> {words(6)}. </SUMMARY> <CAPTION> {words(8)}, {rng.randint(0, 4096)} pixels. </CAPTION> "
            f"<REASONING> {words(10)};\n{words(7)}  {words(3)}. </REASONING> "
            f"<CONCLUSION> This image is {('real', 'fake')[i % 2]}. </CONCLUSION>")


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """MMFR-like answers, the Vicuna prompt, indented/spaced and non-ASCII lines."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        lines.append(_answer(rng, i))
        lines.append(f"A chat between a curious user and an artificial intelligence assistant. USER: \n{QUESTION} "
                     f"ASSISTANT: {_answer(rng, i + 1)}")
        lines.append(f"{' ' * rng.randint(1, 8)}{rng.choice(WORDS)}  {rng.choice(WORDS)}   café naïve 中文 {i}")
    return lines


LLAVA_TOKENIZER_CONFIG = {
    # As in LLaVA-1.5 / Vicuna releases: a slow LlamaTokenizer, bos added, no pad token.
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "pad_token": None,
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 2048,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
}


def train_folder(folder, model_type: str = "bpe", vocab_size: int = 700, **extra):
    """Train a LLaMA-shaped SentencePiece model into `folder`/tokenizer.model (+ LLaVA's tokenizer_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        character_coverage=1.0, minloglevel=2, **extra,
    )
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAVA_TOKENIZER_CONFIG))
    return folder


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    return train_folder(tmp_path_factory.mktemp("llava_tok"))


@pytest.fixture(scope="module")
def llama_scored_folder(tmp_path_factory, sp_folder):
    """The trained model with LLaMA's quirk: whitespace-only pieces keep low ids but get score -1e9.

    In LLaMA's tokenizer.model "▁▁" is id 259 yet is merged last; a merge order
    taken from piece ids instead of scores tokenises runs of spaces wrongly.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((sp_folder / "tokenizer.model").read_bytes())
    changed = 0
    for piece in proto.pieces:
        if piece.type == 1 and len(piece.piece) > 1 and set(piece.piece) == {"▁"}:
            piece.score, changed = -1e9, changed + 1
    assert changed >= 2, "the corpus should yield several whitespace-only pieces"
    folder = tmp_path_factory.mktemp("llama_scored")
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAVA_TOKENIZER_CONFIG))
    return folder


def probes() -> list[str]:
    """The loader's own probes plus texts it never saw: corpus lines of another seed, and pieces of them."""
    texts = list(PROBE_TEXTS) + corpus(60, seed=1)
    rng = random.Random(2)
    for line in corpus(60, seed=3):
        a = rng.randrange(len(line))
        texts.append(line[a: a + rng.randint(1, 40)])  # cuts land inside words, on spaces and newlines
    texts += [" " * k + "x" for k in range(1, 9)] + ["x" + " " * k + "y" for k in range(1, 9)]
    return texts


def sp_of(folder):
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


# --------------------------------------------------------------------------- the issue, and the fix


def test_plain_autotokenizer_is_not_sentencepiece_exact(sp_folder, llama_scored_folder):
    """Canary for the issue: transformers' own build of such a folder gives other ids than SentencePiece.

    If this starts failing, transformers builds these folders correctly now and
    the rebuild in modeling/tokenization/sentencepiece_tokenizer.py could be dropped (the load-time
    check should stay).
    """
    texts = probes()
    for folder in (sp_folder, llama_scored_folder):
        plain = AutoTokenizer.from_pretrained(str(folder))
        mismatches, n = sentencepiece_mismatches(plain, folder / "tokenizer.model", texts)
        assert n == len(texts)
        assert [m for m in mismatches if m.aspect == "encode"], f"{folder.name}: plain AutoTokenizer matched all {n}"


@pytest.mark.parametrize("which", ["trained", "llama_scored"])
def test_loader_encodes_exactly_as_sentencepiece(which, sp_folder, llama_scored_folder):
    folder = {"trained": sp_folder, "llama_scored": llama_scored_folder}[which]
    tok = load_tokenizer(folder)
    texts = probes()
    mismatches, n = sentencepiece_mismatches(tok, folder / "tokenizer.model", texts)
    assert n == len(texts) > 250
    assert mismatches == []
    sp = sp_of(folder)
    # The cases the issue names, spelled out.
    for text in (" leading space", "double  space", "   three leading", "a\nb", "\n newline first",
                 "café naïve 中文 🙂"):
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text


def test_user_defined_pieces_and_unigram_models_are_exact(tmp_path):
    for folder in (train_folder(tmp_path / "user_defined", user_defined_symbols=["<REASONING>", "</REASONING>"]),
                   train_folder(tmp_path / "unigram", model_type="unigram", vocab_size=400)):
        mismatches, _ = sentencepiece_mismatches(load_tokenizer(folder), folder / "tokenizer.model", probes())
        assert mismatches == [], folder.name
    tok = load_tokenizer(tmp_path / "user_defined")
    assert "<REASONING>" in tok.convert_ids_to_tokens(tok.encode("x<REASONING>y", add_special_tokens=False))


def test_check_names_folder_count_and_example(sp_folder):
    bad = tokenizer_from_sentencepiece(sp_folder)
    # Drop the dummy prefix: every non-empty text now starts with another piece.
    bad.backend_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    with pytest.raises(TokenizerMismatchError) as err:
        check_against_sentencepiece(bad, sp_folder)
    msg = str(err.value)
    assert str(sp_folder) in msg and "probe texts" in msg and "sentencepiece [" in msg
    mismatches, n = sentencepiece_mismatches(bad, sp_folder / "tokenizer.model")
    assert f"on {len(mismatches)} of {n} probe texts" in msg and len(mismatches) > n // 2


# --------------------------------------------------------------------------- what the project needs


def test_llava_conventions_and_template(sp_folder):
    tok = load_tokenizer(sp_folder)
    sp = sp_of(sp_folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    # LLaVA's tokenizer has no pad token; the v1 recipe pads with unk, and collate needs one.
    assert tok.pad_token == "<unk>" and tok.pad_token_id == sp.unk_id()
    assert len(tok) == sp.get_piece_size() and tok.model_max_length == 2048 and tok.padding_side == "right"

    answer = _answer(random.Random(5), 1)
    ex = build_training_example(tok, f"<image>\n{QUESTION}", answer)
    head = [sp.bos_id()] + sp.encode("A chat between a curious user and an artificial intelligence assistant. "
                                     "The assistant gives helpful, detailed, and polite answers to the user's "
                                     "questions. USER: ")
    tail = sp.encode(f"\n{QUESTION} ASSISTANT:")
    assert ex.input_ids[: len(head)] == head and ex.input_ids[len(head)] == IMAGE_TOKEN_INDEX
    assert ex.input_ids[len(head) + 1: len(head) + 1 + len(tail)] == tail
    # The answer is " {answer}" as it follows "ASSISTANT:", in SentencePiece's ids.
    anchor = sp.encode("ASSISTANT:")
    joined = sp.encode(f"ASSISTANT: {answer}")
    assert joined[: len(anchor)] == anchor
    assert encode_answer(tok, answer) == joined[len(anchor):]
    assert ex.input_ids[len(head) + 1 + len(tail):] == joined[len(anchor):] + [sp.eos_id()]
    real, fake = cpm_token_ids(tok)
    assert tok.decode([real]).strip() == "real" and tok.decode([fake]).strip() == "fake"


def test_saved_tokenizer_reloads_to_the_same_ids(sp_folder, tmp_path):
    tok = load_tokenizer(sp_folder)
    tok.save_pretrained(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "tokenizer.model").read_bytes() == (sp_folder / "tokenizer.model").read_bytes()
    saved_config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert saved_config["tokenizer_class"] == "LlamaTokenizer" and saved_config["add_bos_token"] is True
    again = load_tokenizer(tmp_path / "ckpt")
    texts = probes()
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id, len(again)) == \
        (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok))
    assert sentencepiece_mismatches(again, sp_folder / "tokenizer.model", texts)[0] == []


def test_tokenizer_json_next_to_the_model_is_checked_not_used(sp_folder, tmp_path, caplog):
    folder = tmp_path / "both"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (folder / name).write_bytes((sp_folder / name).read_bytes())
    # A hub folder whose tokenizer.json came from a faulty conversion.
    AutoTokenizer.from_pretrained(str(sp_folder)).backend_tokenizer.save(str(folder / "tokenizer.json"))
    with caplog.at_level(logging.WARNING, logger="modeling.tokenization.loading"):
        tok = load_tokenizer(folder)
    assert sentencepiece_mismatches(tok, folder / "tokenizer.model", probes())[0] == []
    assert any("tokenizer.json disagrees with tokenizer.model" in r.getMessage() for r in caplog.records)


def test_added_tokens_beyond_the_model(sp_folder, tmp_path):
    n = sp_of(sp_folder).get_piece_size()
    folder = tmp_path / "added"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((sp_folder / "tokenizer.model").read_bytes())
    config = dict(LLAVA_TOKENIZER_CONFIG, added_tokens_decoder={
        str(n): {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True},
        str(n + 1): {"content": "<im_patch>", "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": False},
    }, pad_token="<pad>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert len(tok) == n + 2 and tok.pad_token_id == n and tok.convert_tokens_to_ids("<im_patch>") == n + 1
    assert sentencepiece_mismatches(tok, folder / "tokenizer.model", probes())[0] == []

    config["added_tokens_decoder"] = {str(n + 1): config["added_tokens_decoder"][str(n + 1)]}
    config["pad_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerLoadError, match="do not continue"):
        load_tokenizer(folder)


def test_unreadable_folders_raise(tmp_path):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.model").write_bytes(b"\x08not a model proto")
    with pytest.raises(TokenizerLoadError, match="tokenizer.model"):
        load_tokenizer(tmp_path / "broken")


def test_folder_without_tokenizer_model_loads_as_written(tmp_path):
    built = build_bpe_tokenizer(corpus(30), tmp_path / "bpe", vocab_size=600)
    tok = load_tokenizer(tmp_path / "bpe")
    for text in probes()[:80]:
        assert tok.encode(text) == built.encode(text)
    assert tok.pad_token_id == built.pad_token_id
