"""Bounds on the ids a request carries, and the short quote of a caller's value inside an error message.

A message that echoes an unbounded value can outgrow gRPC's trailer limit, and the client then sees
RESOURCE_EXHAUSTED instead of the error: every id is bounded on input (one check of every request, in the
interceptors) and every quoted value is cut to a short prefix.
"""
from __future__ import annotations

from typing import Any

from .errors import InvalidArgument

# Longest id a request may carry (persona's own ids are under 40 characters).
MAX_ID_CHARS = 128
# Characters of a caller's value a message quotes; longer ones are cut with their length said.
QUOTE_CHARS = 64
# Longest error message sent to a client: a last guard, far below gRPC's 8 KiB trailer limit.
MAX_MESSAGE_CHARS = 2000


def quoted(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`value` quoted for a message: repr of at most `limit` characters, then its length when cut."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def bounded_message(message: str) -> str:
    """`message` cut to MAX_MESSAGE_CHARS."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "…"


def check_ids(message: Any, prefix: str = "") -> None:
    """Refuses a request (a protobuf message) with a string field named `*_id`, or a repeated `*_ids`, longer than
    MAX_ID_CHARS, naming the field; nested messages are checked too."""
    for descriptor, value in message.ListFields():
        name = prefix + descriptor.name
        if descriptor.message_type is not None:
            if descriptor.message_type.GetOptions().map_entry:
                continue
            for item in (value if _repeated(descriptor) else [value]):
                check_ids(item, name + ".")
        elif descriptor.name.endswith(("_id", "_ids")) and descriptor.type == descriptor.TYPE_STRING:
            for item in (value if _repeated(descriptor) else [value]):
                if len(item) > MAX_ID_CHARS:
                    raise InvalidArgument(f"`{name}` {quoted(item)} is longer than an id can be ({MAX_ID_CHARS} "
                                          "characters): pass an id as persona returned it")


def _repeated(descriptor) -> bool:
    # protobuf ≥ 5 spells it `is_repeated`; older ones only have `label`.
    repeated = getattr(descriptor, "is_repeated", None)
    return repeated if repeated is not None else descriptor.label == descriptor.LABEL_REPEATED
