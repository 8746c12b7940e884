"""Masked loss: the diffusion loss weighted by the subject mask, so the background of the photos teaches `[v]`
less (or nothing).

Each instance photo's mask (from the mask service: clicks or Grounded-SAM) is cut as its photo is for training
(the centred square) and resized to the latent grid by area averaging (a latent pixel half covered by the subject
weighs half), then `w = unmasked_weight + (1 − unmasked_weight) · m`. `unmasked_weight` 0 trains on the subject alone; the default 0.1 (OneTrainer's default)
keeps a little background so the model still learns a coherent image. Class images (prior preservation) and
photos without a mask keep the plain loss; the job says which photos had none.
"""
from __future__ import annotations

import numpy as np

from ..crop import square_crop_box
from .base import Regularizer, RegularizerInputs


def latent_mask(mask: np.ndarray, latent_size: int):
    """A bool (H, W) mask as a float (latent_size, latent_size) coverage map in [0, 1] (area averaging).

    Cut exactly as its photo is for training (loop._to_tensor: the centred square, crop.square_crop_box), then
    resized, so each latent pixel weighs the part of the photo it was encoded from."""
    import torch
    import torch.nn.functional as F

    array = np.asarray(mask, dtype=np.float32)
    left, top, right, bottom = square_crop_box(array.shape[1], array.shape[0])
    tensor = torch.as_tensor(array[top:bottom, left:right])[None, None]
    return F.interpolate(tensor, size=(latent_size, latent_size), mode="area")[0, 0]


def pixel_weights(coverage, unmasked_weight: float):
    """Loss weight per latent pixel from its subject coverage: unmasked_weight where there is no subject, 1 on it."""
    return unmasked_weight + (1.0 - unmasked_weight) * coverage


class MaskedLoss(Regularizer):
    name = "mask"

    def prepare(self, inputs: RegularizerInputs) -> list[str]:
        import torch

        super().prepare(inputs)
        size = inputs.latent_size
        ones = torch.ones(size, size)
        rows, missing = [], []
        for index, mask in enumerate(inputs.instance_masks):
            if mask is None:
                missing.append(index)
                rows.append(ones)
            else:
                rows.append(pixel_weights(latent_mask(mask, size), self.config.unmasked_weight))
        rows += [ones] * inputs.n_class  # class images: no subject to single out
        self.weights = torch.stack(rows)[:, None].to(inputs.device)
        if len(missing) == len(inputs.instance_masks):
            return ["masked loss: no photo of this subject has a mask, so the plain loss is used: make masks with "
                    "`persona-cli mask SUBJECT --text CLASS` (or clicks) first"]
        if missing:
            return [f"masked loss: photo(s) {', '.join(map(str, missing))} have no mask and train with the plain "
                    "loss"]
        return []

    def pixel_weights(self, batch):
        return self.weights[batch]
