"""The training crop: the centred square every photo is cut to before it is resized, and its mask with it."""
from __future__ import annotations


def square_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred square of a width × height image; PIL's crop box."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side
