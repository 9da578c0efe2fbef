"""Validation of LLaVA-format records.

A record is ``{"id": str, "image": "relative/path.jpg" (optional), "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}``. Turns alternate human/gpt, start with a human turn
and end with a gpt turn. An image record carries exactly one ``<image>`` placeholder, in a human
turn; a text-only record has none. Anything else is rejected with one of the ``REASONS`` below
(the text check here; the image checks happen where the bytes are read).
"""

from __future__ import annotations

import os
from typing import Any

from .jsonstream import BadLine

IMAGE_PLACEHOLDER = "<image>"

# Reject reasons, with a one-line explanation (printed in the summary legend).
REASONS = {
    "malformed_json": "a JSON Lines line is not valid JSON (the detail names the line)",
    "not_an_object": "the array element is not a JSON object",
    "invalid_unicode": "a string holds a lone UTF-16 surrogate (e.g. \\ud800): not valid Unicode text",
    "malformed_conversation": "conversations missing, not a list, bad turn, or not human/gpt alternating",
    "empty_text": "a turn has an empty value",
    "image_token_mismatch": "image records need exactly one <image> in a human turn; text-only records none",
    "bad_image_field": "image is not a relative path string (lists / absolute / '..' / NUL paths are rejected)",
    "missing_image": "the image file does not exist under --images",
    "unreadable_image": "the image path exists but cannot be read (permission, symlink loop, not a regular file, I/O error)",
    "undecodable_image": "the image file could not be decoded by PIL",
}

ROLES = ("human", "gpt")


def record_id(rec: Any, index: int) -> str:
    """The record's ``id`` as a string, or ``#<index>`` when it has none."""
    if isinstance(rec, dict) and rec.get("id") not in (None, ""):
        rid = str(rec["id"])
        try:
            rid.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: keep it printable and JSON-safe
            rid = rid.encode("utf-8", "backslashreplace").decode("utf-8")
        return rid
    return f"#{index}"


def _lone_surrogate(obj: Any) -> str | None:
    """A short description of where ``obj`` holds a string that is not valid Unicode, else None."""
    stack = [(obj, "record")]
    while stack:
        o, where = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{where} has {o[e.start:e.end]!r} at character {e.start}"
        elif isinstance(o, dict):
            for k, v in o.items():
                stack.append((k, f"a key in {where}"))
                stack.append((v, f"{where}[{k!r}]" if len(where) < 80 else where))
        elif isinstance(o, list):
            stack.extend((v, f"{where}[{i}]" if len(where) < 80 else where) for i, v in enumerate(o))
    return None


def check_record(rec: Any) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` when the record's JSON is unusable, else ``None``.

    Image existence/decodability are not checked here (see ``shards.load_image``).
    """
    if isinstance(rec, BadLine):
        return "malformed_json", rec.error
    if not isinstance(rec, dict):
        return "not_an_object", f"got {type(rec).__name__}"
    bad_text = _lone_surrogate(rec)
    if bad_text is not None:
        return "invalid_unicode", bad_text
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "malformed_conversation", "'conversations' must be a non-empty list"
    n_placeholder_human = 0
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return "malformed_conversation", f"turn {i} is not an object"
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            return "malformed_conversation", f"turn {i} has from={role!r} (expected 'human' or 'gpt')"
        if role != ROLES[i % 2]:
            return "malformed_conversation", f"turn {i} is {role!r}; turns must alternate human/gpt starting with human"
        if not isinstance(value, str):
            return "malformed_conversation", f"turn {i} value is {type(value).__name__}, not a string"
        if not value.replace(IMAGE_PLACEHOLDER, "").strip():
            return "empty_text", f"turn {i} ({role}) has no text"
        count = value.count(IMAGE_PLACEHOLDER)
        if role == "gpt" and count:
            return "image_token_mismatch", f"turn {i} (gpt) contains {IMAGE_PLACEHOLDER}"
        n_placeholder_human += count
    if len(conv) % 2:
        return "malformed_conversation", "the last turn is a human turn with no gpt answer"
    image = rec.get("image")
    if image is None:
        if n_placeholder_human:
            return "image_token_mismatch", f"no image but {n_placeholder_human} {IMAGE_PLACEHOLDER} placeholder(s)"
        return None
    if not isinstance(image, str) or not image.strip():
        return "bad_image_field", f"image={image!r}"
    if "\x00" in image:
        return "bad_image_field", f"image path {image!r} contains a NUL character"
    norm = os.path.normpath(image)
    if os.path.isabs(image) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return "bad_image_field", f"image path {image!r} escapes --images"
    if n_placeholder_human != 1:
        return "image_token_mismatch", f"image record has {n_placeholder_human} {IMAGE_PLACEHOLDER} placeholders (need 1)"
    return None
