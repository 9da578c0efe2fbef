"""Streaming readers for LLaVA-format annotation files.

LLaVA instruction files are one JSON array of ~665k records (about 1 GB). ``iter_records`` walks such
an array element by element with the standard library's ``json.JSONDecoder.raw_decode`` over a
sliding text buffer, so memory stays bounded by the largest single record, not by the file.
JSON Lines files (one object per line) are accepted too; the format is detected from the first
non-blank character (``[`` array, ``{`` JSON Lines).

Encodings: UTF-8 (with or without a byte-order mark), and UTF-16 / UTF-32 (recognised by their BOM
or, without one, by the zero bytes around the first ASCII character). Compressed files (gzip,
bzip2, xz) are decompressed on the fly, recognised by their magic bytes, whatever the file name.
Bytes that are not valid in the detected encoding (a Latin-1 file read as UTF-8, say) are a
whole-file error naming the byte offset and line.

Whole-file problems raise ``JSONStreamError`` (naming the file, line and column): after a bad spot in
a JSON array nothing can be trusted. A JSON Lines line that does not parse is different: the next
line is still good, so it is yielded as a ``BadLine`` (rejected downstream with its line number)
and reading goes on.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

_CHUNK = 1 << 20  # bytes read per refill
_WS = " \t\r\n"

# (magic bytes, name, opener or None when unsupported)
_COMPRESSED = (
    (b"\x1f\x8b", "gzip", gzip.open),
    (b"BZh", "bzip2", bz2.open),
    (b"\xfd7zXZ\x00", "xz", lzma.open),
    (b"\x28\xb5\x2f\xfd", "zstd", None),
    (b"PK\x03\x04", "zip", None),
)
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


class JSONStreamError(ValueError):
    """The annotation file is not a JSON array / JSON Lines file (message names file and line)."""


@dataclass(frozen=True)
class BadLine:
    """A JSON Lines line that is not valid JSON (yielded in place of the record)."""

    line: int
    error: str


def _sniff_encoding(head: bytes) -> tuple[str, int]:
    """``(codec, BOM length)`` from the first bytes of the (decompressed) file."""
    for bom, enc in _BOMS:
        if head.startswith(bom):
            return enc, len(bom)
    # No BOM: JSON text starts with an ASCII character, so zero bytes around it give UTF-16/32 away.
    if len(head) >= 4 and head[:3] == b"\x00\x00\x00":
        return "utf-32-be", 0
    if len(head) >= 4 and head[1:4] == b"\x00\x00\x00":
        return "utf-32-le", 0
    if len(head) >= 2 and head[0] == 0:
        return "utf-16-be", 0
    if len(head) >= 2 and head[1] == 0:
        return "utf-16-le", 0
    return "utf-8", 0


class _TextSource:
    """Decoded text of a (possibly compressed, possibly non-UTF-8) file, read in chunks."""

    def __init__(self, path: str, chunk_size: int) -> None:
        self.path, self.chunk_size = path, chunk_size
        self.compression = None
        raw: BinaryIO = open(path, "rb")
        head = raw.read(8)
        raw.seek(0)
        for magic, name, opener in _COMPRESSED:
            if head.startswith(magic):
                if opener is None:
                    raw.close()
                    raise JSONStreamError(f"{path}: the file is {name}-compressed; decompress it first "
                                          "(gzip, bzip2 and xz are read directly)")
                raw.close()
                raw = opener(path, "rb")
                self.compression = name
                break
        self.raw = raw
        head = self._read_raw(4)
        self.encoding, bom = _sniff_encoding(head)
        self.decoder = codecs.getincrementaldecoder(self.encoding)("strict")
        self.bytes_fed = bom  # decompressed bytes handed to the decoder (or skipped as BOM)
        self.newlines = 0  # newlines in all text decoded so far
        self._pending = head[bom:]
        self.eof = False

    def _read_raw(self, n: int) -> bytes:
        try:
            return self.raw.read(n)
        except _READ_ERRORS as e:
            what = f"{self.compression} data" if self.compression else "file"
            raise JSONStreamError(f"{self.path}: corrupt or truncated {what} ({type(e).__name__}: {e})") from None

    def read(self) -> str:
        """The next chunk of text ('' at the end)."""
        while not self.eof:
            data = self._pending + self._read_raw(self.chunk_size)
            self._pending = b""
            final = not data
            try:
                text = self.decoder.decode(data, final)
            except UnicodeDecodeError as e:
                raise self._decode_error(e, data) from None
            self.bytes_fed += len(data)
            self.eof = final
            if text:
                self.newlines += text.count("\n")
                return text
        return ""

    def _decode_error(self, e: UnicodeDecodeError, data: bytes) -> JSONStreamError:
        # e.object is the decoder's buffered bytes + data; e.start indexes into it.
        buffered = len(e.object) - len(data)
        offset = self.bytes_fed - buffered + e.start
        bad = e.object[e.start:e.end][:4]
        line = ""
        if self.encoding == "utf-8":
            nls = e.object[:e.start].count(b"\n")
            line = f", line {self.newlines + nls + 1}"
        hint = ("; the file must be UTF-8 (or UTF-16/32 with a byte-order mark): convert it, e.g. "
                "`iconv -f latin1 -t utf-8 in.json > out.json`")
        return JSONStreamError(f"{self.path}: not valid {self.encoding.upper()} text: byte(s) {bad.hex(' ')} at byte "
                               f"offset {offset}{line} ({e.reason}){hint}")

    def close(self) -> None:
        self.raw.close()


def iter_records(path: str, chunk_size: int = _CHUNK) -> Iterator[Any]:
    """Yield the top-level elements of a JSON array file (or the objects of a JSON Lines file).

    Elements are yielded as decoded Python objects in file order; they are not validated here
    (a non-dict element is yielded as is and rejected downstream; a JSON Lines line that does not
    parse is yielded as a ``BadLine``). Raises ``JSONStreamError`` naming the file, line and column
    when the file itself is unusable (then nothing after the bad spot can be trusted, so this is
    fatal, unlike a bad record).
    """
    src = _TextSource(path, chunk_size)
    try:
        yield from _iter_stream(src, path)
    finally:
        src.close()


def _looks_like_wrapper(value: Any) -> str | None:
    """The key holding the records if ``value`` is a whole-file object wrapping them, else None."""
    if not isinstance(value, dict) or "conversations" in value:
        return None
    for k, v in value.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return k
    return None


def _wrapper_error(path: str, value: dict, key: str | None) -> JSONStreamError:
    keys = ", ".join(repr(k) for k in list(value)[:8])
    where = f" (the records seem to be under {key!r}: extract them, e.g. `jq '.{key}' in.json > out.json`)" if key else ""
    return JSONStreamError(
        f"{path}: the file is one JSON object with keys {keys}, not a LLaVA record list; expected a JSON array "
        f"of records ([{{\"id\", \"image\", \"conversations\"}}, ...]) or JSON Lines (one record object per line){where}"
    )


class _Stream:
    """A sliding text buffer over a ``_TextSource`` with position bookkeeping for error messages."""

    def __init__(self, src: _TextSource, path: str) -> None:
        self.src, self.path = src, path
        self.decoder = json.JSONDecoder()
        self.buf = ""
        self.pos = 0  # index into buf
        self.consumed = 0  # characters dropped from the front of buf
        self.lines_dropped = 0  # newlines among them
        self.col_base = 0  # characters of the current line dropped with the front of buf
        self.eof = False

    def refill(self) -> bool:
        if self.eof:
            return False
        chunk = self.src.read()
        if not chunk:
            self.eof = True
            return False
        dropped = self.buf[:self.pos]
        nl = dropped.rfind("\n")
        self.lines_dropped += dropped.count("\n")
        self.col_base = len(dropped) - nl - 1 if nl >= 0 else self.col_base + len(dropped)
        self.buf = self.buf[self.pos:] + chunk
        self.consumed += self.pos
        self.pos = 0
        return True

    def skip_ws(self) -> bool:
        """Advance past whitespace; False at end of input."""
        while True:
            buf = self.buf
            while self.pos < len(buf) and buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(buf):
                return True
            if not self.refill():
                return False

    def line_of(self, at: int) -> int:
        return self.lines_dropped + self.buf.count("\n", 0, at) + 1

    def where(self, at: int) -> str:
        nl = self.buf.rfind("\n", 0, at)
        col = at - nl if nl >= 0 else self.col_base + at + 1
        return f"line {self.line_of(at)} column {col} (character {self.consumed + at})"

    def fail(self, msg: str, at: int | None = None) -> JSONStreamError:
        return JSONStreamError(f"{self.path}: {msg} at {self.where(self.pos if at is None else at)}")

    def decode_value(self) -> Any:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.refill():  # the value may straddle the buffer end
                    continue
                raise self.fail(f"malformed JSON ({e.msg})", e.pos) from None
            except (RecursionError, ValueError) as e:  # nested too deeply / integer with too many digits
                raise self.fail(f"unreadable JSON value ({type(e).__name__}: {e})") from None
            # A value that ends exactly at the buffer end may be a truncated number/literal.
            if end >= len(self.buf) and self.refill():
                continue
            self.pos = end
            return value

    def next_line(self) -> str | None:
        """The next line (without its newline) from ``pos``; None at the end of input."""
        search = self.pos
        while True:
            nl = self.buf.find("\n", search)
            if nl >= 0:
                line = self.buf[self.pos:nl]
                self.pos = nl + 1
                return line
            search = len(self.buf) - self.pos  # the same spot after the refill drops buf[:pos]
            if not self.refill():
                if self.pos < len(self.buf):
                    line = self.buf[self.pos:]
                    self.pos = len(self.buf)
                    return line
                return None


def _iter_stream(src: _TextSource, path: str) -> Iterator[Any]:
    s = _Stream(src, path)
    if not s.skip_ws():
        return  # empty file: no records (the caller reports it)
    first = s.buf[s.pos]
    if first == "{":
        yield from _json_lines(s)
        return
    if first != "[":
        kind = {'"': "a JSON string", "<": "markup (HTML/XML?)"}.get(
            first, "a JSON number or literal" if first in "-0123456789tfn" else f"the character {first!r}")
        raise s.fail(f"expected a JSON array '[' of records or JSON Lines objects '{{', but the file starts with {kind}")
    s.pos += 1
    if not s.skip_ws():
        raise s.fail("unterminated JSON array")
    if s.buf[s.pos] == "]":
        s.pos += 1
    else:
        while True:
            yield s.decode_value()
            if not s.skip_ws():
                raise s.fail("unterminated JSON array")
            c = s.buf[s.pos]
            s.pos += 1
            if c == "]":
                break
            if c != ",":
                raise s.fail(f"expected ',' or ']' but found {c!r}", s.pos - 1)
            if not s.skip_ws():
                raise s.fail("unterminated JSON array")
    if s.skip_ws():
        raise s.fail("trailing data after the JSON array")


def _loads_line(line: str, line_no: int) -> Any:
    """``json.loads`` of one JSON Lines line; a value Python cannot hold becomes a ``BadLine``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError) as e:  # nested too deeply / integer with too many digits
        return BadLine(line_no, f"line {line_no} holds an unreadable JSON value ({type(e).__name__}: {e})")


