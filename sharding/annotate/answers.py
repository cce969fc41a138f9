"""Reading model answers: strict JSON, never evaluated.

A result line is one line of an OpenAI Batch output or error file (vLLM's
`run-batch` and our direct mode's journal write the same shape):
    {"id": ..., "custom_id": ..., "response": {"status_code": 200, "request_id": ...,
     "body": {"choices": [{"message": {"content": "..."}}], "usage": {...}}}, "error": null}
`read_result` turns it into the answer text or a rejection; `parse_answer`
finds the JSON object in the text (bare, in a code fence, or inside prose),
reads the verdict, and keeps only the label's known attribute names. Python
expressions, NaN/Infinity and anything else that is not JSON are rejected as
"not_json": the text is only ever given to `json`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .. import schema

# Every reason an answer (or a request) can be rejected for; the report lists each.
REASONS: dict[str, str] = {
    "malformed_line": "the result line is not a JSON object with a custom_id (Batch output format)",
    "error_line": "the result line carries an error instead of a response (the request failed)",
    "http_status": "the response's status_code is not 200",
    "no_content": "the response body has no choices[0].message.content text",
    "not_json": "the answer holds no JSON object (answers are parsed as JSON, never evaluated)",
    "no_verdict": "the JSON answer has no 'Answer' that says real or fake",
    "cannot_determine": "the model answered that it cannot determine real or fake",
    "label_contradiction": "the verdict contradicts the label of the image's folder",
    "no_attribute": "no known attribute name of the label has a text",
    "no_request": "the custom_id matches no request in the --requests folders",
    "no_answer": "a request has no result line in any result file",
    "image_missing": "the requested image is no longer at its path",
    "image_changed": "the requested image's bytes changed since the request was written",
}

ATTRIBUTE_KEYS: dict[int, str] = {1: "Forgery Attributes", 0: "Attributes"}
LABEL_ATTRIBUTES: dict[int, tuple[str, ...]] = {1: schema.FORGERY_ATTRIBUTES, 0: schema.AUTHENTICITY_ATTRIBUTES}
# Answers longer than this are not searched for JSON (bounded work per answer).
MAX_ANSWER_CHARS = 200_000
MAX_OBJECT_STARTS = 2_000
_CANNOT = re.compile(r"\b(?:cannot|can ?not|can't|can’t|unable to|not possible to|impossible to)\s+"
                     r"(?:be\s+)?(?:determine|determined|tell|decide|judge|say)", re.I)
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)
_NULL_WORDS = {"", "null", "none", "n/a", "na", "-"}


class Rejected(Exception):
    """An answer or result line that is not kept: reason (a REASONS key) and detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class ResultLine:
    """The parts of one result line that matter."""

    custom_id: str
    content: str | None = None
    """The answer text (None when rejected)."""
    rejection: Rejected | None = None
    usage: dict[str, int] = field(default_factory=dict)
    """Token counts of the response, when it has them."""


@dataclass
class Answer:
    """A kept answer."""

    attributes: dict[str, str | None]
    """All five attribute names of the label -> text or None."""
    caption: str | None
    """The answer's "Caption" text, if any."""
    unknown_names: list[str]
    """Attribute names in the answer that are not the label's (dropped)."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constants)


def read_result(obj: Any) -> ResultLine:
    """One parsed JSON line of a result file -> the answer text or a rejection."""
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
        raise Rejected("malformed_line", "not an object with a string custom_id")
    out = ResultLine(obj["custom_id"])
    resp = obj.get("response")
    body = resp.get("body") if isinstance(resp, dict) else None
    usage = body.get("usage") if isinstance(body, dict) else None
    if isinstance(usage, dict):
        out.usage = {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
    err = obj.get("error")
    if err:
        msg = err.get("message") or err.get("code") if isinstance(err, dict) else err
        out.rejection = Rejected("error_line", str(msg)[:300])
        return out
    if not isinstance(resp, dict):
        out.rejection = Rejected("error_line", "no response and no error")
        return out
    status = resp.get("status_code")
    if status != 200:
        detail = body.get("error", body) if isinstance(body, dict) else body
        out.rejection = Rejected("http_status", f"status_code {status}: {json.dumps(detail)[:300]}")
        return out
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        out.rejection = Rejected("no_content", "response body without choices[0].message.content text")
        return out
    out.content = content
    return out


def find_json_object(text: str) -> dict | None:
    """The answer's JSON object: the whole text, a fenced block, or the first object
    found inside prose (preferring one with an "Answer" key). None if there is none."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for c in candidates:
        try:
            obj = _loads(c)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    decoder = json.JSONDecoder(parse_constant=_no_constants)
    first = None
    pos = text.find("{")
    for _ in range(MAX_OBJECT_STARTS):
        if pos < 0:
            break
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict):
            if "Answer" in obj:
                return obj
            first = first or obj
        pos = text.find("{", end)
    return first


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip().casefold() not in _NULL_WORDS:
        return value.strip()
    return None


def parse_answer(content: str, label: int) -> Answer:
    """Check one answer against its image's label; raises Rejected (see REASONS)."""
    obj = find_json_object(content)
    if obj is None:
        raise Rejected("not_json", f"no JSON object in {content[:120]!r}")
    verdict = next((v for k, v in obj.items() if isinstance(k, str) and k.casefold() == "answer"), None)
    if not isinstance(verdict, str):
        raise Rejected("no_verdict", f"keys {sorted(obj)[:8]}")
    if _CANNOT.search(verdict):
        raise Rejected("cannot_determine", verdict[:120])
    said = schema.conclusion_text_label(verdict)
    if said is None:
        raise Rejected("no_verdict", verdict[:120])
    if said != label:
        raise Rejected("label_contradiction", f"answer {verdict[:80]!r}, folder label "
                                              f"{'fake' if label else 'real'}")
    container = obj.get(ATTRIBUTE_KEYS[label])
    if not isinstance(container, dict):
        other = obj.get(ATTRIBUTE_KEYS[1 - label])
        container = other if isinstance(other, dict) else obj
    known = {_norm(n): n for n in LABEL_ATTRIBUTES[label]}
    attributes: dict[str, str | None] = {n: None for n in LABEL_ATTRIBUTES[label]}
    unknown = []
    for key, value in container.items():
        name = known.get(_norm(key)) if isinstance(key, str) else None
        if name is None:
            if container is not obj:
                unknown.append(str(key))
            continue
        attributes[name] = _text(value)
    if not any(attributes.values()):
        raise Rejected("no_attribute", f"none of the label's five attribute names has a text "
                                       f"(other names dropped: {sorted(unknown)})")
    caption = next((_text(v) for k, v in obj.items() if isinstance(k, str) and k.casefold() == "caption"), None)
    return Answer(attributes, caption, sorted(unknown))
