"""A small byte-level BPE tokenizer for the tiny preset, and the CPM token lookup.

The paper model uses its LLM's own tokenizer; tests, the demo and the tiny
preset need one that can be built offline in a second. `build_bpe_tokenizer`
trains one with the `tokenizers` library and saves it as a transformers
tokenizer directory, so every stage loads it with `AutoTokenizer.from_pretrained`
exactly like a real one. It behaves like a LLaMA tokenizer where the template
cares: bos "<s>" is added to encoded sequences, eos is "</s>".
"""
from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from modeling.config import DEFAULT_CPM_PREFIX
from modeling.template import VICUNA_SYSTEM, encode_answer
from modeling.tokenization.export import save_tokenizer

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
# The answer's structure tags: added as normal (non-special) tokens so each is
# one id, survives `decode(skip_special_tokens=True)` and can be parsed back.
# MMFR answers are LLaVA-CoT style: SUMMARY, CAPTION, REASONING, CONCLUSION.
TAG_TOKENS = ("<SUMMARY>", "</SUMMARY>", "<CAPTION>", "</CAPTION>", "<REASONING>", "</REASONING>",
              "<CONCLUSION>", "</CONCLUSION>")

# The CPM reads the logits of the token after this text (docs/architecture.md, section 4). It is
# spelled as in the real MMFR answers and in the reference's hard-coded ids
# ("<CONCLUSION> This image is", with a space after the tag); the position is
# located whatever whitespace a given answer has there (modeling.cpm).
CPM_PREFIX = DEFAULT_CPM_PREFIX


def cpm_conclusion_texts(prefix: str = CPM_PREFIX) -> tuple[str, str]:
    """The real and fake conclusions tokenised for the lookup, spelled as they end an
    answer: the closing tag is included because a tokenizer may merge "real." with it."""
    return f"{prefix} real. </CONCLUSION>", f"{prefix} fake. </CONCLUSION>"


CPM_REAL_TEXT, CPM_FAKE_TEXT = cpm_conclusion_texts()

# Texts every corpus gets in addition to the caller's: they make the words the
# template and the CPM rely on ("ASSISTANT", " real", " fake", ...) frequent
# enough to become whole tokens even in a corpus that lacks them.
_SEED_REPEATS = 50


def _seed_texts() -> list[str]:
    return [
        f"{VICUNA_SYSTEM} USER: hello ASSISTANT: hi",
        CPM_REAL_TEXT,
        CPM_FAKE_TEXT,
        # The other spelling, so "This" directly after the tag is a token too.
        "<CONCLUSION>This image is real.</CONCLUSION>",
        "<CONCLUSION>This image is fake.</CONCLUSION>",
    ]


