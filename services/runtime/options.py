"""A declared request option (name, type, default, bounds, help): the one place a knob is written, from which a
service derives its defaults and checks and persona-cli its flags (client/declared_options.py). Each service keeps
its table: train/options.py, generate/options.py."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument


@dataclass(frozen=True)
class Option:
    """One knob of a request: what a service checks and fills in, and what the CLI offers as an option."""

    # The TrainingOptions field, the key in a concept's stored options and (where `loop`) the TrainConfig field.
    name: str
    # int, float, bool, str, or list (a list of strings; a repeated proto field, a repeatable CLI flag).
    type: type
    # The value when the request leaves it unset. None: decided per request (`default_text` says how).
    default: Any
    # What it does, for `persona-cli train --help`.
    help: str
    # Bounds, inclusive unless `low_open` (then low itself is refused: "a positive number"); for a str, `high` is
    # its most characters.
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    # Allowed values of a str option.
    choices: tuple[str, ...] = ()
    # How --help shows the default when it is not just `default` (e.g. per method).
    default_text: str = ""
    # A typical value, ending the error message: "e.g. 1e-4".
    example: str = ""
    # The CLI flag when not --name-with-dashes (--lr for learning_rate).
    flag: str = ""
    # A short CLI flag besides the long one ("-n").
    short: str = ""
    # train: a TrainConfig field; False for options that shape the data (class images, epochs), not the loop.
    loop: bool = True

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def shown_default(self) -> str:
        if self.default_text:
            return self.default_text
        if isinstance(self.default, (list, tuple)):
            return " ".join(self.default)
        return "" if self.default is None else str(self.default).lower() if self.type is bool else str(self.default)

    def check(self, value: Any) -> None:
        """Raises InvalidArgument naming the option and what to pass, when `value` is out of bounds or not a choice.
        None and "" (unset) pass."""
        if value is None or value == "":
            return
        if self.choices and value not in self.choices:
            raise InvalidArgument(f"`{self.name}` is {value!r}: use one of {', '.join(self.choices)}")
        if self.type is str and self.high is not None and len(value) > self.high:
            raise InvalidArgument(f"`{self.name}` is {len(value)} characters; at most {self.high:g}")
        if self.type not in (int, float):
            return
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and value > self.high
        if (self.type is float and not math.isfinite(value)) or below or above:
            example = f", e.g. {self.example}" if self.example else ""
            raise InvalidArgument(f"`{self.name}` is {value}: use {self.bounds_text()}{example}")

    def bounds_text(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if low and high and not self.low_open:
            return f"{low}–{high}"
        if low == "0" and self.low_open:
            text = "a positive number"
        elif low:
            text = f"a number > {low}" if self.low_open else f"{low} or more"
        else:
            text = "a number"
        return text + (f" up to {high}" if high else "")


def _number(value: float | int | None) -> str:
    """1000 for 1000 and 1e3, 0.05 for 0.05; "" for None."""
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:g}"
