"""Decoding and validating uploaded photos before anything is stored."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from persona.services.runtime.errors import InvalidArgument

from .settings import SubjectSettings

# Pillow format -> the media type stored for it when the upload is kept byte for byte. What phones, cameras,
# scanners and editors write; other formats Pillow knows (PSD, EPS, ICO, PPM, ...) are refused, so few decoders
# face untrusted bytes. Multi-frame files give their first frame: MPO (phones' multi-picture JPEG) its primary
# image, GIF and TIFF their first frame or page.
FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
           "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff", "HEIF": "image/heic"}
# Kept byte for byte when already upright RGB or grey; everything else is stored re-encoded (_stored_bytes).
_KEPT_AS_UPLOADED = ("JPEG", "PNG", "WEBP")
_KEPT_MODES = ("RGB", "L")
ACCEPTED = "JPEG (MPO too), PNG, WebP, GIF, BMP, TIFF or HEIC"
HEIC_EXTRA = "pip install 'persona[heic]'"
# ISO-BMFF brands of HEIF/HEIC/AVIF stills (bytes 8–12 of the `ftyp` box).
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif")
# Paletted and alpha photos are flattened onto white, as viewers and photo sites show them.
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ValidatedImage:
    data: bytes  # what is stored: the upload itself, or re-encoded when it had to change (see _stored_bytes)
    width: int
    height: int
    media_type: str
    filename: str


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def heif_opener_registered() -> bool:
    """Registers pillow-heif's HEIC/HEIF decoder with Pillow when the `heic` extra is installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def validate_image(field: str, data: bytes, filename: str, limits: SubjectSettings) -> ValidatedImage:
    """Fully decodes `data` (the first frame of a multi-frame file), applies EXIF orientation, checks format,
    size and pixel limits, and converts it to RGB where it is not (CMYK, 16-bit, paletted, alpha).

    `field` names the upload in errors, e.g. "images[2]".
    """
    if not data:
        raise InvalidArgument(f"`{field}.data` is empty: send the bytes of a photo ({ACCEPTED})")
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(f"`{field}.data` is {_mb(len(data))}; the limit is {_mb(limits.max_image_bytes)}: "
                              "downscale the photo or raise PERSONA_MAX_IMAGE_BYTES")
    if _is_heif(data) and not heif_opener_registered():
        raise InvalidArgument(f"`{field}.data` is a HEIC/HEIF photo, which needs the optional `heic` extra on the "
                              f"server: {HEIC_EXTRA} there, or convert the photo to JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            if fmt not in FORMATS:
                raise InvalidArgument(f"`{field}.data` is a {fmt} image: send {ACCEPTED}")
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise InvalidArgument(f"`{field}` is {width}×{height} pixels, over the limit of "
                                      f"{limits.max_image_pixels:,}: downscale it or raise PERSONA_MAX_IMAGE_PIXELS")
            image.seek(0)  # the first frame: MPO's primary image, a GIF's first frame, a TIFF's first page
            image.load()  # decodes every byte: truncated or corrupt files fail here, not in training
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidArgument(f"`{field}.data` is not a readable image: send {ACCEPTED}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidArgument(f"`{field}.data` could not be decoded ({e}): the file is truncated or corrupt; "
                              "export it again") from None
    if min(width, height) < limits.min_image_side:
        raise InvalidArgument(f"`{field}` is {width}×{height} pixels: each side must be at least "
                              f"{limits.min_image_side} pixels")
    # Orientation first: every later reader (captions, masks, training) sees the pixels upright.
    rotated = image.getexif().get(0x0112, 1) != 1
    oriented = ImageOps.exif_transpose(image) if rotated else image
    if fmt in _KEPT_AS_UPLOADED and not rotated and image.mode in _KEPT_MODES:
        return ValidatedImage(data=data, width=width, height=height, media_type=FORMATS[fmt],
                              filename=filename[:255])
    stored, media_type = _stored_bytes(to_rgb(oriented), fmt)
    return ValidatedImage(data=stored, width=oriented.width, height=oriented.height, media_type=media_type,
                          filename=filename[:255])


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB: 16- and 32-bit grey scaled (Pillow's own conversion clips them at 255), alpha and
    transparent palettes flattened onto white, CMYK and the rest by Pillow's conversion."""
    import numpy as np

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image, dtype=np.float64) / 257.0  # 0–65535 → 0–255
        return Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        scale = 255.0 if grey.max(initial=0.0) <= 1.0 else 1.0  # floats in 0–1, else already 0–255
        return Image.fromarray(np.clip(grey * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _stored_bytes(image: Image.Image, fmt: str) -> tuple[bytes, str]:
    """An RGB photo that had to change, re-encoded: JPEG (quality 95) when it came as a JPEG (MPO too), so a
    photo stays about its size; PNG, lossless, from every other format."""
    buffer = io.BytesIO()
    if fmt in ("JPEG", "MPO"):
        image.save(buffer, "JPEG", quality=95)
        return buffer.getvalue(), "image/jpeg"
    image.save(buffer, "PNG")
    return buffer.getvalue(), "image/png"


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
