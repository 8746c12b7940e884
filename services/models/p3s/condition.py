"""A trained P3S condition — the UNet copy, the RNGR encoder and the subject's reference latents — saved beside a
concept, loaded back onto a frozen UNet, and the per-step computation of f_i both training and drawing use.

File: p3s_condition.safetensors, tensors `branch.*` (ConditionBranch state), `rngr.*` (RngrEncoder state),
`reference.latents` (n, C, h, w: each photo's completed latent I', VAE mean × scaling factor) and `reference.clip`
(n, T, D: its CLIP last hidden state c_s); metadata `format`, `format_version`, `token` and `p3s` (the training
hyper-parameters as JSON: `injection_lambda`, `rngr`, the weight schedule, ...). Only persona reads it: no other
tool knows P3S's condition branch.

Every photo's reference is kept, so the concept carries what drawing needs (no photo store at draw time). Reading
chosen for drawing: one photo conditions an image (the paper draws from "a reference image" per generation), the
first photo in the subject's upload order unless the request picks another (`p3s_reference`); its I' latent and
c_s go through the trained RNGR encoder at every step, as in training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

WEIGHT_NAME = "p3s_condition.safetensors"
FORMAT, FORMAT_VERSION = "persona.p3s", 1


def condition_features(branch, rngr, reference_latents, reference_clip, noisy, timesteps, text, weights,
                       use_rngr: bool = True) -> dict:
    """f_i × ε_t per frozen self-attention processor for one UNet call (Eq. 4–6, 9): I'' from the RNGR encoder (or
    I' itself without it), the copy on x_t + I'' with the text and timestep. `reference_*` have one row per row of
    `noisy` (or one row, broadcast); `timesteps` (B,) or a scalar. Drawn at another size than trained, I'' is
    resized (bilinear) to the latent grid."""
    import torch
    import torch.nn.functional as F

    b = noisy.shape[0]
    timesteps = torch.as_tensor(timesteps, device=noisy.device).reshape(-1).expand(b)
    reference = rngr(reference_latents, reference_clip) if use_rngr else reference_latents
    if reference.shape[-2:] != noisy.shape[-2:]:
        reference = F.interpolate(reference, size=noisy.shape[-2:], mode="bilinear", align_corners=False)
    levels = branch(noisy + reference.to(noisy.dtype).expand(b, -1, -1, -1), timesteps, text)
    return branch.layer_features(levels, weights(timesteps))


@dataclass
class P3SCondition:
    """A loaded P3S condition (see the module docstring)."""

    branch: Any
    rngr: Any
    reference_latents: Any
    reference_clip: Any
    settings: dict = field(default_factory=dict)


def save_condition(path: Path, branch, rngr, reference_latents, reference_clip, token: str, settings: dict) -> Path:
    from safetensors.torch import save_file

    tensors = {f"branch.{k}": v for k, v in branch.state_dict().items()}
    tensors.update({f"rngr.{k}": v for k, v in rngr.state_dict().items()})
    tensors["reference.latents"], tensors["reference.clip"] = reference_latents, reference_clip
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "token": token,
                "p3s": json.dumps(settings, separators=(",", ":"))}
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def load_condition(path: Path, unet) -> P3SCondition:
    """Reads `path` and rebuilds its branch (from `unet`, the base model's UNet it was trained on) and encoder."""
    from safetensors import safe_open

    from .injection import ConditionBranch
    from .rngr import RngrEncoder

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise FailedPrecondition(f"{Path(path).name} is not a P3S condition (format {metadata.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    branch = ConditionBranch(unet)
    rngr_k = tensors["rngr.to_k.weight"]
    rngr = RngrEncoder(tensors["rngr.zero_conv.weight"].shape[0], rngr_k.shape[1], rngr_k.shape[0])
    try:
        branch.load_state_dict({k[len("branch."):]: v for k, v in tensors.items() if k.startswith("branch.")})
        rngr.load_state_dict({k[len("rngr."):]: v for k, v in tensors.items() if k.startswith("rngr.")})
    except RuntimeError as exc:
        raise FailedPrecondition(f"{Path(path).name} does not fit this base model's UNet: train and draw with the same "
                                 "base model") from exc
    return P3SCondition(branch.eval(), rngr.eval(), tensors["reference.latents"], tensors["reference.clip"],
                        json.loads(metadata.get("p3s", "{}")))


def read_summary(path: Path) -> tuple[int, dict]:
    """(photos, training settings) of a condition file, without loading its tensors: what a draw's
    `p3s_reference` and unset schedule options are checked and resolved against away from the branch (Triton)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise FailedPrecondition(f"{Path(path).name} is not a P3S condition (format {metadata.get('format')!r})")
        photos = f.get_slice("reference.latents").get_shape()[0]
    return int(photos), json.loads(metadata.get("p3s", "{}"))


def check_reference(reference: int, photos: int) -> None:
    """InvalidArgument naming `p3s_reference` unless it is one of the concept's `photos` photos."""
    if not 0 <= reference < photos:
        raise InvalidArgument(f"`p3s_reference` is {reference}: use a photo index 0–{photos - 1}")


class AttachedCondition:
    """`condition` attached to a frozen `unet`: every UNet call (a pipeline's denoising steps included) first runs
    the copy on its own (sample, timestep, encoder_hidden_states) with reference photo `reference`, and the UNet's
    self-attentions take f_i × ε_t — in both halves of a classifier-free-guidance batch (reading: the reference
    conditions the image, the prompt is what guidance contrasts). `weights`: the ε_t schedule (default: the one the concept was trained with).
    `injection_lambda`: λ of Eq. 7 (default: the concept's trained value). `remove()` puts the UNet back as it was."""

    def __init__(self, unet, condition: P3SCondition, reference: int = 0, weights=None,
                 injection_lambda: float | None = None):
        from .injection import InjectedSelfAttnProcessor, InjectionState
        from .weights import drawing_lambda, trained_weights

        check_reference(reference, condition.reference_latents.shape[0])
        s = condition.settings
        self.weights = weights or trained_weights(s)
        self.unet, self.condition, self.use_rngr = unet, condition, s.get("rngr", True)
        device, dtype = unet.device, unet.dtype
        condition.branch.to(device, dtype)
        condition.rngr.to(device, dtype)
        self.latent = condition.reference_latents[reference:reference + 1].to(device, dtype)
        self.clip = condition.reference_clip[reference:reference + 1].to(device, dtype)
        self.state = InjectionState()
        self.original = unet.attn_processors
        injection_lambda = drawing_lambda(s, injection_lambda)
        unet.set_attn_processor({name: InjectedSelfAttnProcessor(name, self.state, injection_lambda)
                                 if name.endswith("attn1.processor") else processor
                                 for name, processor in self.original.items()})
        self.handle = unet.register_forward_pre_hook(self._before, with_kwargs=True)

    def _before(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        text = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        self.state.features = condition_features(self.condition.branch, self.condition.rngr, self.latent, self.clip,
                                                 sample, timestep, text, self.weights, self.use_rngr)

    def remove(self) -> None:
        self.handle.remove()
        self.unet.set_attn_processor(self.original)
        self.state.clear()
