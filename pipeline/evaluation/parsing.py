"""Parsing of generated FakeReasoning answers into a decision and a reasoning text.

Answers follow the MMFR (LLaVA-CoT) layout ``<SUMMARY> ... </SUMMARY>
<CAPTION> ... </CAPTION> <REASONING> ... </REASONING> <CONCLUSION> This image
is fake. </CONCLUSION>``; whitespace around the tags varies and is never
significant here. Generated text does not always follow the format (truncated
by ``max_new_tokens``, a conclusion that names both classes, no tags at all).
Two parsers exist, one per evaluation protocol (``PARSERS``), and every answer
gets an explicit ``parse_status`` so that nothing is lost silently.

``parse_answer`` (protocol "ours", the default):

==================  =========  ==================================================
status              decision   meaning
==================  =========  ==================================================
``ok``              yes        the conclusion is exactly one of the two canonical
                               sentences (case, spacing and the final period are
                               not significant)
``loose``           yes        the conclusion is not canonical but names exactly
                               one of the whole words "fake"/"real", without
                               negation (schema.conclusion_text_label)
``ambiguous``       no         it names both, or several conclusions disagree
``negated``         no         it holds a negation ("This image is not fake."):
                               reading it as the other class would be a guess
``no_decision``     no         a conclusion that names neither class
                               ("unrealistic" is not "real")
``no_conclusion``   no         no complete ``<CONCLUSION>...</CONCLUSION>`` block
==================  =========  ==================================================

The decision rule for non-canonical text is the one of
``sharding.schema.conclusion_label``, which labels the training
conversations, so the two stages cannot disagree on what an answer concludes.

``parse_answer_reference`` (protocol "reference", the rule of the reference's
``forgery_eval/eval.py``):

- an answer without a ``<REASONING>``...``</REASONING>`` block is dropped by
  the reference (status ``no_reasoning``: counted here, left out of the
  reference-convention metrics like every unparseable answer);
- the hypothesis is the text between the first ``<REASONING>`` and the first
  ``</REASONING>`` after it, stripped (later blocks are ignored);
- in the first ``<CONCLUSION>`` block (up to its ``</CONCLUSION>``, or to the
  end of a truncated answer) the case-sensitive substring
  "This image is fake." is looked for first, then "This image is real."
  (status ``ok``); neither: ``no_decision``; no ``<CONCLUSION>`` at all:
  ``no_conclusion``. The reference has no explicit rule for these two; they
  are reported as unparseable.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from sharding.schema import FAKE_CONCLUSION, REAL_CONCLUSION, conclusion_signals, conclusion_text_label

# Statuses whose answer carries a decision; every other status is "unparseable".
PARSEABLE_STATUSES: frozenset[str] = frozenset({"ok", "loose"})
ALL_STATUSES: tuple[str, ...] = ("ok", "loose", "ambiguous", "negated", "no_decision", "no_conclusion",
                                 "no_reasoning")

_CONCLUSION_RE = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", flags=re.S)
_REASONING_RE = re.compile(r"<REASONING>(.*?)</REASONING>", flags=re.S)
_OPEN_REASONING = "<REASONING>"
_CLOSE_REASONING = "</REASONING>"
_OPEN_CONCLUSION = "<CONCLUSION>"
_CLOSE_CONCLUSION = "</CONCLUSION>"


def _canonical(sentence: str) -> str:
    return " ".join(sentence.lower().split()).rstrip(".").strip()


_CANONICAL: dict[str, int] = {_canonical(REAL_CONCLUSION): 0, _canonical(FAKE_CONCLUSION): 1}


@dataclass(frozen=True)
class ParsedAnswer:
    """What one generated answer says."""

    pred: int | None
    """1 fake, 0 real, None when the answer has no usable decision."""
    parse_status: str
    """One of ALL_STATUSES (see the module docstring)."""
    reasoning: str
    """The hypothesis for BLEU/ROUGE/CSS: the text inside <REASONING>, stripped."""

    @property
    def parseable(self) -> bool:
        return self.parse_status in PARSEABLE_STATUSES


def extract_reasoning(answer: str) -> str:
    """The generated reasoning text (the hypothesis of the text metrics).

    - ``<REASONING>x</REASONING>``: ``x`` (several blocks are joined by a space);
    - an opening tag without its closing tag (generation cut by the token
      limit): the text after the tag, up to ``<CONCLUSION>`` if one follows,
      so a truncated answer is scored on what it did say;
    - no ``<REASONING>`` tag at all: ``""``. Text outside the tags is not the
      model's reasoning in this format, and scoring it would reward answers
      that ignore the format.
    """
    blocks = _REASONING_RE.findall(answer)
    if blocks:
        return " ".join(b.strip() for b in blocks if b.strip())
    start = answer.find(_OPEN_REASONING)
    if start < 0:
        return ""
    tail = answer[start + len(_OPEN_REASONING):]
    end = tail.find(_OPEN_CONCLUSION)
    return (tail if end < 0 else tail[:end]).strip()


SECTIONS: tuple[str, ...] = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")


def split_sections(answer: str) -> dict[str, str | None]:
    """The text of each of the four LLaVA-CoT sections (lower-case keys), stripped;
    None for a section the answer does not open. Several blocks of one tag are
    joined by a space; an opening tag without its closing tag (an answer cut by
    the token limit) runs to the next opening tag or the end, as in
    `extract_reasoning`, so a truncated answer still shows what it said."""
    out: dict[str, str | None] = {}
    for tag in SECTIONS:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", answer, flags=re.S)
        if blocks:
            out[tag.lower()] = " ".join(b.strip() for b in blocks if b.strip())
            continue
        start = answer.find(f"<{tag}>")
        if start < 0:
            out[tag.lower()] = None
            continue
        tail = answer[start + len(tag) + 2:]
        nxt = re.search(r"<(?:%s)>" % "|".join(SECTIONS), tail)
        out[tag.lower()] = (tail if nxt is None else tail[:nxt.start()]).strip()
    return out


def parse_answer(answer: str) -> ParsedAnswer:
    """Decision, status and reasoning of one generated answer (protocol "ours", see module docstring)."""
    reasoning = extract_reasoning(answer)
    conclusions = _CONCLUSION_RE.findall(answer)
    if not conclusions:
        return ParsedAnswer(None, "no_conclusion", reasoning)
    decisions: list[int | None] = []
    canonical = True
    for text in conclusions:
        exact = _CANONICAL.get(_canonical(text))
        if exact is not None:
            decisions.append(exact)
            continue
        canonical = False
        decisions.append(conclusion_text_label(text))
    decided = {d for d in decisions if d is not None}
    if len(decided) > 1:
        return ParsedAnswer(None, "ambiguous", reasoning)
    if not decided:
        signals = [conclusion_signals(t) for t in conclusions]
        # A negation matters only next to a class word ("Cannot tell." decides nothing).
        if any(negated and (f or r) for f, r, negated in signals):
            return ParsedAnswer(None, "negated", reasoning)
        both = any(f for f, _, _ in signals) and any(r for _, r, _ in signals)
        return ParsedAnswer(None, "ambiguous" if both else "no_decision", reasoning)
    # Several blocks that agree (or a decided block next to an undecided one)
    # still carry one decision; only a canonical single statement is "ok".
    status = "ok" if canonical and None not in decisions else "loose"
    return ParsedAnswer(decided.pop(), status, reasoning)


def parse_answer_reference(answer: str) -> ParsedAnswer:
    """The reference evaluation's parse (protocol "reference", see module docstring)."""
    start = answer.find(_OPEN_REASONING)
    end = answer.find(_CLOSE_REASONING, start + len(_OPEN_REASONING)) if start >= 0 else -1
    if end < 0:
        return ParsedAnswer(None, "no_reasoning", "")
    reasoning = answer[start + len(_OPEN_REASONING):end].strip()
    c = answer.find(_OPEN_CONCLUSION)
    if c < 0:
        return ParsedAnswer(None, "no_conclusion", reasoning)
    block = answer[c + len(_OPEN_CONCLUSION):]
    close = block.find(_CLOSE_CONCLUSION)
    block = block if close < 0 else block[:close]
    # Order and case matter: the reference tests the fake sentence first.
    if FAKE_CONCLUSION in block:
        return ParsedAnswer(1, "ok", reasoning)
    if REAL_CONCLUSION in block:
        return ParsedAnswer(0, "ok", reasoning)
    return ParsedAnswer(None, "no_decision", reasoning)


# Evaluation protocol name -> its parser.
PARSERS: dict[str, Callable[[str], ParsedAnswer]] = {"ours": parse_answer, "reference": parse_answer_reference}
