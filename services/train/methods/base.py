"""What a training method plugs into the loop: which weights it trains and how it saves them."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona.services.runtime.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

    from ..config import TrainConfig


@dataclass
class Components:
    """The models of a Stable Diffusion base model, as the loop loaded them (methods change them in place)."""

    # The diffusers folder they came from; methods that save a whole pipeline copy the rest from it.
    base_model_dir: Path
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any


class TrainingMethod(ABC):
    """One way to personalise a model. The loop calls prepare, then trains trainable_parameters, then save.

    A method never runs its own loop: everything per step (noise, loss, optimiser) belongs to the loop, so
    methods compose with every regulariser the same way.
    """

    # TrainConfig.method value.
    name: str = ""

    def __init__(self) -> None:
        self.components: Components | None = None
        self.config: TrainConfig | None = None

    @abstractmethod
    def prepare(self, components: Components, config: TrainConfig) -> None:
        """Freezes and unfreezes weights, adds adapters or new tokens; keeps `components` for save."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimiser updates (after prepare)."""

    @property
    def trains_text_encoder(self) -> bool:
        """True when text-encoder weights (or its token embeddings) train, so captions are re-encoded every step."""
        return False

    # True when the method needs each photo's subject mask (the loop then fingerprints masks for resuming).
    uses_masks: bool = False

    def bind_examples(self, images: list, masks: list, resolution: int, device: Any) -> list[str]:
        """Called once the models are on `device`, before the optimiser is built, with the instance photos (PIL) and
        their subject masks (bool (H, W) or None); a method that conditions on the photos (p3s) precomputes what it
        needs. Returns warnings for the job's events."""
        return []

    def bind_negative_masks(self, masks: list) -> None:
        """Called before `bind_examples` when the run has each photo's negative-click region (bool (H, W) or None);
        only a method that removes it from the photos (p3s, `p3s_region` negative_clicks) takes them."""
        raise InvalidArgument(f"`method` {type(self).__name__} takes no negative-click regions: they are for p3s's "
                              "`p3s_region` negative_clicks")

    def before_unet(self, batch: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                    text: torch.Tensor) -> None:
        """Called inside each step's autocast right before the UNet forward, with the examples `batch`, their noised
        latents, timesteps and caption embeddings (e.g. to run a condition branch the UNet reads)."""

    def loss_terms(self) -> dict[str, tuple[torch.Tensor, float]]:
        """Extra loss terms of the method after the step's UNet forward, {name: (unweighted value, weight)}; the
        loop adds weight × value and reports each value under its name."""
        return {}

    def after_optimizer_step(self) -> None:
        """Called after each optimiser step; e.g. textual inversion puts back the embedding rows it must not move."""

    @abstractmethod
    def save(self, output_dir: Path) -> Path:
        """Writes the trained weights into `output_dir` in their ecosystem format; returns the artifact's path."""

    # Whether `save` writes a whole diffusers pipeline (models.fusing.WHOLE_PIPELINE_METHODS: the diffusers export
    # is the weights as they are).
    saves_pipeline: bool = False

    def _prepared(self) -> Components:
        if self.components is None:
            raise RuntimeError(f"{type(self).__name__}.prepare() was not called")
        return self.components
