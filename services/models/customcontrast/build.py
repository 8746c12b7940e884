"""Assembling CustomContrast around a base model: the frozen parts (VAE, text encoder, UNet with the parallel
cross-attention installed, CLIP image encoder) and the encoder, with its widths read from the base model; the CLIP
preprocessing of photos; and a subject's tokens computed once from its photos (the "concept in seconds" of the
finetune-free stream).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.runtime.model_loading import loading_models

from .attention import TokenInjection, install_decoupled_processors
from .encoder import MFIEncoder, MFIEncoderConfig

TINY_IMAGE_ENCODER = "tiny"
TINY_IMAGE_ENCODER_SEED = 0
# CLIP's image normalisation (openai/clip-vit-*).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CustomContrastModels:
    """Everything a CustomContrast step or sample runs: the frozen base model and image encoder, the encoder and
    the UNet's visual K'/V' (`processors`), and the `injection` the processors read."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    unet: nn.Module  # with `install_decoupled_processors` applied
    noise_scheduler: object
    image_encoder: nn.Module  # a transformers CLIPVisionModelWithProjection
    encoder: MFIEncoder
    injection: TokenInjection
    processors: nn.ModuleList

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.processors.parameters()]


def load_image_encoder(ref: str):
    """The CLIP image encoder by reference: `tiny` (built-in, random weights, for tests and the toy world), a local
    folder, or a hub id already in the local Hugging Face cache."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with loading_models():
        if ref == TINY_IMAGE_ENCODER:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TINY_IMAGE_ENCODER_SEED)
                model = CLIPVisionModelWithProjection(CLIPVisionConfig(
                    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                    patch_size=8, projection_dim=32))
        else:
            try:
                model = CLIPVisionModelWithProjection.from_pretrained(ref, local_files_only=True, dtype=torch.float32)
            except OSError as error:
                hint = "" if Path(ref).exists() else f": fetch it once with `hf download {ref}`"
                raise FailedPrecondition(f"`image_encoder` {ref!r} is not available offline ({error}){hint}") from None
    return model.requires_grad_(False).eval()


def encoder_config_for(unet, text_encoder, image_encoder, **options) -> MFIEncoderConfig:
    """An MFIEncoderConfig whose widths fit these models (`options`: the other fields)."""
    layers = sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    if layers == 0:
        raise InvalidArgument("the base model's UNet has no cross-attention layers to feed")
    return MFIEncoderConfig(clip_width=image_encoder.config.hidden_size,
                            word_width=text_encoder.get_input_embeddings().embedding_dim,
                            cross_attention_width=unet.config.cross_attention_dim,
                            num_cross_attention_layers=layers,
                            num_train_timesteps=1000, **options)


def load_customcontrast_models(base_model_dir: str | Path, image_encoder: str, encoder: MFIEncoder | None = None,
                               scale: float = 1.0, **encoder_options) -> CustomContrastModels:
    """The base model (a local diffusers folder) frozen, the parallel cross-attention installed, and `encoder` (a
    new one fitted to the base model's widths when None)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = Path(base_model_dir)
    # fp32 whatever the folder stores (most community folders and the toy world's base are fp16): the encoder
    # trains in fp32 and its tokens meet these weights in every cross-attention.
    with loading_models():
        vae = AutoencoderKL.from_pretrained(base / "vae", dtype=torch.float32).requires_grad_(False)
        text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32).requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
        unet = UNet2DConditionModel.from_pretrained(base / "unet", dtype=torch.float32).requires_grad_(False)
        scheduler = DDPMScheduler.from_pretrained(base / "scheduler")
        injection, processors = install_decoupled_processors(unet, scale)
    clip = load_image_encoder(image_encoder)
    if encoder is None:
        with loading_models():
            encoder = MFIEncoder(encoder_config_for(unet, text_encoder, clip, **encoder_options))
    elif encoder.config.num_cross_attention_layers != len(processors):
        raise InvalidArgument(f"`encoder` feeds {encoder.config.num_cross_attention_layers} cross-attention layers, "
                              f"the base model's UNet has {len(processors)}: use an encoder of this base model")
    return CustomContrastModels(vae, text_encoder, tokenizer, unet, scheduler, clip, encoder, injection, processors)


def clip_pixels(image: Image.Image, size: int, mask: Image.Image | None = None) -> torch.Tensor:
    """(3, size, size) CLIP-normalised pixels of `image` resized to a square; with `mask` (white = subject) the
    background is blanked to CLIP's mean colour first (the segmented subject of Eq. 7)."""
    rgb = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255
    if mask is not None:
        keep = np.asarray(mask.convert("L").resize((size, size), Image.BILINEAR), np.float32)[..., None] / 255
        rgb = rgb * keep + np.array(CLIP_MEAN, np.float32) * (1 - keep)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (torch.from_numpy(rgb).permute(2, 0, 1) - mean) / std


@dataclass
class SubjectTokens:
    """A subject's tokens for every timestep a sampler will visit: text_tokens (T, L_x, N_t, d_word) or None,
    image_tokens (T, L_x, N_img, d_cross), `timesteps` (T,) the rows' timesteps."""

    timesteps: torch.Tensor
    text_tokens: torch.Tensor | None
    image_tokens: torch.Tensor

    def at(self, timestep: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The row for `timestep` (one the table was made for)."""
        rows = (self.timesteps == int(timestep)).nonzero()
        if len(rows) == 0:
            raise InvalidArgument(f"`timestep` {int(timestep)} is not one of the {len(self.timesteps)} the subject's "
                                  "tokens were computed for: compute them for the sampler's schedule")
        row = int(rows[0])
        return (None if self.text_tokens is None else self.text_tokens[row]), self.image_tokens[row]


@torch.no_grad()
def subject_tokens(encoder: MFIEncoder, image_encoder, photos: torch.Tensor, timesteps: torch.Tensor) -> SubjectTokens:
    """Computes a subject's tokens once from its photos (P, 3, h, w) CLIP-normalised, for each of `timesteps`. The
    text queries depend on the timestep, so the table holds one row per timestep of the sampler's schedule. Several
    photos are averaged (reading: the paper encodes one reference image; the mean of their tokens keeps what the
    photos share)."""
    if photos.ndim != 4 or len(photos) == 0:
        raise InvalidArgument(f"`photos` has shape {tuple(photos.shape)}; pass (photos, 3, height, width), at least one")
    states = image_encoder(photos, output_hidden_states=True).hidden_states
    count = len(photos)
    text_rows, image_rows = [], []
    for timestep in timesteps.tolist():
        out = encoder(states, torch.full((count,), timestep, device=photos.device))
        text_rows.append(None if out.text_tokens is None else out.text_tokens.mean(dim=0))
        image_rows.append(out.image_tokens.mean(dim=0))
    text = None if text_rows[0] is None else torch.stack(text_rows)
    return SubjectTokens(timesteps.clone(), text, torch.stack(image_rows))
