"""P3SConfig: the hyper-parameters of P3S-Diffusion, with the paper's defaults (imports nothing heavy)."""
from __future__ import annotations

from dataclasses import dataclass

from persona.services.runtime.errors import InvalidArgument

from .consistency import LAYERS
from .fill import FILLS, REGIONS
from persona.services.models.p3s.weights import SCHEDULES

# The CLIP image encoder of the paper (and of the point masks: services/mask/settings.py).
CLIP_MODEL = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class P3SConfig:
    """Every knob of the p3s method; each ablation of the paper's Table II/III/IV is one field."""

    # CLIP vision model (hub id or folder) whose last hidden state the RNGR encoder attends to.
    clip_model: str = CLIP_MODEL
    # Eq. 3: which pixels are removed ("outside_mask": outside the subject mask, or "negative_clicks": the negative
    # clicks' region, fill.removal_region) and how
    # ("colour", "blur", or "inpaint" with `inpainting_model`, an SD inpainting pipeline id or folder).
    region: str = "outside_mask"
    fill: str = "colour"
    inpainting_model: str | None = None
    # Eq. 4–5: False is the "w/o RNGR-Encoder" ablation (the copy gets I' itself); d of its attention.
    rngr: bool = True
    rngr_attention_dim: int = 64
    # Eq. 7: λ, the share of f_i added to the values.
    injection_lambda: float = 0.2
    # Eq. 10: the timestep weight ε_t (weights.TimestepWeights).
    weight_schedule: str = "decreasing"
    weight_alpha: float = 0.5
    weight_beta: float = 0.2
    weight_k: float = 2.0
    weight_constant: float = 1.0
    # Eq. 15: γ of the attention-consistency loss (0: the "w/o L_ac" ablation) and the layers it compares.
    consistency_weight: float = 0.1
    consistency_layers: str = "last"

    def validate(self) -> "P3SConfig":
        if not self.clip_model.strip():
            raise InvalidArgument(f"`p3s_clip_model` is empty: name a CLIP vision model, e.g. {CLIP_MODEL}")
        if self.region not in REGIONS:
            raise InvalidArgument(f"`p3s_region` is {self.region!r}: use one of {', '.join(REGIONS)}")
        if self.fill not in FILLS:
            raise InvalidArgument(f"`p3s_fill` is {self.fill!r}: use one of {', '.join(FILLS)}")
        if self.fill == "inpaint" and not self.inpainting_model:
            raise InvalidArgument("`p3s_fill` is inpaint but `p3s_inpainting_model` is not set: name an SD "
                                  "inpainting model (hub id or folder), or use fill colour or blur")
        if self.rngr_attention_dim < 1:
            raise InvalidArgument(f"`p3s_rngr_attention_dim` is {self.rngr_attention_dim}: use ≥ 1, e.g. 64")
        if not 0.0 <= self.injection_lambda <= 10.0:
            raise InvalidArgument(f"`p3s_injection_lambda` is {self.injection_lambda}: use 0–10 (the paper: 0.2)")
        if self.weight_schedule not in SCHEDULES:
            raise InvalidArgument(f"`p3s_weight_schedule` is {self.weight_schedule!r}: use one of "
                                  f"{', '.join(SCHEDULES)}")
        if self.weight_k <= 0:
            raise InvalidArgument(f"`p3s_weight_k` is {self.weight_k}: use an exponent > 0 (the paper: 2)")
        if not 0.0 <= self.consistency_weight <= 1e3:
            raise InvalidArgument(f"`p3s_consistency_weight` is {self.consistency_weight}: use 0–1000 (the paper: "
                                  "0.1; 0 turns the loss off)")
        if self.consistency_layers not in LAYERS:
            raise InvalidArgument(f"`p3s_consistency_layers` is {self.consistency_layers!r}: use one of "
                                  f"{', '.join(LAYERS)}")
        return self
