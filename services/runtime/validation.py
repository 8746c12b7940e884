"""Checks every request shares: each float finite, numbers in range; messages name the field and how to fix it."""
from __future__ import annotations

import math

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .errors import InvalidArgument

_FLOATS = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)


def non_finite_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first NaN or ±inf float in `message` (nested messages and lists included), else None."""
    for field, value in message.ListFields():
        name = f"{prefix}{field.name}"
        repeated = field.is_repeated
        if field.cpp_type in _FLOATS:
            values = value if repeated else (value,)
            for index, number in enumerate(values):
                if not math.isfinite(number):
                    return f"{name}[{index}]" if repeated else name
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                items = value.items()
                if field.message_type.fields_by_name["value"].cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                    found = next((p for k, v in items if (p := non_finite_field(v, f"{name}[{k!r}]."))), None)
                else:
                    found = next((f"{name}[{k!r}]" for k, v in items
                                  if isinstance(v, float) and not math.isfinite(v)), None)
            elif repeated:
                found = next((p for i, v in enumerate(value) if (p := non_finite_field(v, f"{name}[{i}]."))), None)
            else:
                found = non_finite_field(value, f"{name}.")
            if found:
                return found
    return None


def check_finite(message: Message) -> None:
    """Raises InvalidArgument naming the first float of `message` that is NaN or infinite."""
    path = non_finite_field(message)
    if path is not None:
        raise InvalidArgument(f"`{path}` is not a finite number (NaN or infinity): pass a real number")


def check_range(field: str, value: float | int | None, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, hint: str = "") -> None:
    """Raises InvalidArgument unless `value` is finite and within [low, high] ((low, high] with `low_open`).

    None (an unset optional) passes. `hint` ends the message, e.g. "e.g. 1e-4".
    """
    if value is None:
        return
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        lower = "" if low is None else (f"> {low:g}" if low_open else f"≥ {low:g}")
        upper = "" if high is None else f"≤ {high:g}"
        bounds = " and ".join(b for b in (lower, upper) if b)
        raise InvalidArgument(f"`{field}` is {value}: use a number {bounds}" + (f", {hint}" if hint else ""))
