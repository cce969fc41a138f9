"""Probe texts on which a tokenizer must encode and decode exactly as sentencepiece
does, and the check that raises TokenizerMismatchError naming the folder."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from modeling.tokenization.sentencepiece_tokenizer import (
    _USER_DEFINED,
    SP_MODEL_FILE,
    TOKENIZER_JSON,
    TokenizerMismatchError,
    _sentencepiece,
)
from modeling.template import VICUNA_SYSTEM, render_text

log = logging.getLogger(__name__)

_ANSWER = (
    "<SUMMARY> The image shows a woman  standing in front of a building. </SUMMARY> "
    "<CAPTION> A portrait photo, 2 people, 1024x768 pixels. </CAPTION> "
    "<REASONING> The lighting on the face is inconsistent;\nthe edges of the hair blur into the background. "
    "</REASONING> <CONCLUSION> This image is fake. </CONCLUSION>"
)
_QUESTION = "Is this image real or fake? Explain the reasoning."

# Texts whose ids must equal SentencePiece's. They cover what the issue found
# broken (leading spaces, runs of spaces), what byte fallback and the dummy
# prefix touch (newlines, tabs, non-ASCII, emoji, empty and blank texts), and
# the segments the prompt template encodes on their own (modeling/template.py).
PROBE_TEXTS: tuple[str, ...] = (
    "", " ", "  ", "   ", "\n", "\n\n", "\t",
    "hello", " hello", "  hello", "    hello", "hello ", "hello  ", "hello  world", "hello   world",
    "a  b  c", "a \n b", "line one\nline two", "\nleading newline", "trailing newline\n", " \n x",
    "tab\tseparated\tvalues", "digits 0123456789 and 3.14159 and 2025-01-31",
    "café naïve façade Zürich", "中文字符和日本語のテキスト", "emoji 🙂👍🏽 done", "Ω≈ç√∫ µ≤≥÷",
    "<REASONING>", "</CONCLUSION>", "<CONCLUSION>This image is real.</CONCLUSION>",
    "<CONCLUSION>This image is fake.</CONCLUSION>", "<CONCLUSION>This image is",
    f"{VICUNA_SYSTEM} USER: ", f"\n{_QUESTION} ASSISTANT:", "ASSISTANT:",
    f"ASSISTANT: {_ANSWER}", f"ASSISTANT:  {_ANSWER}", _ANSWER,
    render_text(_QUESTION, _ANSWER).replace("</s>", ""),
)


@dataclass(frozen=True)
class ProbeMismatch:
    """One probe text on which a tokenizer and SentencePiece disagree."""

    # The probe text.
    text: str
    # What differs: "encode", "encode+special" (bos/eos framing) or "decode".
    aspect: str
    # SentencePiece's result (ids, or the decoded text for "decode").
    expected: object
    # The tokenizer's result.
    got: object


def probe_texts(model_file: str | Path) -> list[str]:
    """PROBE_TEXTS plus each user-defined piece of the model in context (they take another code path)."""
    _, model_pb2 = _sentencepiece()
    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    texts = list(PROBE_TEXTS)
    for p in [p for p in proto.pieces if p.type == _USER_DEFINED][:200]:
        text = p.piece.replace("▁", " ")
        texts += [text, f"a {text} b", f"x{text}y"]
    return texts


def sentencepiece_mismatches(tokenizer, model_file: str | Path,
                             texts: list[str] | None = None) -> tuple[list[ProbeMismatch], int]:
    """(mismatches, number of probes): `tokenizer` against `SentencePieceProcessor(model_file)`.

    Per text: `encode(text, add_special_tokens=False)` must equal
    `sp.encode(text)`; with special tokens it must be that framed by bos/eos
    as the tokenizer declares (add_bos_token / add_eos_token, LLaMA: bos only);
    and `decode` of SentencePiece's ids must equal `sp.decode`.
    """
    spm, _ = _sentencepiece()
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    texts = probe_texts(model_file) if texts is None else texts
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "add_eos_token", False) else []
    found = []
    for text in texts:
        expected = sp.encode(text)
        got = list(tokenizer.encode(text, add_special_tokens=False))
        if got != expected:
            found.append(ProbeMismatch(text, "encode", expected, got))
            continue
        framed = list(tokenizer.encode(text, add_special_tokens=True))
        if framed != bos + expected + eos:
            found.append(ProbeMismatch(text, "encode+special", bos + expected + eos, framed))
            continue
        decoded = tokenizer.decode(expected)
        if decoded != sp.decode(expected):
            found.append(ProbeMismatch(text, "decode", sp.decode(expected), decoded))
    return found, len(texts)


def describe(mismatch: ProbeMismatch, tokenizer) -> str:
    """One mismatch for an error message, with tokens where the results are ids."""
    if mismatch.aspect == "decode":
        return f"decoding the ids of {mismatch.text!r}: sentencepiece {mismatch.expected!r}, tokenizer {mismatch.got!r}"
    return (f"{mismatch.aspect} of {mismatch.text!r}: sentencepiece {mismatch.expected} "
            f"{tokenizer.convert_ids_to_tokens(mismatch.expected)}, tokenizer {mismatch.got} "
            f"{tokenizer.convert_ids_to_tokens(mismatch.got)}")


def check_against_sentencepiece(tokenizer, folder: str | Path, what: str = "the tokenizer") -> None:
    """Raise TokenizerMismatchError unless `tokenizer` encodes the probes exactly as `<folder>/tokenizer.model`."""
    folder = Path(folder)
    mismatches, n = sentencepiece_mismatches(tokenizer, folder / SP_MODEL_FILE)
    if mismatches:
        raise TokenizerMismatchError(
            f"{folder}: {what} disagrees with {SP_MODEL_FILE} (sentencepiece) on {len(mismatches)} of {n} "
            f"probe texts; first: {describe(mismatches[0], tokenizer)}"
        )

def _report_tokenizer_json(folder: Path) -> None:
    """Log when the folder's tokenizer.json (not used) encodes differently from its tokenizer.model."""
    try:
        shipped = PreTrainedTokenizerFast(tokenizer_file=str(folder / TOKENIZER_JSON),
                                          clean_up_tokenization_spaces=False)
    except Exception as exc:  # a broken file that is not used: worth a warning, not a failure
        log.warning("%s: ignoring %s, which cannot be read (%s)", folder, TOKENIZER_JSON, exc)
        return
    mismatches, n = sentencepiece_mismatches(shipped, folder / SP_MODEL_FILE)
    encode_mismatches = [m for m in mismatches if m.aspect == "encode"]
    if encode_mismatches:
        log.warning("%s: its %s disagrees with %s on %d of %d probe texts (first: %s); using %s, "
                    "which the reference's slow tokenizer used", folder, TOKENIZER_JSON, SP_MODEL_FILE,
                    len(encode_mismatches), n, describe(encode_mismatches[0], shipped), SP_MODEL_FILE)
