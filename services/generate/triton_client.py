"""Triton's explicit model control through tritonclient: load and unload a model and wait for it, with Triton's
answers mapped to persona errors. tritonclient is imported inside the functions, so importing this stays cheap."""
from __future__ import annotations

import time
from typing import Mapping

from persona.services.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PersonaError,
    Unavailable,
)



def to_persona_error(exc: Exception, what: str) -> PersonaError:
    """Map a tritonclient InferenceServerException to the persona error a client should see."""
    status = str(getattr(exc, "status", lambda: None)() or "")
    message = getattr(exc, "message", lambda: str(exc))()
    text = f"{what}: {message}"
    if "UNAVAILABLE" in status:
        return Unavailable(f"{what}: Triton is not reachable ({message})")
    if "DEADLINE_EXCEEDED" in status:
        return DeadlineExceeded(text)
    if "NOT_FOUND" in status:
        return NotFound(text)
    if "INVALID_ARGUMENT" in status and "failed to load" not in message and "load failed" not in message:
        return InvalidArgument(text)
    return FailedPrecondition(text)


def _model_states(client, name: str, timeout_s: float) -> list[tuple[str, str, str]]:
    """(version, state, reason) of `name` in the repository index."""
    index = client.get_model_repository_index(as_json=True, client_timeout=timeout_s)
    return [(m.get("version", ""), m.get("state", ""), m.get("reason", ""))
            for m in index.get("models", []) if m.get("name") == name]


def _poll_failure(client, name: str, what: str, err: PersonaError) -> PersonaError:
    """Triton says only "failed to poll from model repository" both for a missing folder and for a bad one."""
    from tritonclient.utils import InferenceServerException

    try:
        known = bool(_model_states(client, name, 5.0))
    except InferenceServerException:
        return err
    if not known:
        return NotFound(f"{what}: no folder `{name}` in the model repository: create <repository>/{name}/"
                        "config.pbtxt and <repository>/{name}/<version>/model.py")
    return FailedPrecondition(f"{err.message.rstrip()} (`{name}/config.pbtxt` or its folder is invalid; "
                              "the tritonserver log says why)")


def load_model(client, name: str, *, timeout_s: float = 120.0, config: str | None = None,
               files: Mapping[str, bytes] | None = None) -> float:
    """Load (or reload: new versions, changed config) `name` and wait until it is ready.

    `config` (JSON text) and `files` (`"file:1/model.py"` → bytes) are passed to Triton's load API
    for models uploaded without a repository folder. Returns the seconds it took. Raises Unavailable
    when Triton is down, DeadlineExceeded when the load outlasts `timeout_s`, FailedPrecondition
    (InvalidArgument for a bad request) carrying Triton's message when the model fails to load."""
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()
    deadline = started + timeout_s
    what = f"loading Triton model `{name}`"
    try:
        client.load_model(name, config=config, files=dict(files) if files else None, client_timeout=timeout_s)
    except InferenceServerException as e:
        err = to_persona_error(e, what)
        if "failed to poll from model repository" in err.message and not isinstance(err, Unavailable):
            err = _poll_failure(client, name, what, err)
        if not isinstance(err, DeadlineExceeded):
            raise err from e
    # The load RPC returns when Triton has finished; poll anyway, in case the deadline cut it short.
    while True:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            if client.is_model_ready(name, client_timeout=min(5.0, remaining)):
                return time.monotonic() - started
            states = _model_states(client, name, min(5.0, remaining))
        except InferenceServerException as e:
            raise to_persona_error(e, what) from e
        if states and all(s not in ("LOADING", "READY", "UNLOADING") for _, s, _ in states):
            reasons = "; ".join(f"version {v or '?'}: {s} {r}".strip() for v, s, r in states)
            raise FailedPrecondition(f"{what}: {reasons}")
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"{what}: not ready after {timeout_s:g} s (states: {states}); Triton cannot cancel a load: if the "
                "model's initialize() is stuck, restart the server, else retry with a longer timeout")
        time.sleep(0.1)


def unload_model(client, name: str, *, timeout_s: float = 30.0, unload_dependents: bool = False,
                 wait: bool = True) -> float:
    """Unload `name`; with `wait`, until no version is READY or UNLOADING (Triton answers the RPC at
    once but keeps the model UNLOADING for a few seconds). Returns the seconds it took."""
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()
    deadline = started + timeout_s
    what = f"unloading Triton model `{name}`"
    try:
        client.unload_model(name, unload_dependents=unload_dependents, client_timeout=timeout_s)
        while wait:
            remaining = max(0.1, deadline - time.monotonic())
            states = _model_states(client, name, min(5.0, remaining))
            if all(s not in ("READY", "UNLOADING", "LOADING") for _, s, _ in states):
                break
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{what}: still {states} after {timeout_s:.0f} s")
            time.sleep(0.1)
    except InferenceServerException as e:
        raise to_persona_error(e, what) from e
    return time.monotonic() - started
