"""Streaming readers for LLaVA-format annotation files.

LLaVA instruction files are one JSON array of ~665k records (about 1 GB). ``iter_records`` walks such
an array element by element with the standard library's ``json.JSONDecoder.raw_decode`` over a
sliding text buffer, so memory stays bounded by the largest single record, not by the file.
JSON Lines files (one object per line) are accepted too; the format is detected from the first
non-blank character (``[`` array, ``{`` JSON Lines).
"""

from __future__ import annotations

import json
from typing import Any, Iterator, TextIO

_CHUNK = 1 << 20  # characters read per refill
_WS = " \t\r\n"


class JSONStreamError(ValueError):
    """The annotation file is not a JSON array / JSON Lines file (message names file and offset)."""


def iter_records(path: str, chunk_size: int = _CHUNK) -> Iterator[Any]:
    """Yield the top-level elements of a JSON array file (or the objects of a JSON Lines file).

    Elements are yielded as decoded Python objects in file order; they are not validated here
    (a non-dict element is yielded as is and rejected downstream). Raises ``JSONStreamError``
    naming the file and character offset when the file itself is malformed (then nothing after
    the bad spot can be trusted, so this is fatal, unlike a bad record).
    """
    with open(path, "r", encoding="utf-8") as f:
        yield from _iter_stream(f, path, chunk_size)


def _iter_stream(f: TextIO, path: str, chunk_size: int) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0  # index into buf
    consumed = 0  # characters dropped from the front of buf (for error offsets)
    eof = False

    def refill() -> bool:
        nonlocal buf, pos, consumed, eof
        if eof:
            return False
        chunk = f.read(chunk_size)
        if not chunk:
            eof = True
            return False
        buf = buf[pos:] + chunk
        consumed += pos
        pos = 0
        return True

    def skip_ws() -> bool:
        """Advance past whitespace; False at end of input."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            if pos < len(buf):
                return True
            if not refill():
                return False

    def fail(msg: str) -> JSONStreamError:
        return JSONStreamError(f"{path}: {msg} at character {consumed + pos}")

    def decode_value() -> Any:
        nonlocal pos
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if refill():  # the value may straddle the buffer end
                    continue
                raise fail(f"malformed JSON ({e.msg})") from None
            # A value that ends exactly at the buffer end may be a truncated number/literal.
            if end >= len(buf) and refill():
                continue
            pos = end
            return value

    if not skip_ws():
        return  # empty file: no records
    if buf[pos] == "{":  # JSON Lines
        while skip_ws():
            yield decode_value()
        return
    if buf[pos] != "[":
        raise fail("expected a JSON array '[' or JSON Lines objects")
    pos += 1
    if not skip_ws():
        raise fail("unterminated JSON array")
    if buf[pos] == "]":
        pos += 1
    else:
        while True:
            yield decode_value()
            if not skip_ws():
                raise fail("unterminated JSON array")
            c = buf[pos]
            pos += 1
            if c == "]":
                break
            if c != ",":
                raise fail(f"expected ',' or ']' but found {c!r}")
            if not skip_ws():
                raise fail("unterminated JSON array")
    if skip_ws():
        raise fail("trailing data after the JSON array")
