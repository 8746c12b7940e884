"""Regularisers as plugins of the one training loop: each adds a loss term or reweights the diffusion loss, and
composes with every method and with the others (`--reg prior --reg mask --reg spl`). Prior preservation is the
loop's own (it changes the batch); the rest live here, one file each."""
from __future__ import annotations

from .base import Regularizer, RegularizerInputs, weighted_pixel_mean
from .core import CoreRegularizer
from .masked_loss import MaskedLoss
from .spl import SemanticPreservation

# Name (TrainConfig.regularizers, `--reg`) -> plugin class; the loop builds a fresh instance per run.
REGULARIZER_PLUGINS: dict[str, type[Regularizer]] = {
    "mask": MaskedLoss,
    "spl": SemanticPreservation,
    "core": CoreRegularizer,
}

__all__ = ["REGULARIZER_PLUGINS", "Regularizer", "RegularizerInputs", "weighted_pixel_mean", "MaskedLoss",
           "SemanticPreservation", "CoreRegularizer"]
