"""What a regulariser plugs into the training loop: per-pixel weights of the diffusion loss, extra loss terms,
and a hook after each optimiser step."""
from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

    from ..config import TrainConfig
    from ..methods.base import Components, TrainingMethod


@dataclass
class RegularizerInputs:
    """What the loop knows once models are loaded and the method prepared."""

    components: Components
    method: TrainingMethod
    device: Any
    # Training image side (pixels) and the latent grid's side.
    resolution: int
    latent_size: int
    # Examples 0..n_instance-1 are the subject's photos, then n_class class images (prior preservation).
    n_instance: int
    n_class: int
    # One bool (H, W) subject mask (or None) per instance example, in example order.
    instance_masks: Sequence[Any]
    # The loop's autocast context factory (what the UNet and text encoder run under).
    autocast: Any


class Regularizer(ABC):
    """One regulariser. The loop calls `prepare` once, then per step `pixel_weights` and `loss_terms`, then
    `after_optimizer_step`; every hook is optional.

    The seam P3S's attention-consistency loss (Eq. 11–13) will use: it needs the trainable copy that P3S's
    condition injection adds, so it arrives with that method — `prepare` finds the copy on `inputs.method`, and
    `loss_terms(batch, step_inputs)` gets the step's noisy latents and timesteps to run both branches on and
    compare their cross-attention (captured as core.py does)."""

    # The `--reg` name.
    name: str = ""

    def __init__(self, config: TrainConfig):
        self.config = config

    def prepare(self, inputs: RegularizerInputs) -> list[str]:
        """Checks and precomputes what the steps need; returns warnings for the job's events."""
        self.inputs = inputs
        return []

    def pixel_weights(self, batch: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, h, w) weights of the diffusion loss's latent pixels for the examples `batch`, or None."""
        return None

    def loss_terms(self, batch: torch.Tensor,
                   step_inputs: dict[str, Any] | None = None) -> dict[str, tuple[torch.Tensor, float]]:
        """Extra terms {name: (unweighted value, weight)}; the loop adds weight × value to the loss and reports
        each value under its name in the job's progress events. `step_inputs`: what the loop drew this step,
        {"noisy": the noised latents of `batch` (detached), "timesteps": their timesteps, "step": the step, from 1}."""
        return {}

    def after_optimizer_step(self, step: int) -> None:
        """After each optimiser step (e.g. rescaling an embedding)."""


def weighted_pixel_mean(squared_error: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-image diffusion loss: the mean of `squared_error` (B, C, h, w) over channels and pixels, each pixel
    weighted by `weights` (B, 1, h, w) and normalised by the weights' sum,

        L_b = Σ_{c,p} w_{b,p} e_{b,c,p} / (C · Σ_p w_{b,p}),

    so the loss's scale does not depend on how much of the image is subject. An image whose weights are all zero
    (nothing to learn from) gets the plain mean instead of 0/0. `weights` None: the plain mean."""
    if weights is None:
        return squared_error.mean(dim=(1, 2, 3))
    weights = weights.to(squared_error.dtype)
    total = weights.sum(dim=(1, 2, 3))
    weighted = (squared_error * weights).sum(dim=(1, 2, 3)) / (squared_error.shape[1] * total.clamp_min(1e-12))
    return weighted.where(total > 0, squared_error.mean(dim=(1, 2, 3)))
