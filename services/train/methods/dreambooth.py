"""DreamBooth: fine-tunes the whole UNet (and optionally the text encoder); saves a full diffusers pipeline."""
from __future__ import annotations

import shutil
from pathlib import Path

from .base import Components, TrainingMethod


class DreamBoothMethod(TrainingMethod):
    """Full fine-tuning as in Ruiz et al. 2023 (diffusers train_dreambooth.py); artifact: a pipeline folder."""

    name = "dreambooth"
    saves_pipeline = True

    def prepare(self, components: Components, config) -> None:
        self.components, self.config = components, config
        components.vae.requires_grad_(False)
        components.unet.requires_grad_(True)
        components.text_encoder.requires_grad_(bool(config.train_text_encoder))

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.config and self.config.train_text_encoder)

    def trainable_parameters(self):
        c = self._prepared()
        params = list(c.unet.parameters())
        if self.trains_text_encoder:
            params += list(c.text_encoder.parameters())
        return params

    def save(self, output_dir: Path) -> Path:
        from diffusers import StableDiffusionPipeline

        c = self._prepared()
        output_dir = Path(output_dir)
        # The base folder's scheduler, VAE and tokenizer with the trained UNet and text encoder.
        pipe = StableDiffusionPipeline.from_pretrained(
            c.base_model_dir, unet=c.unet, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(output_dir, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; keep the slow-tokenizer files the base folder had for 4.x readers.
        for name in ("vocab.json", "merges.txt"):
            src, dest = Path(c.base_model_dir) / "tokenizer" / name, output_dir / "tokenizer" / name
            if src.exists() and not dest.exists():
                shutil.copyfile(src, dest)
        return output_dir
