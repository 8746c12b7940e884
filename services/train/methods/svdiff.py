"""SVDiff: trains shifts of the singular values of every UNet weight matrix, plus one new token's embedding row;
saves them compactly as spectral_shifts.safetensors (Han et al., ICCV 2023)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from persona.services.models.fusing import (SVDIFF_FORMAT as FORMAT, SVDIFF_FORMAT_VERSION as FORMAT_VERSION,
                                            SVDIFF_WEIGHTS as WEIGHT_NAME, TOKEN_KEY, UNET_PREFIX, decompose,
                                            shifted_weight, spectral_layers)
from persona.services.runtime.devices import torch_device

from .base import Components, TrainingMethod
from .textual_inversion import frozen_with_new_token


class SvdiffMethod(TrainingMethod):
    """Spectral shifts (Han et al., "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning", ICCV 2023).

    Each weight W of the UNet, seen as a matrix (out, in·kh·kw) for a convolution, is decomposed once,
    W = U diag(σ) Vᵀ (float32, reduced SVD), and becomes W' = U diag(ReLU(σ + δ)) Vᵀ with U, σ, Vᵀ frozen and
    δ (zeros at the start) trained: one number per singular value. It is computed as W + U diag(ReLU(σ + δ) − σ) Vᵀ,
    the same matrix, so that at δ = 0 the layer is exactly the base one (no SVD round-off) and in fp16 the
    update keeps δ's precision.

    Which layers: every `nn.Linear` and `nn.Conv2d` of the UNet, none skipped (SD-1.5: 282 matrices, from
    conv_out's 4 singular values to 1280; `tiny`: 83). That is attention q/k/v/out, feed-forward, proj_in/out,
    resnet convs and shortcuts, time embedding, conv_in/conv_out and the up/downsamplers. Biases, norm scales,
    the VAE and the text encoder's weights stay frozen: the paper optionally shifts the text encoder too and the
    public svdiff-pytorch also shifts 1-D norm scales (at learning rate 1e-6, i.e. barely); we keep to the UNet
    plus the new token's embedding row (as textual inversion: `PlaceholderToken`, initialised from
    `initializer_token`, every other row put back after each step). Prior preservation is on by default, as
    in the paper's and svdiff-pytorch's DreamBooth-style runs.

    Learning rate: 1e-3 (options.DEFAULT_LEARNING_RATES), svdiff-pytorch's default for spectral shifts (its README:
    "the learning rate for SVDiff needs to be 1000 times larger than the lr used for fine-tuning"). Its second
    rate, 1e-6, is for the 1-D norm-scale shifts we do not train, not for the embedding; our loop has one rate,
    so the token row also moves at 1e-3 (textual inversion's default is 5e-4).

    Size: the file holds one float32 shift per singular value, the token row and metadata (layer names and base
    shapes, to check the base model at load). SD-1.5: 222,696 shifts (0.89 MB) + the 768-float token row + header
    and metadata (~55 KB) = 944,376 bytes, ≈ 0.94 MB: the order of the paper's 1.7 MB, which covers more layers
    (e.g. the text encoder's). `tiny`: 3,620 shifts (14.5 KB), ≈ 28 KB in all. (DreamBooth's fp32 UNet is
    3.4 GB; a rank-4 attention LoRA ~3 MB.)

    The SVD is not stored: `models.fusing.fuse_svdiff` recomputes it from the base weights, which is deterministic up to
    the signs of singular vectors (which cancel in U diag(·) Vᵀ). Where singular values repeat (e.g. a
    rank-deficient matrix's zeros) the basis is not unique and different SVD routines may pair δ with different
    directions; trained weights have distinct singular values in practice.
    """

    name = "svdiff"

    def prepare(self, components: Components, config) -> None:
        from torch.nn.utils import parametrize

        self.components, self.config = components, config
        self.placeholder = frozen_with_new_token(components, config)
        # The SVDs run on the training device (SD-1.5's 282: ~15 minutes on 2 CPU cores, seconds on a GPU).
        device = torch_device(config.device)
        self.shifts: dict = {}
        for name, module in spectral_layers(components.unet):
            shift = spectral_shift(module.weight, svd_device=device)
            parametrize.register_parametrization(module, "weight", shift)
            self.shifts[name] = shift

    @property
    def trains_text_encoder(self) -> bool:
        return True  # its embedding row: captions are encoded anew every step

    def trainable_parameters(self):
        self._prepared()
        return [shift.delta for shift in self.shifts.values()] + [self.placeholder.weight]

    def after_optimizer_step(self) -> None:
        self.placeholder.restore_other_rows()

    def save(self, output_dir: Path) -> Path:
        from safetensors.torch import save_file

        self._prepared()
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        tensors = {UNET_PREFIX + name: shift.delta.detach().float().cpu().contiguous()
                   for name, shift in self.shifts.items()}
        tensors[TOKEN_KEY] = self.placeholder.learned_embedding()
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "token": self.config.token,
                    "initializer_token": self.config.initializer_token,
                    "shapes": json.dumps({name: list(shift.shape) for name, shift in self.shifts.items()},
                                         separators=(",", ":"))}
        path = output_dir / WEIGHT_NAME
        save_file(tensors, str(path), metadata=metadata)
        return path

def spectral_shift(weight, svd_device=None):
    """The parametrisation of one weight (for torch.nn.utils.parametrize): buffers `u`, `s`, `vh` of the SVD of
    `weight` (computed on `svd_device`, kept on the weight's device) and the trainable shifts `delta` (zeros);
    maps the stored frozen weight W to `shifted_weight(W, u, s, vh, delta)`."""
    return _spectral_shift_class()(weight, svd_device)


@functools.cache
def _spectral_shift_class():
    import torch  # imported on first use, as everywhere in the services

    class SpectralShift(torch.nn.Module):
        def __init__(self, weight, svd_device=None):
            super().__init__()
            self.shape = tuple(weight.shape)
            u, s, vh = decompose(weight, svd_device)
            self.register_buffer("u", u.to(weight.device))
            self.register_buffer("s", s.to(weight.device))
            self.register_buffer("vh", vh.to(weight.device))
            self.delta = torch.nn.Parameter(torch.zeros_like(self.s))

        def forward(self, weight):
            return shifted_weight(weight, self.u, self.s, self.vh, self.delta)

    return SpectralShift
