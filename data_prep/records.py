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

IMAGE_PLACEHOLDER = "<image>"

# Reject reasons, with a one-line explanation (printed in the summary legend).
REASONS = {
    "not_an_object": "the array element is not a JSON object",
    "malformed_conversation": "conversations missing, not a list, bad turn, or not human/gpt alternating",
    "empty_text": "a turn has an empty value",
    "image_token_mismatch": "image records need exactly one <image> in a human turn; text-only records none",
    "bad_image_field": "image is not a relative path string (lists / absolute / '..' paths are rejected)",
    "missing_image": "the image file does not exist under --images",
    "undecodable_image": "the image file could not be decoded by PIL",
}

ROLES = ("human", "gpt")


def record_id(rec: Any, index: int) -> str:
    """The record's ``id`` as a string, or ``#<index>`` when it has none."""
    if isinstance(rec, dict) and rec.get("id") not in (None, ""):
        return str(rec["id"])
    return f"#{index}"


def check_record(rec: Any) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` when the record's JSON is unusable, else ``None``.

    Image existence/decodability are not checked here (see ``shards.load_image``).
    """
    if not isinstance(rec, dict):
        return "not_an_object", f"got {type(rec).__name__}"
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
    norm = os.path.normpath(image)
    if os.path.isabs(image) or norm.startswith(".."):
        return "bad_image_field", f"image path {image!r} escapes --images"
    if n_placeholder_human != 1:
        return "image_token_mismatch", f"image record has {n_placeholder_human} {IMAGE_PLACEHOLDER} placeholders (need 1)"
    return None
