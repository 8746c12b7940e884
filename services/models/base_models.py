"""Base models a subject is trained on: resolving a reference to a local diffusers folder, and the built-in `tiny`.

A reference is one of
- `tiny`: a small random-weight Stable Diffusion built here (64 px, seconds on a CPU), for tests and smoke runs;
- a local folder in diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/);
- a Hugging Face hub id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`, taken from the local
  Hugging Face cache (nothing is downloaded unless the settings allow it);
- a single-file checkpoint (`.safetensors` / `.ckpt`, as A1111 and ComfyUI hold them), converted once with diffusers'
  single-file loader and the configs of its architecture into a diffusers folder under the model cache.

Weights saved only as a variant (`diffusion_pytorch_model.fp16.safetensors`, the hub's `fp16` variant) are seen
through a folder of links under their plain names, so every loader reads them without a `variant=` argument. Every
loader names the dtype it wants: a base is used whatever dtype it is stored in.

Writing model folders (the built-in `tiny`, random real-size models, single-file conversions) is builders.py's;
torch, diffusers and transformers are imported only there, by the builders, so resolving a folder stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from persona.services.runtime.artifacts import file_sha256
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.runtime.models import check_path_reference, resolve_model_folder

from .builders import SUPPORTED_PIPELINE, build_atomically, convert_single_file, tiny_base_model

TINY = "tiny"
# The released SD-1.5 / SD-2.1-base configs a single-file checkpoint is read with (the default of
# PERSONA_SINGLE_FILE_CONFIGS).
SD_CONFIGS_DIR = Path(__file__).resolve().parent / "assets" / "sd-configs"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Folders under the model cache: single files converted to diffusers, and variant-only folders seen as plain ones.
SINGLE_FILE_DIRNAME = "single-file"
VARIANTS_DIRNAME = "variants"

# What a diffusers Stable Diffusion folder must hold: component -> file that proves it is there.
_REQUIRED = {
    "model_index.json": "model_index.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "tokenizer": "tokenizer",
    "scheduler": "scheduler/scheduler_config.json",
}
_WEIGHTED = ("unet", "vae", "text_encoder")
# Only what a StableDiffusionPipeline loads: hub repos also carry .ckpt files, fp16 and EMA copies.
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    # The hub's half-precision variant, used when the plain weights are not in the cache.
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
]
# Plain weight file names of each weighted component; a variant inserts `.<variant>` before the suffix.
_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors"}


class BaseModelSettings(Protocol):
    """Where base models are found and kept: the train service's settings (PERSONA_TRAIN_*, train/settings.py)."""

    # Folder of the built `tiny`, converted single files and variant views.
    base_model_cache_dir: Path
    # Whether a hub id missing from the local cache may be downloaded (HF_HUB_OFFLINE still wins).
    download_base_models: bool
    # Folder holding sd15/ and sd21-base/ configs, for single-file checkpoints.
    single_file_configs: Path


@dataclass(frozen=True)
class ModelConfigs:
    """What the configs of a diffusers model say about how it is trained and sampled."""

    native_resolution: int
    family: str
    prediction_type: str


@dataclass(frozen=True)
class ResolvedBaseModel:
    """A base model found on local disk, ready for `from_pretrained(path)`."""

    ref: str
    # Local folder in diffusers layout.
    path: Path
    # Image side, pixels, the model was trained at: UNet sample_size x VAE scale factor.
    native_resolution: int
    # "sd15", "sd21", "tiny" or "unknown", guessed from the configs.
    family: str
    # What the UNet predicts: "epsilon" or "v_prediction" (the training loss target depends on it).
    prediction_type: str
    # "builtin", "folder", "hub" or "single-file".
    source: str

    @property
    def builtin_tiny(self) -> bool:
        """The built-in `tiny` model: random weights for trying the flow, so defaults may favour speed on it. Other
        tiny-shaped models (the toy world's base, a test folder) are trained ones and get the real defaults."""
        return self.source == "builtin"


