"""Parsing of generated FakeReasoning answers into a decision and a reasoning text.

The model is trained to answer ``<REASONING>...</REASONING>`` followed by
``<CONCLUSION>This image is fake.</CONCLUSION>`` (or ``... real.``). Generated
text does not always follow the format (truncated by ``max_new_tokens``, a
conclusion that names both classes, no tags at all), and the reference
implementation silently drops such answers. Here every answer gets an explicit
``parse_status`` so that both conventions can be reported and nothing is lost:

==================  =========  ==================================================
status              decision   meaning
==================  =========  ==================================================
``ok``              yes        the conclusion is exactly one of the two canonical
                               sentences (case, spacing and the final period are
                               not significant)
``loose``           yes        the conclusion is not canonical but names exactly
                               one of "fake"/"real" (schema.conclusion_label)
``ambiguous``       no         it names both, or several conclusions disagree
``no_decision``     no         a conclusion that names neither class
``no_conclusion``   no         no complete ``<CONCLUSION>...</CONCLUSION>`` block
==================  =========  ==================================================

The decision rule for non-canonical text is ``sharding.schema.conclusion_label``,
the same rule that labels the training conversations, so the two stages cannot
disagree on what an answer concludes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sharding.schema import FAKE_CONCLUSION, REAL_CONCLUSION, conclusion_label

# Statuses whose answer carries a decision; every other status is "unparseable".
PARSEABLE_STATUSES: frozenset[str] = frozenset({"ok", "loose"})
ALL_STATUSES: tuple[str, ...] = ("ok", "loose", "ambiguous", "no_decision", "no_conclusion")

_CONCLUSION_RE = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", flags=re.S)
_REASONING_RE = re.compile(r"<REASONING>(.*?)</REASONING>", flags=re.S)
_OPEN_REASONING = "<REASONING>"
_OPEN_CONCLUSION = "<CONCLUSION>"


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


def parse_answer(answer: str) -> ParsedAnswer:
    """Decision, status and reasoning of one generated answer (see module docstring)."""
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
        decisions.append(conclusion_label(f"<CONCLUSION>{text}</CONCLUSION>"))
    decided = {d for d in decisions if d is not None}
    if len(decided) > 1:
        return ParsedAnswer(None, "ambiguous", reasoning)
    if not decided:
        lowered = " ".join(conclusions).lower()
        both = "fake" in lowered and "real" in lowered
        return ParsedAnswer(None, "ambiguous" if both else "no_decision", reasoning)
    # Several blocks that agree (or a decided block next to an undecided one)
    # still carry one decision; only a canonical single statement is "ok".
    status = "ok" if canonical and None not in decisions else "loose"
    return ParsedAnswer(decided.pop(), status, reasoning)
