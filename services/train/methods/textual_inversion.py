"""Textual inversion: learns one new token's embedding; saves learned_embeds.safetensors."""
from __future__ import annotations

from pathlib import Path

from persona.services.models.fusing import LEARNED_EMBEDS as WEIGHT_NAME
from persona.services.runtime.errors import InvalidArgument

from .base import Components, TrainingMethod


class PlaceholderToken:
    """One new token whose embedding row learns while every other row stays put: textual inversion's word, and
    Custom Diffusion's modifier token. The whole embedding matrix is the trainable parameter (as in diffusers'
    textual_inversion.py); `restore_other_rows` puts the others back after each optimiser step."""

    def __init__(self, tokenizer, text_encoder, token: str, initializer_token: str):
        import torch

        if not token.strip():
            raise InvalidArgument("`token` is empty: pass the placeholder word, e.g. sks")
        # The placeholder becomes one new token, initialised from the class word's embedding.
        if tokenizer.add_tokens(token) == 0:
            raise InvalidArgument(f"`token` {token!r} is already a token of the tokenizer: pick a new one, e.g. <sks>")
        init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise InvalidArgument(
                f"`initializer_token` {initializer_token!r} is {len(init_ids)} tokens: pass one word, e.g. dog")
        self.token, self.text_encoder = token, text_encoder
        self.token_id = tokenizer.convert_tokens_to_ids(token)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            self.weight[self.token_id] = self.weight[init_ids[0]].clone()
        self.original_embeddings = self.weight.detach().clone()

    @property
    def weight(self):
        """The text encoder's input embedding matrix (vocabulary × hidden)."""
        return self.text_encoder.get_input_embeddings().weight

    def restore_other_rows(self) -> None:
        import torch

        embeddings = self.weight
        if self.original_embeddings.device != embeddings.device:  # the loop moved the model after prepare
            self.original_embeddings = self.original_embeddings.to(embeddings.device)
        keep = torch.ones(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
        keep[self.token_id] = False
        with torch.no_grad():
            embeddings[keep] = self.original_embeddings[keep].to(embeddings.dtype)

    def learned_embedding(self):
        """The new token's embedding row, shape (1, hidden)."""
        return self.weight[self.token_id:self.token_id + 1].detach().float().cpu().clone()

    def save(self, path: Path) -> Path:
        """Writes diffusers' textual-inversion file {token: (n_vectors, hidden)} (`pipe.load_textual_inversion`)."""
        from safetensors.torch import save_file

        save_file({self.token: self.learned_embedding()}, str(path))
        return path


def add_learned_token(tokenizer, text_encoder, token: str, embedding) -> int:
    """Adds `token` with its learned (1, hidden) embedding row to the tokenizer and text encoder, as diffusers'
    `load_textual_inversion` does; the text encoder's trainability is left to the method. Returns the token id."""
    import torch

    if embedding.shape[0] != 1 or embedding.shape[-1] != text_encoder.get_input_embeddings().weight.shape[1]:
        raise InvalidArgument(f"the embedding of {token!r} has shape {tuple(embedding.shape)}; this text encoder "
                              f"takes (1, {text_encoder.get_input_embeddings().weight.shape[1]})")
    if tokenizer.add_tokens(token) == 0:
        raise InvalidArgument(f"`token` {token!r} is already a token of the tokenizer: it cannot take a learned "
                              "embedding")
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = embedding[0].to(weight.device, weight.dtype)
    return token_id


class TextualInversionMethod(TrainingMethod):
    """Gal et al. 2022 (diffusers textual_inversion.py); loads with `pipe.load_textual_inversion(path, token=...)`."""

    name = "ti"

    def prepare(self, components: Components, config) -> None:
        self.components, self.config = components, config
        self.placeholder = frozen_with_new_token(components, config)

    @property
    def trains_text_encoder(self) -> bool:
        return True

    def trainable_parameters(self):
        self._prepared()
        return [self.placeholder.weight]

    def after_optimizer_step(self) -> None:
        self.placeholder.restore_other_rows()

    def learned_embedding(self):
        """The new token's embedding row, shape (1, hidden)."""
        self._prepared()
        return self.placeholder.learned_embedding()

    def save(self, output_dir: Path) -> Path:
        self._prepared()
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        return self.placeholder.save(output_dir / WEIGHT_NAME)


def frozen_with_new_token(components: Components, config) -> PlaceholderToken:
    """Freezes the whole model, then adds `config.token` (from `config.initializer_token`) and lets the embedding
    matrix train; every row but the new token's is put back after each step (`PlaceholderToken`). The common start
    of ti, custom_diffusion and svdiff."""
    components.vae.requires_grad_(False)
    components.unet.requires_grad_(False)
    components.text_encoder.requires_grad_(False)
    placeholder = PlaceholderToken(components.tokenizer, components.text_encoder, config.token,
                                   config.initializer_token)
    placeholder.weight.requires_grad_(True)
    return placeholder