def resolve_base_model(ref: str, settings: BaseModelSettings) -> ResolvedBaseModel:
    """Finds `ref` (tiny, a local folder or a hub id) on local disk and reads what training needs from its configs."""
    ref = (ref or "").strip()
    if not ref:
        raise InvalidArgument(
            "`base_model` is empty: pass `tiny`, a local diffusers folder, or a hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5")
    check_path_reference(ref, "base_model")
    local = Path(ref).expanduser()
    if ref == TINY:
        path, source = tiny_base_model(settings.base_model_cache_dir), "builtin"
    elif local.is_file():
        path, source = single_file_base_model(local, settings), "single-file"
    else:
        # An existing folder wins over a hub id spelled the same, as in the resolver.
        source = "folder" if local.is_dir() else "hub"
        # A diffusers pipeline, not a transformers model: its own file check, no .bin fallback.
        path = resolve_model_folder(
            ref, "base_model", missing=missing_components, allow_patterns=_HUB_PATTERNS, fallback_patterns=(),
            download=settings.download_base_models, kind="diffusers",
            fix="pass a Stable Diffusion folder saved with `pipeline.save_pretrained(...)`")
        path = plain_weights_view(path, settings.base_model_cache_dir)
    configs = read_model_configs(path)
    family = TINY if source == "builtin" else configs.family
    return ResolvedBaseModel(ref=ref, path=path, native_resolution=configs.native_resolution, family=family,
                             prediction_type=configs.prediction_type, source=source)


def base_model_identity(base_model_dir: Path) -> str:
    """Stable, content-aware id of a diffusers folder: sha256 over (path, content sha256) of every file it loads.

    Content, not name or mtime: the same model copied elsewhere or re-downloaded keeps its id (and its
    cached class images), while retrained weights under the same name get a new one. Weights are hashed
    once per process per (path, size, mtime) — about 3 s for SD-1.5 — and a Hugging Face cache snapshot
    costs nothing, because its files link to blobs already named by their sha256.
    """
    root = Path(base_model_dir)
    index_path = root / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"`base_model` {root} has no model_index.json: pass a diffusers folder") from None
    # Only the components the pipeline loads: a hub snapshot may also hold fp16 copies, .ckpt files, READMEs.
    components = sorted(name for name, spec in index.items()
                        if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None)
    files = [index_path]
    for name in components:
        folder = root / name
        if folder.is_dir():
            files += sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return h.hexdigest()


def missing_components(folder: Path) -> list[str]:
    """Names of the diffusers components `folder` lacks (empty when it is a complete Stable Diffusion folder).

    Raises InvalidArgument naming the pipeline when model_index.json says it is another architecture (SDXL, SD3, ...).
    """
    check_architecture(folder)
    missing = [name for name, rel in _REQUIRED.items() if not (folder / rel).exists()]
    for name in _WEIGHTED:
        if name not in missing and not any((folder / name).glob("*.safetensors")) \
                and not any((folder / name).glob("*.bin")):
            missing.append(f"{name} weights")
    return missing


def check_architecture(folder: Path) -> None:
    """Refuses a diffusers folder whose pipeline is not Stable Diffusion 1.x/2.x, naming what it is."""
    try:
        found = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # missing or unreadable: the file check names it
    if found and found != SUPPORTED_PIPELINE:
        raise InvalidArgument(f"`base_model` {Path(folder).name!r} is a {found} model, which persona does not train: "
                              f"pass a Stable Diffusion 1.x or 2.x base ({SUPPORTED_PIPELINE})")


def plain_weights_view(folder: Path, cache_dir: Path) -> Path:
    """`folder` itself when every weighted component has its plain weight file; else a folder under `cache_dir` of
    links to `folder`'s files with a variant's weights (e.g. `model.fp16.safetensors`) under the plain names."""
    folder = Path(folder)
    renames = {}
    for name, plain in _WEIGHT_FILES.items():
        if (folder / name / plain).exists() or (folder / name / plain.replace(".safetensors", ".bin")).exists():
            continue
        stem, suffix = plain.rsplit(".", 1)
        variants = sorted((folder / name).glob(f"{stem}.*.{suffix}"))
        if not variants:
            raise InvalidArgument(f"`base_model` {folder} has no {name} weights ({plain} or a variant of it)")
        renames[name] = (variants[0].name, plain)
    if not renames:
        return folder
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    target = Path(cache_dir) / VARIANTS_DIRNAME / f"{folder.name}-{key}"

    def link(tmp: Path) -> Path:
        for source in folder.rglob("*"):
            if source.is_dir() or source.name.startswith("."):
                continue
            relative = source.relative_to(folder)
            component = relative.parts[0]
            if component in renames and relative.name == renames[component][0]:
                relative = relative.with_name(renames[component][1])
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source.resolve(), tmp / relative)
        return tmp

    if not (target / "model_index.json").exists():
        build_atomically(target, link)
    return target


