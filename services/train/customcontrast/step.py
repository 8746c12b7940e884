"""One CustomContrast training step (§3): a batch of multi-view samples → the diffusion loss (Eq. 1), CSCL (Eq. 4),
MACL (Eq. 7), the location loss (Eq. 8) and their total (Eq. 9).

A sample is a reference view of a subject, another view of it (MACL's positive) and, when there is one, the
reference's subject mask; the batch holds distinct subjects (`multiview.sample_batch`). The frozen base model (VAE,
text encoder, UNet), the frozen CLIP image encoder and the trainable parts (the MFI encoder, the visual
cross-attention's K'/V') come in `CustomContrastModels`; `loss_terms` is a pure function of them and the batch,
so the training loop, its tests and the ablations (`LossSwitches`) share it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from persona.services.models.customcontrast.attention import global_attention_map
from persona.services.models.customcontrast.build import CustomContrastModels, clip_pixels
from persona.services.models.customcontrast.encoder import MFIEncoder
from persona.services.models.customcontrast.text import (PLACEHOLDER, placeholder_caption, placeholder_ids,
                                                         text_states_per_layer)
from persona.services.runtime.errors import InvalidArgument

from .losses import (CONTRASTIVE_WEIGHT, LOCATION_WEIGHT, appearance_similarity, cscl_loss, location_loss, macl_loss,
                     total_loss)
from .multiview import View

@dataclass(frozen=True)
class LossSwitches:
    """Which of Eq. 9's terms a run trains with (the ablations: without CSCL, without MACL) and their weights."""

    cscl: bool = True
    macl: bool = True
    location: bool = True
    contrastive_weight: float = CONTRASTIVE_WEIGHT
    location_weight: float = LOCATION_WEIGHT

    def check(self, encoder: MFIEncoder) -> None:
        if not encoder.config.use_textual and (self.cscl or self.macl):
            raise InvalidArgument("CSCL and MACL contrast the textual Q-Former's tokens: an encoder without it "
                                  "(`use_textual` off) trains with both turned off")


@dataclass
class ContrastBatch:
    """pixels (B, 3, H, W) in [-1, 1] for the VAE; clip_pixels, positive_clip_pixels, subject_clip_pixels
    (B, 3, h, w) CLIP-normalised: the reference, another view, the reference with its background blanked (the
    segmented subject of Eq. 7); masks (B, H, W) in [0, 1] or None; input_ids and placeholder (B, S)."""

    pixels: torch.Tensor
    clip_pixels: torch.Tensor
    positive_clip_pixels: torch.Tensor
    subject_clip_pixels: torch.Tensor
    masks: torch.Tensor | None
    input_ids: torch.Tensor
    placeholder: torch.Tensor


def load_batch(samples: list[tuple[View, View, str]], tokenizer, num_tokens: int, size: int,
               clip_size: int) -> ContrastBatch:
    """(reference, positive, class name) per sample → a ContrastBatch; captions "a photo of a sks … <class>" with
    one placeholder slot per word token. Views are resized to a square (the toy world's and MVImgNet crops' shape)."""
    def rgb(path, side):
        return np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC), np.float32) / 255

    def grey(path, side):
        return np.asarray(Image.open(path).convert("L").resize((side, side), Image.BILINEAR), np.float32) / 255

    pixels, clips, positives, subjects, masks = [], [], [], [], []
    with_masks = all(reference.mask is not None for reference, _, _ in samples)
    for reference, positive, _ in samples:
        pixels.append(torch.from_numpy(rgb(reference.image, size)).permute(2, 0, 1) * 2 - 1)
        with Image.open(reference.image) as image:
            clips.append(clip_pixels(image, clip_size))
            mask = Image.open(reference.mask).convert("L") if reference.mask is not None else None
            subjects.append(clip_pixels(image, clip_size, mask))  # the background blanked: the segmented subject
        with Image.open(positive.image) as image:
            positives.append(clip_pixels(image, clip_size))
        if with_masks:
            masks.append(torch.from_numpy(grey(reference.mask, size)))
    captions = [placeholder_caption(f"a photo of a {PLACEHOLDER} {class_name}", PLACEHOLDER, num_tokens)
                for _, _, class_name in samples]
    input_ids, placeholder = placeholder_ids(tokenizer, captions, num_tokens)
    return ContrastBatch(torch.stack(pixels), torch.stack(clips), torch.stack(positives), torch.stack(subjects),
                         torch.stack(masks) if with_masks else None, input_ids, placeholder)


def loss_terms(models: CustomContrastModels, batch: ContrastBatch, switches: LossSwitches,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The step's terms by name (`diffusion`, and `cscl`, `macl`, `location` where switched on and possible) and
    `total` (Eq. 9). The location loss needs masks: a batch without them trains without it."""
    switches.check(models.encoder)
    device = batch.pixels.device
    with torch.no_grad():
        latents = models.vae.encode(batch.pixels).latent_dist.sample(generator) * models.vae.config.scaling_factor
        reference_states = models.image_encoder(batch.clip_pixels, output_hidden_states=True).hidden_states
    noise = torch.randn(latents.shape, generator=generator, device=device)
    timesteps = torch.randint(0, models.noise_scheduler.config.num_train_timesteps, (len(latents),),
                              generator=generator, device=device)
    noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)

    anchor = models.encoder(reference_states, timesteps)
    terms: dict[str, torch.Tensor] = {}
    if switches.cscl:
        terms["cscl"] = cscl_loss(anchor.visual_cls, anchor.textual_cls)
    if switches.macl:
        with torch.no_grad():
            positive_states = models.image_encoder(batch.positive_clip_pixels, output_hidden_states=True).hidden_states
            appearance = appearance_similarity(models.image_encoder(batch.subject_clip_pixels).image_embeds)
        positive = models.encoder(positive_states, timesteps)
        terms["macl"] = macl_loss(anchor.text_tokens, positive.text_tokens, appearance)

    layers = models.encoder.config.num_cross_attention_layers
    if anchor.text_tokens is not None:
        text_states = text_states_per_layer(models.text_encoder, batch.input_ids, batch.placeholder,
                                            anchor.text_tokens)
    else:  # visual-only ablation: the caption as written, the same for every layer
        with torch.no_grad():
            text_states = [models.text_encoder(batch.input_ids)[0]] * layers
    injection = models.injection
    injection.text_states, injection.image_tokens = text_states, anchor.image_tokens
    injection.record_maps, injection.maps = switches.location and batch.masks is not None, {}
    try:
        prediction = models.unet(noisy, timesteps, encoder_hidden_states=text_states[0]).sample
    finally:
        maps, injection.maps, injection.record_maps = injection.maps, {}, False
    if models.noise_scheduler.config.prediction_type == "v_prediction":
        target = models.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    terms["diffusion"] = F.mse_loss(prediction.float(), target.float())
    if maps:
        size = tuple(latents.shape[-2:])
        global_map = global_attention_map([maps[i] for i in sorted(maps)], batch.placeholder, size)
        mask = F.interpolate(batch.masks[:, None], size=size, mode="area")[:, 0]
        terms["location"] = location_loss(global_map, mask)
    terms["total"] = total_loss(terms["diffusion"], terms.get("cscl"), terms.get("macl"), terms.get("location"),
                                switches.contrastive_weight, switches.location_weight)
    return terms