def build_bpe_tokenizer(
    corpus: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1024,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus`, save it to `out_dir`, and return it.

    vocab_size: upper bound on the vocabulary (specials, the 256 byte symbols,
        merges and tags included); a small corpus may stop short of it.
    min_frequency: a merge must occur this often in the corpus.
    model_max_length: recorded in tokenizer_config.json for downstream users.
    The result is checked with `cpm_token_ids`, so a tokenizer that cannot
    separate "real" from "fake" is never saved.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = len(SPECIAL_TOKENS) + len(alphabet) + len(TAG_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size must exceed {floor} (specials + 256 byte symbols + tags), got {vocab_size}")

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # No prefix space: "This" at the start of a text and "This" after ">" are
    # the same token, and a leading space is always explicit in the text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    seeds = itertools.chain.from_iterable(itertools.repeat(_seed_texts(), _SEED_REPEATS))
    tok.train_from_iterator(itertools.chain(corpus, seeds), trainer=trainer)
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False) for t in TAG_TOKENS])
    bos_id = tok.token_to_id(BOS)
    # Sequences start with bos, as LLaMA's tokenizer does; the template
    # follows whatever convention the tokenizer has.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    cpm_token_ids(fast)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(fast, out)
    return fast


def build_llama_style_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, legacy: bool = False) -> LlamaTokenizer:
    """A sentencepiece-style tokenizer shaped like LLaMA's, trained on `corpus` (for tests).

    Metaspace "▁" word boundaries with a dummy prefix, byte fallback through
    <0x00>..<0xFF>, bos added to every sequence, no structure tags: the
    conventions of the paper's LLaVA/Vicuna tokenizer, so code that must work
    with both families can be checked against it without downloading one.
    `legacy=True` prepends "▁" to every text segment (old LLaMA behaviour)
    instead of only the first.
    """
    trainer_tok = Tokenizer(models.BPE(unk_token=UNK))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = [UNK, BOS, EOS] + [f"<0x{i:02X}>" for i in range(256)]
    seeds = itertools.chain.from_iterable(itertools.repeat(_seed_texts(), _SEED_REPEATS))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(itertools.chain(corpus, seeds), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=legacy, add_bos_token=True)


def demo_corpus(attributes: Iterable[str], questions: Iterable[str]) -> Iterator[str]:
    """Texts in the MMFR answer layout, for a tokenizer built without a dataset.

    Pass the shared vocabulary: `demo_corpus(schema.ATTRIBUTES, [schema.EVAL_QUESTION])`
    (modeling/ does not import sharding/, so the caller hands it in). Yields the
    system text, each question in the template, each attribute name, and one
    answer per attribute in the LLaVA-CoT layout (SUMMARY, CAPTION, REASONING,
    a real/fake CONCLUSION), so the tiny preset's tokenizer encodes real samples
    in short sequences.
    """
    yield VICUNA_SYSTEM
    for q in questions:
        yield f"USER: <image>\n{q} ASSISTANT:"
    for i, attr in enumerate(attributes):
        yield attr
        word = ("real", "fake")[i % 2]
        yield (
            f"<SUMMARY> I will describe the image and check it for signs of generation. </SUMMARY> "
            f"<CAPTION> The image shows a scene. </CAPTION> "
            f"<REASONING> {attr}: the details of the image look "
            f"{'natural' if word == 'real' else 'unnatural'}. </REASONING> "
            f"{CPM_PREFIX} {word}. </CONCLUSION>"
        )


class CpmTokenError(ValueError):
    """The tokenizer cannot give the CPM one real and one fake token at one position."""


def cpm_context(tokenizer, prefix: str = CPM_PREFIX) -> tuple[list[int], int, int]:
    """(prefix_ids, real_id, fake_id): ids of the answer text before the real/fake token, and the two tokens.

    Both conclusions are tokenised the way they appear in an answer (via the
    template's answer encoding), and the first position where they differ is
    the CPM token. That position must be "aligned": what precedes it must be
    `prefix` ("<CONCLUSION> This image is") plus at most whitespace, so the
    logits there are those of the model choosing the word, not of some merged piece.
    """
    name = type(tokenizer).__name__
    real_text, fake_text = cpm_conclusion_texts(prefix)
    real = encode_answer(tokenizer, real_text)
    fake = encode_answer(tokenizer, fake_text)
    k = next((i for i, (a, b) in enumerate(zip(real, fake)) if a != b), None)
    if k is None:
        raise CpmTokenError(
            f"tokenizer {name} encodes {real_text!r} and {fake_text!r} without a differing "
            f"position (ids {real} vs {fake}); the CPM needs a real and a fake token"
        )
    prefix_ids = encode_answer(tokenizer, prefix)
    gap = real[len(prefix_ids):k]
    if real[: len(prefix_ids)] != prefix_ids or tokenizer.decode(gap).strip():
        raise CpmTokenError(
            f"tokenizer {name}: the first differing token of {real_text!r} / {fake_text!r} is at "
            f"position {k}, which does not directly follow {prefix!r} (tokens "
            f"{tokenizer.convert_ids_to_tokens(real)} vs {tokenizer.convert_ids_to_tokens(fake)})"
        )
    unk = tokenizer.unk_token_id
    if unk is not None and unk in (real[k], fake[k]):
        raise CpmTokenError(f"tokenizer {name} maps 'real' or 'fake' to the unknown token {tokenizer.unk_token!r}")
    return real[:k], real[k], fake[k]


# A token that carries the decision: the word, optionally after whitespace, and
# not followed by a letter ("▁real", "Ġfake", "▁real.</CONCLUSION>"; not "▁really").
_DECISION_PIECE = re.compile(r"\s*(real|fake)([\s.!?,;:]*)(.*)", flags=re.S)
_CLOSING_TAG = "</CONCLUSION>"


def _decision_label(piece: str) -> int | None:
    """0/1 when a token's text is the decision word, optionally followed by
    punctuation, whitespace and (part of) the closing tag; else None."""
    m = _DECISION_PIECE.fullmatch(piece)
    if m is None:
        return None
    rest = m.group(3).rstrip()
    if rest and not (_CLOSING_TAG.startswith(rest) or rest == _CLOSING_TAG):
        return None
    return 0 if m.group(1) == "real" else 1


def cpm_decision_tokens(tokenizer, prefix: str = CPM_PREFIX) -> dict[int, int]:
    """{token id: 0 real / 1 fake} of every token that can carry the decision right
    after `prefix` in an answer: the canonical pair of cpm_context and every other
    vocabulary entry that decodes to the word plus punctuation or whitespace. A
    small vocabulary merges the word with what follows it ("▁fake." vs "▁fake" +
    ".</", "▁real.\n</CONCLUSION>"), so which token carries the decision depends
    on the answer's spelling. The CPM always reads the canonical pair's logits;
    the other ids only let the position be found in every spelling."""
    _, real_id, fake_id = cpm_context(tokenizer, prefix)
    found = {real_id: 0, fake_id: 1}
    # Only pieces spelling the word can decode to it (both words are ASCII, so every
    # tokenizer family writes them literally in its pieces): decode just those.
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for tid, piece in enumerate(pieces):
        if piece is None or ("real" not in piece and "fake" not in piece):
            continue
        label = _decision_label(tokenizer.decode([tid]))
        if label is not None:
            found.setdefault(tid, label)
    return found


def cpm_token_ids(tokenizer, prefix: str = CPM_PREFIX) -> tuple[int, int]:
    """(real_id, fake_id) for the CPM, derived from the tokenizer in context (never hard-coded)."""
    _, real_id, fake_id = cpm_context(tokenizer, prefix)
    return real_id, fake_id