def single_file_base_model(path: Path, settings: BaseModelSettings) -> Path:
    """The diffusers folder of the single-file checkpoint `path` (A1111/ComfyUI layout), converted on first use.

    The architecture is read from the checkpoint's keys, and diffusers' single-file loader reads it with that
    architecture's configs (`settings.single_file_configs/<family>`); one conversion per file content (path, size
    and modification time), kept under the model cache.
    """
    path = Path(path).resolve()
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise InvalidArgument(f"`base_model` {path.name!r} is a file, but not a single-file checkpoint: pass a "
                              ".safetensors or .ckpt checkpoint, or a diffusers folder")
    family = single_file_family(path)
    configs = Path(settings.single_file_configs) / family
    if not (configs / "unet" / "config.json").exists():
        raise FailedPrecondition(f"no {family} configs at {configs} to read `base_model` {path.name!r} with: set "
                                 "PERSONA_SINGLE_FILE_CONFIGS to a folder holding sd15/ and sd21-base/ diffusers configs")
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{configs.resolve()}".encode()).hexdigest()[:16]
    target = Path(settings.base_model_cache_dir) / SINGLE_FILE_DIRNAME / f"{path.stem}-{key}"
    if not (target / "model_index.json").exists():
        build_atomically(target, lambda tmp: convert_single_file(path, configs, tmp))
    return target


def single_file_family(path: Path) -> str:
    """"sd15" or "sd21-base" from a single-file checkpoint's keys; InvalidArgument naming any other architecture."""
    keys, in_channels = _checkpoint_keys(path)
    name = f"`base_model` {path.name!r}"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise InvalidArgument(f"{name} is a Stable Diffusion XL checkpoint, which persona does not train: pass a "
                              "Stable Diffusion 1.x or 2.x checkpoint")
    if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_" in k for k in keys):
        raise InvalidArgument(f"{name} is a LoRA, not a base model: pass the checkpoint it was trained on")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith(("model.diffusion_model.joint_blocks", "double_blocks.", "transformer_blocks."))
               for k in keys):
            kind = "a diffusion-transformer checkpoint (SD3, Flux or similar)"
        else:
            kind = "not a Stable Diffusion checkpoint (no model.diffusion_model UNet weights)"
        raise InvalidArgument(f"{name} is {kind}, which persona does not train: pass a Stable Diffusion 1.x or 2.x "
                              "checkpoint")
    if in_channels not in (None, 4):
        raise InvalidArgument(f"{name} has a UNet of {in_channels} input channels (an inpainting or depth model), "
                              "which persona does not train: pass a text-to-image Stable Diffusion checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd21-base"  # OpenCLIP ViT-H: Stable Diffusion 2.x
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"  # CLIP ViT-L: Stable Diffusion 1.x
    raise InvalidArgument(f"{name} has no text encoder weights (cond_stage_model): pass a full Stable Diffusion "
                          "checkpoint, not a pruned UNet-only one")


def _checkpoint_keys(path: Path) -> tuple[list[str], int | None]:
    """The tensor names of a single-file checkpoint, and its UNet's input channels (None when not found)."""
    first_conv = "model.diffusion_model.input_blocks.0.0.weight"
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                shape = handle.get_slice(first_conv).get_shape() if first_conv in keys else None
        else:
            import torch

            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
            keys = [k for k in state if isinstance(k, str)]
            shape = tuple(state[first_conv].shape) if first_conv in state else None
    except Exception as e:  # a truncated or foreign file: say so, not a stack trace
        raise InvalidArgument(f"`base_model` {path.name!r} could not be read as a checkpoint "
                              f"({type(e).__name__}: {str(e)[:200]}): pass a .safetensors or .ckpt Stable Diffusion "
                              "checkpoint") from None
    return keys, (int(shape[1]) if shape is not None and len(shape) > 1 else None)


def read_model_configs(folder: Path) -> ModelConfigs:
    """Reads native resolution, family and prediction type from the unet/vae/scheduler configs under `folder`."""
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    # Each VAE block after the first halves the image, so latents are 2**(blocks-1) times smaller.
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    sample_size = unet["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = max(sample_size)
    return ModelConfigs(
        native_resolution=int(sample_size) * vae_scale,
        family=_guess_family(unet),
        prediction_type=scheduler.get("prediction_type", "epsilon"),
    )


def _guess_family(unet: dict) -> str:
    # No released Stable Diffusion is narrower than 320 channels; only test models are.
    if max(unet["block_out_channels"]) < 320:
        return TINY
    # The text encoder's width tells the versions apart: CLIP ViT-L (768) for v1, OpenCLIP ViT-H (1024) for v2.
    # SDXL also has addition embeddings, which this service does not train.
    if unet.get("addition_embed_type"):
        return "unknown"
    return {768: "sd15", 1024: "sd21"}.get(unet.get("cross_attention_dim"), "unknown")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"`base_model` has no {path.parent.name}/{path.name} at {path.parent}") from None
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"`base_model` config {path} is not valid JSON: {e}") from None
