"""The optimization profiles of TensorRT engines built from persona's ONNX export, as pure functions of its
manifest (tensorrt_build.py's module docstring gives the rules: batch dynamic from 1, CFG's doubled UNet rows,
the text sequence fixed at the manifest's length, latent sides = pixel sides / vae_scale_factor). Nothing here
needs TensorRT, so it is tested everywhere.
"""
from __future__ import annotations

import math

from persona.services.runtime.errors import InvalidArgument

from .onnx_export import COMPONENTS

DEFAULT_NATIVE_SIDE = 512  # SD-1.5's resolution, when the ONNX manifest does not say
DEFAULT_TEXT_LENGTH = 77
DEFAULT_VAE_SCALE_FACTOR = 8
SIDE_STEP = 8
# Rows per image: the UNet runs the unconditional and conditional halves in one call (CFG).
MAX_ROWS_PER_IMAGE = {"text_encoder": 2, "unet": 2, "vae_decoder": 1}
OPT_ROWS = {"text_encoder": 1, "unet": 2, "vae_decoder": 1}

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name → (min, opt, max)


def engine_profiles(manifest: dict, *, max_batch: int = 8, min_side: int = 256, max_side: int = 1024,
                    opt_side: int | None = None) -> dict[str, Profile]:
    """The optimization profile of each component of the ONNX export described by `manifest` (its manifest.json
    as a dict): component → input name → (min, opt, max) shapes. Rules in the module docstring; `opt_side`
    defaults to the model's native resolution (`resolution`, or `sample_size` × `vae_scale_factor`, in the
    manifest; else 512), moved into [min_side, max_side]. Raises InvalidArgument naming the bad argument."""
    components = manifest_components(manifest)
    if not _is_int(max_batch) or max_batch < 1:
        raise InvalidArgument(f"`max_batch` is {max_batch!r}: pass a whole number of images >= 1, e.g. 8")
    vae_scale, opt_side = resolve_sides(manifest, min_side, max_side, opt_side)
    text_length = manifest.get("max_text_length", DEFAULT_TEXT_LENGTH)
    if not _is_int(text_length) or text_length < 1:
        raise InvalidArgument(f"`manifest.max_text_length` is {text_length!r}: pass the manifest onnx_export wrote")

    profiles: dict[str, Profile] = {}
    for component in COMPONENTS:
        batch = (1, min(OPT_ROWS[component], MAX_ROWS_PER_IMAGE[component] * max_batch),
                 MAX_ROWS_PER_IMAGE[component] * max_batch)
        ranges = {"batch": batch, "sequence": (text_length,) * 3,
                  "height": (min_side // vae_scale, opt_side // vae_scale, max_side // vae_scale),
                  "width": (min_side // vae_scale, opt_side // vae_scale, max_side // vae_scale)}
        profile: Profile = {}
        for tensor in components[component]["inputs"]:
            dims = []
            for dim in tensor["shape"]:
                if _is_int(dim) and dim > 0:
                    dims.append((dim, dim, dim))
                elif dim in ranges:
                    dims.append(ranges[dim])
                else:
                    raise InvalidArgument(
                        f"`manifest.components.{component}` input {tensor['name']} has dimension {dim!r}, which no "
                        f"profile rule covers (known: {', '.join(ranges)} or a fixed size): re-export the ONNX "
                        "folder with persona's onnx_export")
            profile[tensor["name"]] = tuple(tuple(d[i] for d in dims) for i in range(3))  # type: ignore[assignment]
        profiles[component] = profile
    return profiles


def manifest_components(manifest: dict) -> dict:
    if not isinstance(manifest, dict):
        raise InvalidArgument(f"`manifest` is {type(manifest).__name__}: pass the ONNX export's manifest.json "
                              "as a dict")
    components = manifest.get("components")
    missing = [c for c in COMPONENTS if not isinstance(components, dict) or c not in components]
    if missing:
        raise InvalidArgument(f"`manifest` has no {', '.join(missing)} component: pass the manifest.json of a "
                              "persona ONNX export (text_encoder, unet, vae_decoder)")
    for name in COMPONENTS:
        inputs = components[name].get("inputs")
        if not isinstance(inputs, list) or not inputs or not all(
                isinstance(t, dict) and "name" in t and isinstance(t.get("shape"), list) for t in inputs):
            raise InvalidArgument(f"`manifest.components.{name}.inputs` is {inputs!r}: pass the manifest.json of a "
                                  "persona ONNX export (each input with a name and a shape)")
    return components


def resolve_sides(manifest: dict, min_side, max_side, opt_side) -> tuple[int, int]:
    """Checks the pixel sides against the VAE's scale; returns (vae_scale_factor, opt_side resolved)."""
    vae_scale = manifest.get("vae_scale_factor", DEFAULT_VAE_SCALE_FACTOR)
    if not _is_int(vae_scale) or vae_scale < 1:
        raise InvalidArgument(f"`manifest.vae_scale_factor` is {vae_scale!r}: pass the manifest onnx_export wrote")
    step = math.lcm(SIDE_STEP, vae_scale)  # whole latent pixels, and the multiple of 8 engines expect
    for name, side in (("min_side", min_side), ("max_side", max_side)):
        _check_side(name, side, step)
    if min_side > max_side:
        raise InvalidArgument(f"`min_side` {min_side} is larger than `max_side` {max_side}: swap them")
    if opt_side is None:
        native = _native_side(manifest, vae_scale)
        return vae_scale, min(max(native - native % step, min_side), max_side)
    _check_side("opt_side", opt_side, step)
    if not min_side <= opt_side <= max_side:
        raise InvalidArgument(f"`opt_side` {opt_side} is outside [`min_side` {min_side}, `max_side` {max_side}]: "
                              "pass a side in that range (the most common image side)")
    return vae_scale, opt_side


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_side(name: str, side, step: int) -> None:
    if not _is_int(side) or side <= 0 or side % step:
        raise InvalidArgument(f"`{name}` is {side!r}: pass a positive multiple of {step} pixels, e.g. 512")


def _native_side(manifest: dict, vae_scale: int) -> int:
    """The model's native image side: onnx_export records it as `native_resolution`."""
    resolution = manifest.get("native_resolution", manifest.get("resolution"))
    if _is_int(resolution) and resolution > 0:
        return resolution
    sample_size = manifest.get("sample_size")  # the UNet's latent side, as diffusers' config names it
    if _is_int(sample_size) and sample_size > 0:
        return sample_size * vae_scale
    return DEFAULT_NATIVE_SIDE
