"""What persona-cli prints: data to stdout (tables, or JSON with --json), diagnostics to stderr, and
every failure as one `CODE: message` line with exit status 1 — never a traceback."""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
from typing import Any, Callable, Iterator, NoReturn, Sequence

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console

from persona.services.runtime.errors import PersonaError

from .sdk import PersonaClientError

# Exit status of a command that failed for a reason it names (usage errors exit 2, as Typer does).
EXIT_FAILED = 1
# Exit status after Ctrl-C, as shells report SIGINT.
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure found on the client side (a bad path, an index out of range), in the server's vocabulary."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def fail(code: str, message: str) -> NoReturn:
    raise CliError(code, message)


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A diagnostic line for people (progress, hints): stderr, so stdout stays data."""
    sys.stderr.write(message + "\n")


def message_dict(message: Message) -> dict:
    """A proto message as JSON-ready data: proto field names, enum names, fields at their defaults included."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class Output:
    """Prints one command's data either as JSON (`--json`) or as text for people."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def emit(self, data: Any, render: Callable[[], str]) -> None:
        """Prints `data` as JSON, or the text `render` returns."""
        if self.as_json:
            print_json(data)
        else:
            sys.stdout.write(render().rstrip("\n") + "\n")


def plain(value: Any) -> Any:
    """Struct numbers are doubles: shows 5.0 as 5, in nested lists and dicts too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _cell(value: Any) -> str:
    return " ".join(("" if value is None else str(value)).split())  # one line per row, whatever the text holds


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, a header line first; nothing wraps, so piped output greps well."""
    cells = [list(columns)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """`name  value` lines describing one object."""
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {_cell(value)}".rstrip() for name, value in pairs)


@contextlib.contextmanager
def error_boundary() -> Iterator[None]:
    """Turns every expected failure into one `CODE: message` line on stderr and exit status 1.

    Typer's own exits (typer.Exit, usage errors) pass through untouched.
    """
    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write("CANCELLED: interrupted\n")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader of stdout went away (`persona-cli subjects list | head`): stop quietly, and keep
        # Python from failing again when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_FAILED) from None
    except (CliError, PersonaClientError, PersonaError) as e:
        _exit_with(e.code, e.message)
    except grpc.RpcError as e:
        error = PersonaClientError.from_rpc_error(e)
        _exit_with(error.code, error.message)
    except sqlite3.Error as e:
        _exit_with("FAILED_PRECONDITION", f"the metadata database cannot be used: {e}")
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        _exit_with("FAILED_PRECONDITION", f"cannot use{where}: {e.strerror or e}")


def _exit_with(code: str, message: str) -> NoReturn:
    # One line whatever the message holds: a multi-line server detail would break `CODE: message`.
    sys.stderr.write(f"{code}: {' '.join(message.split())}\n")
    raise typer.Exit(EXIT_FAILED)


def quiet_libraries() -> None:
    """No per-model loading bars or info/warning lines from diffusers/transformers between the lines we print
    (the embedded server and benchmarks load models in this process).

    Through the variables they read when imported, not by importing them: that imports torch, seconds of a
    command (`subjects list`) that may never load a model. Variables the user set win."""
    for name, value in (("TQDM_DISABLE", "1"), ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):  # already imported: their switches
        logging = sys.modules.get(name)
        if logging is not None:
            logging.disable_progress_bar()
            logging.set_verbosity_error()