def _json_lines(s: _Stream) -> Iterator[Any]:
    """JSON Lines: one value per line; a line that does not parse becomes a ``BadLine``.

    When the first record line ends inside an unfinished value, the file is not JSON Lines: it is
    read as whitespace-separated JSON values (pretty-printed objects), where a malformed value is
    fatal. A file that is a single object wrapping the records (``{"data": [...]}``) is refused
    either way."""
    start = s.consumed + s.pos  # absolute: refills move the buffer's front
    first_line_no = s.line_of(s.pos)
    line = s.next_line()
    pending: list = []  # one record of look-ahead: a lone wrapper object is a whole-file error
    try:
        pending.append(_loads_line(line, first_line_no))
    except json.JSONDecodeError as e:
        if e.pos < len(line.rstrip()):  # broken inside the line: a bad JSON Lines line
            yield BadLine(first_line_no, f"line {first_line_no} is not valid JSON ({e.msg} at column {e.colno})")
        else:  # the value goes on past the line: not JSON Lines but multi-line values
            s.pos = start - s.consumed  # still in the buffer: refills keep everything from pos on
            first = s.decode_value()
            more = s.skip_ws()
            if not more and _looks_like_wrapper(first) is not None:
                raise _wrapper_error(s.path, first, _looks_like_wrapper(first)) from None
            yield first
            while more:
                yield s.decode_value()
                more = s.skip_ws()
            return
    line_no = first_line_no
    while True:
        line = s.next_line()
        if line is None:
            break
        line_no += 1
        if not line.strip():
            continue
        try:
            value: Any = _loads_line(line, line_no)
        except json.JSONDecodeError as e:
            value = BadLine(line_no, f"line {line_no} is not valid JSON ({e.msg} at column {e.colno})")
        if pending:
            yield pending.pop()
        yield value
    if pending:
        key = _looks_like_wrapper(pending[0])
        if key is not None:
            raise _wrapper_error(s.path, pending[0], key)
        yield pending.pop()
