"""P3S's negative-region removal (Eq. 3): I' = inpainting(I, Mask) — the photo with what is not the selected subject
painted over before it conditions the trainable copy.

The paper inpaints with Stable Diffusion's inpainting model but says the region "can be filled with any content as
long as it is not similar to the target subject". So three fills, all keeping every pixel outside the region:

- "colour" (the offline default): the region becomes one flat colour, the complement (255 − c) of the subject's
  mean colour, so it is as unlike the subject as a single colour can be;
- "blur": the region becomes a Gaussian blur (radius BLUR_RADIUS × the image's short side) of the photo, which
  erases detail (a second dog's fur and face) but keeps the scene's colours;
- "inpaint": a diffusers Stable Diffusion inpainting pipeline (hub id or local folder) paints the region from
  `prompt`, as in the paper.

Which region (`removal_region`, the request's `p3s_region`):

- "outside_mask" (the default): everything outside the photo's stored subject mask;
- "negative_clicks": the negative clicks' region minus the subject — the paper's reading of Eq. 3 ("a rough mask
  of negative subject": the similar, unselected subject). The negative region is the mask service's segment for
  the photo's stored negative click(s): the same point algorithm (Eq. 1–2) run on the negative clicks alone
  (MaskDomain.negative_region; the subject mask, not 1 − M_P, keeps the subject out of it). A photo clicked without any
  negative point has an empty negative region: nothing of it is filled (training refuses the option only when no
  photo of the subject has a negative click).
"""
from __future__ import annotations

from typing import Any

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

FILLS = ("colour", "blur", "inpaint")
REGIONS = ("outside_mask", "negative_clicks")
# Blur radius of the "blur" fill as a fraction of the image's short side (a 512 px photo: 51 px).
BLUR_RADIUS = 0.1


def removal_region(subject_mask, negative_mask=None, region: str = "outside_mask"):
    """The bool (H, W) mask of the pixels to fill: ~`subject_mask` ("outside_mask"), or `negative_mask` &
    ~`subject_mask` ("negative_clicks"; `negative_mask` None — a photo without negative clicks — fills nothing)."""
    import numpy as np

    subject = np.asarray(subject_mask, dtype=bool)
    if region not in REGIONS:
        raise InvalidArgument(f"`p3s_region` is {region!r}: use one of {', '.join(REGIONS)}")
    if region == "outside_mask":
        return ~subject
    if negative_mask is None:
        return np.zeros_like(subject)
    negative = np.asarray(negative_mask, dtype=bool)
    if negative.shape != subject.shape:
        raise InvalidArgument(f"negative mask {negative.shape} and subject mask {subject.shape} differ in size")
    return negative & ~subject


def colour_fill(image, region, subject_mask):
    """`image` (PIL) with `region` set to the complement of the mean colour of the `subject_mask` pixels (rounded);
    the rest unchanged. An empty subject mask takes the mean of the whole image."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    region, subject = _checked(pixels, region), _checked(pixels, subject_mask)
    source = pixels[subject] if subject.any() else pixels.reshape(-1, 3)
    fill = 255 - np.rint(source.astype(np.float64).mean(axis=0)).astype(np.uint8)
    pixels[region] = fill
    return Image.fromarray(pixels)


def blur_fill(image, region, radius_fraction: float = BLUR_RADIUS):
    """`image` (PIL) with `region` replaced by the Gaussian blur of the whole photo (radius `radius_fraction` of the
    short side); the rest unchanged."""
    import numpy as np
    from PIL import Image, ImageFilter

    rgb = image.convert("RGB")
    pixels = np.asarray(rgb, dtype=np.uint8).copy()
    region = _checked(pixels, region)
    blurred = np.asarray(rgb.filter(ImageFilter.GaussianBlur(radius_fraction * min(rgb.size))), dtype=np.uint8)
    pixels[region] = blurred[region]
    return Image.fromarray(pixels)


def load_inpainting_pipeline(model: str, device: str = "cpu"):
    """A diffusers StableDiffusionInpaintPipeline from a hub id (the local cache only when HF_HUB_OFFLINE) or a
    local folder, its progress bar off."""
    from diffusers import StableDiffusionInpaintPipeline

    try:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"`p3s_inpainting_model` {model!r} cannot be loaded ({exc}): name a local diffusers "
                                 "inpainting folder or a hub id in the model cache, or use fill colour or blur") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def inpaint_fill(image, region, pipeline, prompt: str = "", steps: int = 30, seed: int = 0):
    """`image` (PIL) with `region` painted by the inpainting `pipeline` from `prompt` (its own scheduler,
    seeded); pixels outside the region are pasted back, so only the region changes."""
    import numpy as np
    import torch
    from PIL import Image

    rgb = image.convert("RGB")
    pixels = np.asarray(rgb, dtype=np.uint8).copy()
    region = _checked(pixels, region)
    mask = Image.fromarray(region.astype(np.uint8) * 255)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    painted = pipeline(prompt=prompt, image=rgb, mask_image=mask, height=rgb.height - rgb.height % 8,
                       width=rgb.width - rgb.width % 8, num_inference_steps=steps, generator=generator).images[0]
    painted = np.asarray(painted.resize(rgb.size), dtype=np.uint8)
    pixels[region] = painted[region]
    return Image.fromarray(pixels)


def remove_negative(image, subject_mask, negative_mask=None, region: str = "outside_mask", fill: str = "colour",
                    inpainter: Any = None, prompt: str = ""):
    """I' of Eq. 3: `image` with its removal region (see `removal_region`) filled by `fill`. "inpaint" needs an
    `inpainter` pipeline (`load_inpainting_pipeline`)."""
    if fill not in FILLS:
        raise InvalidArgument(f"`p3s_fill` is {fill!r}: use one of {', '.join(FILLS)}")
    removed = removal_region(subject_mask, negative_mask, region)
    if fill == "colour":
        return colour_fill(image, removed, subject_mask)
    if fill == "blur":
        return blur_fill(image, removed)
    if inpainter is None:
        raise InvalidArgument("`p3s_fill` is inpaint but no `p3s_inpainting_model` is set: name an SD inpainting "
                              "model (hub id or folder), or use fill colour or blur")
    return inpaint_fill(image, removed, inpainter, prompt)


def _checked(pixels, mask):
    import numpy as np

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != pixels.shape[:2]:
        raise InvalidArgument(f"mask {mask.shape} does not match the image's {pixels.shape[:2]} (height, width): "
                              "compute the mask on this photo")
    return mask
