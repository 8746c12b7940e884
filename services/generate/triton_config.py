"""config.pbtxt text for Triton models (python backend, or a native platform such as onnxruntime_onnx or
tensorrt_plan), checked the way Triton would check it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from persona.services.runtime.errors import InvalidArgument

_DTYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
           "FP16", "FP32", "FP64", "BF16", "STRING"}
_NUMPY_DTYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
                 "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
                 "float32": "FP32", "float64": "FP64", "object": "STRING", "bytes": "STRING"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_KINDS = {"KIND_CPU", "KIND_GPU", "KIND_AUTO", "KIND_MODEL"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: `dtype` as Triton names it (FP32, TYPE_FP32, BYTES) or a numpy dtype;
    `dims` without the batch dimension when `max_batch_size` > 0; -1 for a variable size."""

    name: str
    dtype: object
    dims: Sequence[int] = field(default_factory=lambda: (-1,))
    optional: bool = False


def _triton_dtype(dtype: object, where: str) -> str:
    text = str(getattr(dtype, "name", None) or dtype)
    if text.startswith("<class 'numpy."):
        text = text[len("<class 'numpy."):-2]
    text = text.upper().removeprefix("TYPE_")
    if text == "BYTES":
        text = "STRING"
    text = _NUMPY_DTYPES.get(text.lower(), text)
    if text not in _DTYPES:
        raise InvalidArgument(f"`{where}.dtype` is {dtype!r}: use one of {', '.join(sorted(_DTYPES))} (or BYTES)")
    return f"TYPE_{text}"


def _as_spec(t: object, where: str) -> TensorSpec:
    if isinstance(t, TensorSpec):
        return t
    if isinstance(t, Mapping):
        return TensorSpec(**t)
    if isinstance(t, (tuple, list)) and len(t) in (2, 3):
        return TensorSpec(*t)
    raise InvalidArgument(f"`{where}` is {t!r}: give a TensorSpec, a dict or a (name, dtype, dims) tuple")


def _tensor_block(kind: str, tensors: Iterable[object]) -> list[str]:
    lines: list[str] = []
    specs = [_as_spec(t, f"{kind}[{i}]") for i, t in enumerate(tensors)]
    if not specs:
        raise InvalidArgument(f"`{kind}s` is empty: a model needs at least one {kind}")
    seen = set()
    for i, s in enumerate(specs):
        where = f"{kind}[{i}]"
        if not _NAME.match(s.name or ""):
            raise InvalidArgument(f"`{where}.name` is {s.name!r}: use letters, digits, _ . -")
        if s.name in seen:
            raise InvalidArgument(f"`{where}.name` {s.name!r} is used twice")
        seen.add(s.name)
        dims = list(s.dims)
        if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < -1 or d == 0 for d in dims):
            raise InvalidArgument(f"`{where}.dims` is {s.dims!r}: give one or more sizes, each > 0 or -1")
        lines += ["  {", f'    name: "{s.name}"', f"    data_type: {_triton_dtype(s.dtype, where)}",
                  f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
        if s.optional:
            if kind != "input":
                raise InvalidArgument(f"`{where}.optional`: only inputs can be optional")
            lines.append("    optional: true")
        lines.append("  }," if i + 1 < len(specs) else "  }")
    return [f"{kind} ["] + lines + ["]"]


PLATFORMS = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}  # platform → its model file


def model_config(name: str, inputs: Sequence[object], outputs: Sequence[object], *, platform: str | None = None,
                 max_batch_size: int = 0, instance_kind: str = "KIND_CPU", dynamic_batching: bool = False,
                 instance_count: int = 1, parameters: Mapping[str, str] | None = None) -> str:
    """config.pbtxt text for a model served by the python backend (`platform` None: `<version>/model.py`) or by
    a native platform of `PLATFORMS` (`<version>/model.onnx`, `<version>/model.plan`)."""
    if platform is not None and platform not in PLATFORMS:
        raise InvalidArgument(f"`platform` is {platform!r}: use one of {', '.join(PLATFORMS)} (or None: python)")
    if not _NAME.match(name or ""):
        raise InvalidArgument(f"`name` is {name!r}: use letters, digits, _ . -")
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise InvalidArgument(f"`max_batch_size` is {max_batch_size!r}: use 0 (no batching) or a positive int")
    if dynamic_batching and max_batch_size == 0:
        raise InvalidArgument("`dynamic_batching` needs `max_batch_size` > 0")
    kind = instance_kind if instance_kind.startswith("KIND_") else f"KIND_{instance_kind.upper()}"
    if kind not in _KINDS:
        raise InvalidArgument(f"`instance_kind` is {instance_kind!r}: use one of {', '.join(sorted(_KINDS))}")
    if not isinstance(instance_count, int) or instance_count < 1:
        raise InvalidArgument(f"`instance_count` is {instance_count!r}: use 1 or more")
    serve = f'platform: "{platform}"' if platform else 'backend: "python"'
    lines = [f'name: "{name}"', serve, f"max_batch_size: {max_batch_size}"]
    lines += _tensor_block("input", inputs)
    lines += _tensor_block("output", outputs)
    lines += ["instance_group [", f"  {{ kind: {kind} count: {instance_count} }}", "]"]
    if dynamic_batching:
        lines.append("dynamic_batching { }")
    for key, value in (parameters or {}).items():
        if not _NAME.match(str(key)) or any(c in str(value) for c in '"\\\n'):
            raise InvalidArgument(f"`parameters[{key!r}]`: keys are letters/digits/_.-; values have no quotes, "
                                  "backslashes or newlines")
        lines.append(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"
