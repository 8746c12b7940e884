"""Decoding and validating uploaded photos before anything is stored."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from persona.services.runtime.errors import InvalidArgument

from .settings import SubjectSettings

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass(frozen=True)
class ValidatedImage:
    data: bytes  # what is stored: the upload itself, or re-encoded when EXIF rotated it
    width: int
    height: int
    media_type: str
    filename: str


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def validate_image(field: str, data: bytes, filename: str, limits: SubjectSettings) -> ValidatedImage:
    """Fully decodes `data`, applies EXIF orientation, and checks format, size and pixel limits.

    `field` names the upload in errors, e.g. "images[2]".
    """
    if not data:
        raise InvalidArgument(f"`{field}.data` is empty: send the bytes of a JPEG, PNG or WebP photo")
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(f"`{field}.data` is {_mb(len(data))}; the limit is {_mb(limits.max_image_bytes)}: "
                              "downscale the photo or raise PERSONA_MAX_IMAGE_BYTES")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            if fmt not in FORMATS:
                raise InvalidArgument(f"`{field}.data` is a {fmt} image: send JPEG, PNG or WebP")
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise InvalidArgument(f"`{field}` is {width}×{height} pixels, over the limit of "
                                      f"{limits.max_image_pixels:,}: downscale it or raise PERSONA_MAX_IMAGE_PIXELS")
            image.load()  # decodes every byte: truncated or corrupt files fail here, not in training
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgument(f"`{field}.data` is not a readable JPEG, PNG or WebP image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidArgument(f"`{field}.data` could not be decoded ({e}): the file is truncated or corrupt; "
                              "export it again") from None
    if min(width, height) < limits.min_image_side:
        raise InvalidArgument(f"`{field}` is {width}×{height} pixels: each side must be at least "
                              f"{limits.min_image_side} pixels")
    oriented, stored = image, data
    if image.getexif().get(0x0112, 1) != 1:  # EXIF Orientation asks for a rotation or flip
        oriented = ImageOps.exif_transpose(image)
        buffer = io.BytesIO()  # store the rotated pixels so every later reader sees them upright
        if fmt == "JPEG":
            oriented.convert("RGB").save(buffer, "JPEG", quality=95)
        else:
            oriented.save(buffer, fmt)
        stored = buffer.getvalue()
    return ValidatedImage(data=stored, width=oriented.width, height=oriented.height,
                          media_type=FORMATS[fmt], filename=filename[:255])


def image_pixels(data: bytes) -> int:
    """width × height from the header alone (nothing decoded): what decoding `data` will take; 0 when the header
    is unreadable (validate_image then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
        return width * height
    except Exception:  # any unreadable header: validate_image names the problem
        return 0


def png_bytes(image: Image.Image) -> bytes:
    """`image` as RGB PNG bytes with no metadata: equal pixels give equal bytes, so a content-addressed
    store keeps one copy."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()
