"""LoRA: low-rank adapters on the UNet's attention projections (and optionally the text encoder's); saves
pytorch_lora_weights.safetensors."""
from __future__ import annotations

from pathlib import Path

from persona.services.models.fusing import LORA_WEIGHTS as WEIGHT_NAME

from .base import Components, TrainingMethod

# CLIP text encoder attention projections, as diffusers train_dreambooth_lora.py --train_text_encoder.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoraMethod(TrainingMethod):
    """Hu et al. 2021 on the UNet, as diffusers train_dreambooth_lora.py; loads with `pipe.load_lora_weights`."""

    name = "lora"

    def prepare(self, components: Components, config) -> None:
        from peft import LoraConfig

        self.components, self.config = components, config
        components.vae.requires_grad_(False)
        components.text_encoder.requires_grad_(False)
        components.unet.requires_grad_(False)
        # Gaussian init of A (B starts at zero), so the adapted UNet starts equal to the base one.
        components.unet.add_adapter(LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(config.lora_targets),
        ))
        if config.train_text_encoder:
            components.text_encoder.add_adapter(LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                target_modules=list(TEXT_ENCODER_TARGETS)))

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.config and self.config.train_text_encoder)

    def trainable_parameters(self):
        c = self._prepared()
        params = [p for p in c.unet.parameters() if p.requires_grad]
        if self.trains_text_encoder:
            params += [p for p in c.text_encoder.parameters() if p.requires_grad]
        return params

    def save(self, output_dir: Path) -> Path:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        c = self._prepared()
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        # The adapter configs go into the file's metadata, so a lora_alpha other than the rank loads at its scale.
        text_encoder = {}
        if self.trains_text_encoder:
            text_encoder = dict(
                text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(c.text_encoder)),
                text_encoder_lora_adapter_metadata=c.text_encoder.peft_config["default"].to_dict())
        StableDiffusionPipeline.save_lora_weights(
            output_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(c.unet)),
            weight_name=WEIGHT_NAME, safe_serialization=True,
            unet_lora_adapter_metadata=c.unet.peft_config["default"].to_dict(), **text_encoder)
        return output_dir / WEIGHT_NAME
