"""Checks every request shares: each float finite; messages name the field and how to fix it. (A declared option's
own bounds are checked by its declaration: options.py.)"""
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
