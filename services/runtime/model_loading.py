"""One model load at a time per process, and the process-wide state a load patches put back after it.

diffusers and transformers build a model inside context managers that patch process-wide state for the length of a
load: accelerate's `init_empty_weights` replaces `nn.Module.register_parameter` (parameters go to the meta device),
diffusers' `no_init_weights` replaces the `torch.nn.init` functions with no-ops, and a `torch_dtype` sets the
default dtype. Two loads in two threads interleave those patches: the second saves the first's patch as the
"original" and puts it back when it ends, so every module built afterwards has meta parameters and every load fails
with "Cannot copy out of meta tensor" until the process restarts; a module built by a third thread meanwhile (LoRA
adapters, a tiny model) is built wrong.

So every place persona builds or loads torch modules does it inside `loading_models()`: one at a time, and on the
way out the patched state is compared with the state before the first load and put back where a load left it
changed. A load that fails is followed by a self-test (a small module must build on the CPU in fp32 with finite
weights); a process that fails it cannot load models any more: `broken()` says why, and the servers it runs stop
reporting SERVING (RunningServer.set_serving consults it).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Iterator

log = logging.getLogger("persona.models")

_lock = threading.RLock()
_depth = 0
_pristine: dict[str, Any] | None = None
_broken = ""
_listeners: list[Callable[[str], None]] = []
# torch.nn.init functions diffusers replaces while loading, and torch constructors accelerate may patch.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "xavier_uniform_", "xavier_normal_",
                   "kaiming_uniform_", "kaiming_normal_", "uniform", "normal", "xavier_uniform", "xavier_normal",
                   "kaiming_uniform", "kaiming_normal", "zeros_", "ones_", "eye_", "dirac_", "orthogonal_",
                   "sparse_")
_CONSTRUCTORS = ("empty", "zeros", "ones", "full")


def _state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {
        "nn.Module.register_parameter": torch.nn.Module.register_parameter,
        "nn.Module.register_buffer": torch.nn.Module.register_buffer,
        "default_dtype": torch.get_default_dtype(),
    }
    state.update({f"nn.init.{name}": getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS
                  if hasattr(torch.nn.init, name)})
    state.update({f"torch.{name}": getattr(torch, name) for name in _CONSTRUCTORS})
    return state


def _restore(pristine: dict[str, Any]) -> list[str]:
    """Puts back whatever differs from `pristine`; returns the names it had to put back."""
    import torch

    changed = [name for name, value in _state().items() if value is not pristine[name]
               and not (name == "default_dtype" and value == pristine[name])]
    for name in changed:
        value = pristine[name]
        if name == "default_dtype":
            torch.set_default_dtype(value)
        elif name.startswith("nn.Module."):
            setattr(torch.nn.Module, name.rsplit(".", 1)[1], value)
        elif name.startswith("nn.init."):
            setattr(torch.nn.init, name.rsplit(".", 1)[1], value)
        else:
            setattr(torch, name.rsplit(".", 1)[1], value)
    return changed


def self_test() -> str:
    """"" when a module builds as it should here (CPU, fp32, finite initialised weights), else what is wrong."""
    import torch

    with torch.random.fork_rng(devices=[]):
        probe = torch.nn.Linear(8, 8)
    weight = probe.weight
    if weight.device.type != "cpu":
        return f"new modules are built on the {weight.device.type} device"
    if weight.dtype != torch.float32:
        return f"new modules are built in {weight.dtype}"
    if not bool(torch.isfinite(weight).all()) or not bool(weight.abs().sum() > 0):
        return "new modules are built with uninitialised weights"
    return ""


@contextlib.contextmanager
def loading_models() -> Iterator[None]:
    """The one way persona builds or loads torch modules: one at a time in the process, the state loads patch put
    back afterwards, and a self-test after a failed load (see the module docstring). Re-entrant."""
    global _pristine, _depth
    with _lock:
        if _pristine is None:
            _pristine = _state()
        _depth += 1  # only the thread holding the lock counts: nesting within it
        try:
            yield
        except BaseException:
            if _depth == 1:
                _after_load(failed=True)
            raise
        else:
            if _depth == 1:
                _after_load(failed=False)
        finally:
            _depth -= 1


def _after_load(failed: bool) -> None:
    global _broken
    restored = _restore(_pristine)
    if restored:
        log.warning("a model load left process-wide state patched (%s); put back", ", ".join(restored))
    if failed or restored:
        problem = self_test()
        if problem and not _broken:
            _broken = f"models cannot be loaded in this process any more ({problem}): restart it"
            log.error("%s", _broken)
            for listener in list(_listeners):
                listener(_broken)


def broken() -> str:
    """Why this process cannot load models ("" while it can)."""
    return _broken


def on_broken(listener: Callable[[str], None]) -> Callable[[], None]:
    """Calls `listener(reason)` when loading breaks; returns a function that stops calling it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None
