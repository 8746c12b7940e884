"""LoRA: low-rank adapters on the UNet's attention projections; saves pytorch_lora_weights.safetensors."""
from __future__ import annotations

from pathlib import Path

from .base import Components, TrainingMethod

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


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

    def trainable_parameters(self):
        return [p for p in self._prepared().unet.parameters() if p.requires_grad]

    def save(self, output_dir: Path) -> Path:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = self._prepared().unet
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        # The adapter config goes into the file's metadata, so a lora_alpha other than the rank loads at its scale.
        metadata = unet.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            output_dir, unet_lora_layers=layers, weight_name=WEIGHT_NAME, safe_serialization=True,
            unet_lora_adapter_metadata=metadata)
        return output_dir / WEIGHT_NAME
