"""Base models a subject is trained on: resolving a reference to a local diffusers folder, and the built-in `tiny`.

A reference is one of
- `tiny`: a small random-weight Stable Diffusion built here (64 px, seconds on a CPU), for tests and smoke runs;
- a local folder in diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/);
- a Hugging Face hub id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`, taken from the local
  Hugging Face cache (nothing is downloaded unless the settings allow it).

torch, diffusers and transformers are imported only by the builders, so resolving a folder stays cheap.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.runtime.models import resolve_model_folder

from .settings import TrainSettings

TINY = "tiny"
# Folder under the model cache holding the built `tiny` model.
TINY_DIRNAME = "tiny-sd"
# The public openai/clip-vit-large-patch14 tokenizer, shipped so `tiny` builds without a hub or ../shared.
CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "clip-tokenizer"
# Seed of the tiny model's random weights: every build gives the same model, so tests can compare outputs.
TINY_SEED = 0

# Folder names of the real-size configs under a config root (see build_random_base_model).
RANDOM_FAMILIES = ("sd15", "sd21-base")

# Stable Diffusion's noise schedule (v1 and v2 alike), as in the released scheduler configs.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

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
]


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
    # "builtin", "folder" or "hub".
    source: str


def resolve_base_model(ref: str, settings: TrainSettings) -> ResolvedBaseModel:
    """Finds `ref` (tiny, a local folder or a hub id) on local disk and reads what training needs from its configs."""
    ref = (ref or "").strip()
    if not ref:
        raise InvalidArgument(
            "`base_model` is empty: pass `tiny`, a local diffusers folder, or a hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5")
    if ref == TINY:
        path, source = tiny_base_model(settings.base_model_cache_dir), "builtin"
    else:
        # An existing folder wins over a hub id spelled the same, as in the resolver.
        source = "folder" if Path(ref).expanduser().is_dir() else "hub"
        # A diffusers pipeline, not a transformers model: its own file check, no .bin fallback.
        path = resolve_model_folder(
            ref, "base_model", missing=missing_components, allow_patterns=_HUB_PATTERNS, fallback_patterns=(),
            download=settings.download_base_models, kind="diffusers",
            fix="pass a Stable Diffusion folder saved with `pipeline.save_pretrained(...)`")
    configs = read_model_configs(path)
    family = TINY if source == "builtin" else configs.family
    return ResolvedBaseModel(ref=ref, path=path, native_resolution=configs.native_resolution, family=family,
                             prediction_type=configs.prediction_type, source=source)


def missing_components(folder: Path) -> list[str]:
    """Names of the diffusers components `folder` lacks (empty when it is a complete Stable Diffusion folder)."""
    missing = [name for name, rel in _REQUIRED.items() if not (folder / rel).exists()]
    for name in _WEIGHTED:
        if name not in missing and not any((folder / name).glob("*.safetensors")) \
                and not any((folder / name).glob("*.bin")):
            missing.append(f"{name} weights")
    return missing


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


def tiny_base_model(cache_dir: Path) -> Path:
    """The `tiny` model's folder under `cache_dir`, built on first use and reused afterwards."""
    target = Path(cache_dir) / TINY_DIRNAME
    if not (target / "model_index.json").exists():
        _build_atomically(target, build_tiny_base_model)
    return target


def _build_atomically(target: Path, build: Callable[[Path], Path]) -> None:
    """Builds into a temporary sibling and renames it to `target`, so a crash never leaves half a model there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target now exists and is complete): keep theirs.
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_base_model(target_dir: Path) -> Path:
    """Saves a seeded random-weight Stable Diffusion with 64 px native resolution into `target_dir` (diffusers layout)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # fork_rng: seed the weights without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        # SD's layout at 1/10 width: cross-attention on the high-resolution level, a plain block below it.
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        # Two blocks: scale factor 2, so 32 latent pixels decode to 64 image pixels.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
        )
        # The real CLIP vocabulary and context length, so prompts tokenize exactly as for SD-1.5.
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        ))
    _save_pipeline(target_dir, unet, vae, text_encoder, DDIMScheduler(**SD_SCHEDULER_CONFIG))
    return Path(target_dir)


def build_random_base_model(family: str, target_dir: Path, config_root: Path) -> Path:
    """Saves a real-size random-weight model of `family` (sd15, sd21-base) from the configs in `config_root/family`.

    For benchmarks: the same shapes and cost as the released model, without its weights. SD-2.x ships an
    OpenCLIP tokenizer whose pad token differs; the shipped CLIP one has the same vocabulary, which is all
    random weights need.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if family not in RANDOM_FAMILIES:
        raise InvalidArgument(f"`family` is {family!r}: pass one of {', '.join(RANDOM_FAMILIES)}")
    configs = Path(config_root) / family
    if not (configs / "unet" / "config.json").exists():
        raise FailedPrecondition(f"no {family} configs at {configs}: pass the folder holding {family}/unet/config.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(configs / "scheduler"))
    _save_pipeline(target_dir, unet, vae, text_encoder, scheduler)
    return Path(target_dir)


def _save_pipeline(target_dir: Path, unet, vae, text_encoder, scheduler) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        unet=unet,
        scheduler=scheduler,
        # No safety checker: random weights draw noise, and personalisation outputs are the user's own.
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(target_dir, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; 4.x's CLIPTokenizer reads vocab.json and merges.txt.
    for name in ("vocab.json", "merges.txt"):
        dest = Path(target_dir) / "tokenizer" / name
        if not dest.exists():
            shutil.copyfile(CLIP_TOKENIZER_DIR / name, dest)
