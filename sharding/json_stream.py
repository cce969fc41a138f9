"""The elements of a JSON array file, one at a time, with a bound on each element.

`forgery_reasoning_cot.json` is a single JSON list (about 400 MB released);
`json.loads(fh.read())` holds the bytes, the decoded text and every parsed
record at once (a 2 GB file peaks near 20 GB). `iter_json_array` reads the file
in blocks, decodes UTF-8 incrementally and parses one element at a time with
the standard library's decoder (`JSONDecoder.raw_decode`), so memory is one
block plus one element, and an element longer than `max_element_chars` is an
error naming its position instead of an unbounded buffer.
"""
from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

MAX_ELEMENT_CHARS = 64 << 20
"""Longest array element accepted, in characters (an MMFR record is a few KB)."""

_WHITESPACE = " \t\r\n"
_AFTER_ELEMENT = ",]" + _WHITESPACE  # what may follow an element of the array


class JSONStreamError(ValueError):
    """The file is not a JSON array, is malformed, or has an element over the bound."""


class _Buffer:
    """Decoded text of a file, read on demand; `pos` indexes `text`, `offset` is the
    number of characters already dropped before it (for messages)."""

    def __init__(self, fh, block_bytes: int):
        self._fh, self._block = fh, block_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos, self.offset, self.eof = "", 0, 0, False

    def fill(self) -> None:
        data = self._fh.read(self._block)
        self.eof = not data
        more = self._utf8.decode(data, final=self.eof)  # UnicodeDecodeError on invalid bytes
        self.offset += self.pos
        self.text, self.pos = self.text[self.pos:] + more, 0

    def next_char(self) -> str:
        """The next non-whitespace character (not consumed), "" at the end of the file."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if self.eof:
                return ""
            self.fill()


def iter_json_array(path: str, max_element_chars: int = MAX_ELEMENT_CHARS,
                    block_bytes: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of the JSON array in `path`, in order.

    Raises JSONStreamError (top level not a list, malformed JSON, an element over
    `max_element_chars`, data after the list) or UnicodeDecodeError; elements
    before the problem have been yielded already."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as fh:
        buf = _Buffer(fh, block_bytes)
        if buf.next_char() != "[":
            raise JSONStreamError("top level is not a list")
        buf.pos += 1
        index = 0
        if buf.next_char() == "]":
            buf.pos += 1
        else:
            while True:
                yield _element(buf, decoder, index, max_element_chars)
                index += 1
                c = buf.next_char()
                buf.pos += 1
                if c == "]":
                    break
                if c != ",":
                    raise JSONStreamError(f"expected ',' or ']' after element {index - 1} at character "
                                          f"{buf.offset + buf.pos - 1}, found {c or 'the end of the file'!r}")
                buf.next_char()
        if buf.next_char() != "":
            raise JSONStreamError(f"extra data after the list at character {buf.offset + buf.pos}")


def _element(buf: _Buffer, decoder: json.JSONDecoder, index: int, max_chars: int) -> Any:
    """Decode the element starting at buf.pos, reading more until it is complete.
    A value is taken only when a separator follows it (or the file ends): a number
    cut by a block boundary ("15" of "15.5e3") decodes too, so it is decoded
    again after more is read."""
    while True:
        try:
            value, end = decoder.raw_decode(buf.text, buf.pos)
            if (end < len(buf.text) and buf.text[end] in _AFTER_ELEMENT) or buf.eof:
                buf.pos = end
                return value
        except json.JSONDecodeError as exc:
            if buf.eof:
                raise JSONStreamError(f"element {index} at character {buf.offset + buf.pos}: {exc.msg} "
                                      f"(character {buf.offset + exc.pos})") from None
        if len(buf.text) - buf.pos > max_chars:
            raise JSONStreamError(f"element {index} at character {buf.offset + buf.pos} is longer than "
                                  f"{max_chars} characters")
        buf.fill()
