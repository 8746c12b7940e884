"""Textual inversion: learns one new token's embedding; saves learned_embeds.safetensors."""
from __future__ import annotations

from pathlib import Path

from persona.services.runtime.errors import InvalidArgument

from .base import Components, TrainingMethod

WEIGHT_NAME = "learned_embeds.safetensors"


class TextualInversionMethod(TrainingMethod):
    """Gal et al. 2022 (diffusers textual_inversion.py); loads with `pipe.load_textual_inversion(path, token=...)`."""

    name = "ti"

    def prepare(self, components: Components, config) -> None:
        import torch

        self.components, self.config = components, config
        tokenizer, text_encoder = components.tokenizer, components.text_encoder
        # The placeholder becomes one new token, initialised from the class word's embedding.
        if tokenizer.add_tokens(config.token) == 0:
            raise InvalidArgument(
                f"`token` {config.token!r} is already a token of the tokenizer: pick a new one, e.g. <sks>")
        init_ids = tokenizer.encode(config.initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise InvalidArgument(
                f"`initializer_token` {config.initializer_token!r} is {len(init_ids)} tokens: pass one word, e.g. dog")
        self.token_id = tokenizer.convert_tokens_to_ids(config.token)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[self.token_id] = embeddings[init_ids[0]].clone()
        # Only the embedding matrix trains; every row but the new token's is put back after each step.
        self.original_embeddings = embeddings.detach().clone()
        components.vae.requires_grad_(False)
        components.unet.requires_grad_(False)
        text_encoder.requires_grad_(False)
        embeddings.requires_grad_(True)

    @property
    def trains_text_encoder(self) -> bool:
        return True

    def trainable_parameters(self):
        return [self._prepared().text_encoder.get_input_embeddings().weight]

    def after_optimizer_step(self) -> None:
        import torch

        embeddings = self._prepared().text_encoder.get_input_embeddings().weight
        keep = torch.ones(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
        keep[self.token_id] = False
        with torch.no_grad():
            embeddings[keep] = self.original_embeddings[keep].to(embeddings.dtype)

    def learned_embedding(self):
        """The new token's embedding row, shape (1, hidden)."""
        embeddings = self._prepared().text_encoder.get_input_embeddings().weight
        return embeddings[self.token_id:self.token_id + 1].detach().float().cpu().clone()

    @classmethod
    def fuse_into_pipeline(cls, pipe, weights_dir: Path, token: str) -> None:
        pipe.load_textual_inversion(str(weights_dir / WEIGHT_NAME), token=token)

    def save(self, output_dir: Path) -> Path:
        from safetensors.torch import save_file

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / WEIGHT_NAME
        # diffusers' format: {placeholder token: (n_vectors, hidden)}.
        save_file({self.config.token: self.learned_embedding()}, str(path))
        return path
