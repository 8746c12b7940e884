"""Typer options made from a service's option declarations (persona.services.runtime.options.Option: the tables in
train/options.py and generate/options.py), so a knob is declared once: its flags, help, shown default and choices
all come from the declaration."""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any, Callable, Optional

import typer

from .output import fail


def typer_option(option) -> tuple[Any, Any]:
    """(annotation, default) of the Typer parameter for one declared option. Unset stays None (False for a flag),
    so the server's default applies and the request carries only what the user gave."""
    shown = option.shown_default or False
    flags = (option.short, option.cli_flag) if option.short else (option.cli_flag,)
    if option.type is bool:  # a flag: --train-text-encoder turns it on; off is the default
        return Annotated[bool, typer.Option(*flags, help=option.help)], False
    kind = list[str] if option.type is list else option.type
    return Annotated[Optional[kind], typer.Option(*flags, help=option.help, show_default=shown)], None


def with_declared_options(declarations, before: str) -> Callable:
    """Adds one Typer option per declaration to the decorated command, in front of its parameter `before`, and
    hands their values to it as one dict, `options` (name → value; None or False when not given). A value that
    is not one of a declaration's `choices` fails here, before anything is uploaded; the server checks the rest."""
    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        original = inspect.signature(command)
        added = []
        for option in declarations:
            annotation, default = typer_option(option)
            added.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                           annotation=annotation))
        parameters = []
        for parameter in original.parameters.values():
            if parameter.name == "options":
                continue
            if parameter.name == before:
                parameters += added
            # Typer passes every parameter by name; keyword-only lets the added ones sit among the others.
            kind = parameter.kind if parameter.name == "ctx" else inspect.Parameter.KEYWORD_ONLY
            parameters.append(parameter.replace(annotation=hints.get(parameter.name, parameter.annotation),
                                                kind=kind))

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            options = {option.name: kwargs.pop(option.name, None) for option in declarations}
            for option in declarations:
                value = options[option.name]
                if option.choices and value is not None:
                    value = options[option.name] = value.lower()
                if option.choices and value is not None and value not in option.choices:
                    fail("INVALID_ARGUMENT", f"`{option.name}` must be one of {', '.join(option.choices)}, "
                                             f"not {value!r}")
            return command(*args, options=options, **kwargs)

        wrapper.__signature__ = original.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper
    return decorate
