"""Where torch computes: the one place that picks `cuda` when there is one and checks a device a user named."""
from __future__ import annotations

from .errors import FailedPrecondition, InvalidArgument


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (False when torch itself is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def device_name(device: str | None = None) -> str:
    """The device to use, as a string: `device` when given (checked to be cpu, cuda or cuda:N), else `cuda` when
    torch sees a GPU, else `cpu`. Naming a GPU that is absent is not checked here (see `torch_device`)."""
    device = (device or "").strip()
    if not device:
        return "cuda" if cuda_available() else "cpu"
    kind, _, index = device.partition(":")
    if device != "cpu" and not (kind == "cuda" and (not index or index.isdigit())):
        raise InvalidArgument(f"`device` is {device!r}: use cpu, cuda or cuda:N")
    return device


def torch_device(device: str | None = None):
    """`device_name(device)` as a torch.device; FailedPrecondition when it names CUDA and torch sees no GPU."""
    import torch

    name = device_name(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FailedPrecondition(f"`device` is {name!r} but torch sees no CUDA GPU: use device cpu, or install the "
                                 "CUDA build of torch")
    return torch.device(name)


def describe_device(device) -> str:
    """A torch.device in words, e.g. `cuda:0 (NVIDIA H100 80GB HBM3)` or `cpu (2 threads)`."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"
