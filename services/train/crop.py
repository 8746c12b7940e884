"""The training crop: the centred square every photo is cut to before it is resized, and its mask with it."""
from __future__ import annotations


def square_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred square of a width × height image; PIL's crop box."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_tensor(image, resolution: int):
    """Center-crops `image` to a square, resizes it to `resolution` and maps it to a (3, H, W) tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    image = image.convert("RGB")
    image = image.crop(square_crop_box(*image.size)).resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
