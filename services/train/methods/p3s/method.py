"""The p3s training method: the frozen UNet conditioned on each photo's completed image through the RNGR encoder
and a trainable simplified copy (P3S-Diffusion §III); saves p3s_condition.safetensors.

Per step (the loop's hooks): the batch's instance rows get their photo's reference I'' (RNGR over the completed
photo's latent and its CLIP hidden state), the copy runs on x_t + I'' with the captions and timestep, its features
f_i × ε_t join every self-attention of the frozen UNet (class images of prior preservation take the plain
attention), and γ·L_ac compares the copy's cross-attention maps with the frozen UNet's (the frozen map detached: it
is the anchor the copy is pulled toward; gradient reaches the copy through M_c). What trains: the copy, its zero
convs and the RNGR encoder; the UNet, VAE and text encoder stay frozen. Without a subject mask a photo has nothing
to keep, so every photo must have one.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from persona.services.models.p3s.condition import WEIGHT_NAME
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

from ..base import Components, TrainingMethod
from .config import P3SConfig


class P3SMethod(TrainingMethod):
    """P3S-Diffusion (point-supervised selective subject-driven generation), the training side."""

    name = "p3s"
    uses_masks = True
    # Each photo's negative-click region (bool (H, W) or None), for `p3s_region` negative_clicks.
    negative_masks: list | None = None

    def bind_negative_masks(self, masks: list) -> None:
        self.negative_masks = list(masks)

    def prepare(self, components: Components, config) -> None:
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModel

        from persona.services.models.p3s.injection import (ConditionBranch, InjectedSelfAttnProcessor, InjectionState,
                                                           RecordingCrossAttnProcessor, cross_attention_names)
        from persona.services.models.p3s.rngr import RngrEncoder
        from persona.services.models.p3s.weights import TimestepWeights

        from .consistency import paired_layers

        self.components, self.config = components, config
        self.p3s: P3SConfig = config.p3s.validate()
        for model in (components.vae, components.text_encoder, components.unet):
            model.requires_grad_(False)
        unet = components.unet
        self.branch = ConditionBranch(unet)
        try:
            self.vision = CLIPVisionModel.from_pretrained(self.p3s.clip_model, dtype=torch.float32).eval()
            self.vision_processor = CLIPImageProcessor.from_pretrained(self.p3s.clip_model)
        except OSError as exc:
            raise FailedPrecondition(f"`p3s_clip_model` {self.p3s.clip_model!r} cannot be loaded ({exc}): name a "
                                     "local CLIP folder or a hub id in the model cache") from exc
        self.vision.requires_grad_(False)
        self.rngr = RngrEncoder(unet.config.in_channels, self.vision.config.hidden_size, self.p3s.rngr_attention_dim)
        self.weights = TimestepWeights(self.p3s.weight_schedule, self.p3s.weight_alpha, self.p3s.weight_beta,
                                       self.p3s.weight_k, self.p3s.weight_constant,
                                       components.noise_scheduler.config.num_train_timesteps)
        # The frozen UNet's self-attentions read f_i from `state`, which before_unet fills each step.
        self.state = InjectionState()
        unet.set_attn_processor({name: InjectedSelfAttnProcessor(name, self.state, self.p3s.injection_lambda)
                                 if name.endswith("attn1.processor") else processor
                                 for name, processor in unet.attn_processors.items()})
        # L_ac's layers record their attention probabilities (Eq. 13) on both sides.
        self.pairs, self.maps = [], {}
        if self.p3s.consistency_weight > 0:
            copies = self.branch.cross_attention_modules()
            self.pairs = paired_layers(cross_attention_names(unet), list(copies), self.p3s.consistency_layers)
            for original, copied in self.pairs:
                for side, module in (("original", unet.get_submodule(original)), ("copy", copies[copied])):
                    maps = self.maps.setdefault((side, original if side == "original" else copied), [])
                    module.set_processor(RecordingCrossAttnProcessor(maps))

    def trainable_parameters(self):
        self._prepared()
        return list(self.branch.parameters()) + list(self.rngr.parameters())

    def bind_examples(self, images, masks, resolution: int, device) -> list[str]:
        """The references: each photo with its removal region filled (Eq. 3), its VAE latent (the mean, scaled as
        the UNet's latents) and its CLIP last hidden state; the branch, encoder and CLIP model move to `device`."""
        import torch

        from ...crop import to_tensor
        from .fill import load_inpainting_pipeline, remove_negative

        c = self._prepared()
        missing = [index for index, mask in enumerate(masks) if mask is None]
        if missing:
            raise InvalidArgument(f"p3s needs each photo's subject mask; photo(s) {', '.join(map(str, missing))} "
                                  "have none: select the subject with `persona-cli mask SUBJECT --image N --point "
                                  "X,Y` first")
        negative = self.negative_masks if self.p3s.region == "negative_clicks" else None
        if self.p3s.region == "negative_clicks" and negative is None:
            raise InvalidArgument("`p3s_region` negative_clicks needs each photo's negative-click region (the train "
                                  "service gets them from the mask service): pass `negative_masks`, or use "
                                  "`p3s_region` outside_mask")
        negative = negative or [None] * len(images)
        inpainter = load_inpainting_pipeline(self.p3s.inpainting_model, str(device)) \
            if self.p3s.fill == "inpaint" else None
        completed = [remove_negative(image, _mask_for(image, mask),
                                     None if region is None else _mask_for(image, region), region=self.p3s.region, fill=self.p3s.fill, inpainter=inpainter)
                     for image, mask, region in zip(images, masks, negative)]
        del inpainter
        for module in (self.branch, self.rngr, self.vision):
            module.to(device)
        with torch.no_grad():
            pixels = torch.stack([to_tensor(image, resolution) for image in completed]).to(device, c.vae.dtype)
            self.reference_latents = c.vae.encode(pixels).latent_dist.mean.float() * c.vae.config.scaling_factor
            inputs = self.vision_processor(images=completed, return_tensors="pt")
            self.reference_clip = self.vision(pixel_values=inputs.pixel_values.to(device)).last_hidden_state.float()
        # c_s is all the run needs from CLIP: free the encoder (ViT-L/14: 300 M parameters).
        self.vision = self.vision_processor = None
        self.n_instance = len(completed)
        return []

    def before_unet(self, batch, noisy, timesteps, text) -> None:
        """Runs the RNGR encoder and the copy for this step's batch and hands f_i × ε_t to the frozen UNet."""
        from persona.services.models.p3s.condition import condition_features

        for maps in self.maps.values():
            maps.clear()
        has_reference = batch < self.n_instance
        rows = batch.clamp(max=self.n_instance - 1)
        self.state.features = condition_features(self.branch, self.rngr, self.reference_latents[rows],
                                                 self.reference_clip[rows], noisy, timesteps, text, self.weights,
                                                 self.p3s.rngr)
        self.state.has_reference = has_reference

    def loss_terms(self) -> dict:
        """{"attention_consistency": (L_ac, γ)} over the paired layers and the rows with a reference (Eq. 11–15)."""
        from .consistency import attention_consistency_loss

        rows = self.state.has_reference
        if not self.pairs or not bool(rows.any()):
            return {}
        losses = []
        for original, copied in self.pairs:
            original_map = self.maps[("original", original)][0][rows].detach()
            copy_map = self.maps[("copy", copied)][0][rows]
            losses.append(attention_consistency_loss(copy_map, original_map))
        return {"attention_consistency": (sum(losses) / len(losses), self.p3s.consistency_weight)}

    def after_optimizer_step(self) -> None:
        # Nothing injected between steps (validation images draw the frozen UNet with plain attention).
        self.state.clear()
        for maps in self.maps.values():
            maps.clear()

    def save(self, output_dir: Path) -> Path:
        from persona.services.models.p3s.condition import save_condition

        self._prepared()
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        settings = {**asdict(self.p3s), "num_train_timesteps": self.weights.num_train_timesteps}
        return save_condition(output_dir / WEIGHT_NAME, self.branch, self.rngr, self.reference_latents,
                              self.reference_clip, self.config.token, settings)


def _mask_for(image, mask):
    """`mask` as a bool array the size of `image` (nearest-neighbour when the mask service worked at another size)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(mask, dtype=bool)
    if array.shape == (image.height, image.width):
        return array
    resized = Image.fromarray(array.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
    return np.asarray(resized) > 127
