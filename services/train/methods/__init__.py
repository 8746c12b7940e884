"""Training methods as plugins of the one training loop: what each trains, and the format it saves."""
from __future__ import annotations

from .base import Components, TrainingMethod
from .custom_diffusion import CustomDiffusionMethod
from .dreambooth import DreamBoothMethod
from .lora import LoraMethod
from .p3s.method import P3SMethod
from .svdiff import SvdiffMethod
from .textual_inversion import TextualInversionMethod

# Method name (TrainConfig.method) -> plugin class; the loop builds a fresh instance per run.
METHODS: dict[str, type[TrainingMethod]] = {
    "dreambooth": DreamBoothMethod,
    "lora": LoraMethod,
    "ti": TextualInversionMethod,
    "custom_diffusion": CustomDiffusionMethod,
    "svdiff": SvdiffMethod,
    "p3s": P3SMethod,
}

__all__ = ["METHODS", "Components", "TrainingMethod", "DreamBoothMethod", "LoraMethod", "TextualInversionMethod",
           "CustomDiffusionMethod", "SvdiffMethod", "P3SMethod"]
