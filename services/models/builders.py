"""Writing base-model folders: the built-in `tiny` (seeded random weights, 64 px), real-size random-weight models
for benchmarks, and single-file checkpoints converted to diffusers folders; each built in a temporary sibling and
renamed into place (`build_atomically`). base_models.py resolves references to these folders.

torch, diffusers and transformers are imported inside the builders only, so importing this module stays cheap.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.runtime.model_loading import loading_models

# Folder under the model cache holding the built `tiny` model.
TINY_DIRNAME = "tiny-sd"
# The public openai/clip-vit-large-patch14 tokenizer, shipped so `tiny` builds without a hub or ../shared.
CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "clip-tokenizer"
# Seed of the tiny model's random weights: every build gives the same model, so tests can compare outputs.
TINY_SEED = 0
# Attention heads of the tiny UNet (diffusers' `attention_head_dim` is the head count): 2 heads of 16 channels.
# SD-1.5's 8 heads at tiny's 1/10 width were 4 channels each, and CPU attention at 1024 tokens with 4-channel
# heads cost 80 % of a UNet call: 8 heads made every tiny image and training step ~3× dearer for nothing.
TINY_ATTENTION_HEADS = 2

# Folder names of the real-size configs under a config root (see build_random_base_model).
RANDOM_FAMILIES = ("sd15", "sd21-base")
# The pipeline class persona trains and draws (model_index.json's `_class_name`).
SUPPORTED_PIPELINE = "StableDiffusionPipeline"

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


def tiny_base_model(cache_dir: Path) -> Path:
    """The `tiny` model's folder under `cache_dir`, built on first use and reused afterwards."""
    target = Path(cache_dir) / TINY_DIRNAME
    if not (target / "model_index.json").exists():
        build_atomically(target, build_tiny_base_model)
    elif _tiny_is_outdated(target):
        build_atomically(target, build_tiny_base_model, replace=True)
    return target


def _tiny_is_outdated(folder: Path) -> bool:
    """True for a `tiny` built by an older persona (8 attention heads): rebuilt, so it costs what it should."""
    try:
        heads = json.loads((folder / "unet" / "config.json").read_text()).get("attention_head_dim")
    except (OSError, ValueError):
        return False  # unreadable: loading it will say what is wrong
    return heads != TINY_ATTENTION_HEADS


def build_atomically(target: Path, build: Callable[[Path], Path], replace: bool = False) -> None:
    """Builds into a temporary sibling and renames it to `target`, so a crash never leaves half a model there;
    `replace` swaps out an existing `target` (the old one is moved aside first, then removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    old = target.parent / f"{tmp.name}-old"
    try:
        with loading_models():  # builds construct modules: one at a time in the process
            build(tmp)
        if replace:
            try:
                os.rename(target, old)
            except FileNotFoundError:
                pass  # another process swapped it already
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target now exists and is complete): keep theirs.
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


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
            attention_head_dim=TINY_ATTENTION_HEADS,
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
    save_pipeline(target_dir, unet, vae, text_encoder, DDIMScheduler(**SD_SCHEDULER_CONFIG))
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
    save_pipeline(target_dir, unet, vae, text_encoder, scheduler)
    return Path(target_dir)


def save_pipeline(target_dir: Path, unet, vae, text_encoder, scheduler) -> None:
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


def convert_single_file(path: Path, configs: Path, target: Path) -> Path:
    """Reads `path` with diffusers' single-file loader and the configs in `configs`; saves it as a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    # Scratch beside the build folder, under the model cache: not in $TMPDIR, which may be small or not persona's.
    with tempfile.TemporaryDirectory(prefix=".config-", dir=Path(target).parent) as scratch:
        # The loader wants a whole pipeline config: the family's components, a tokenizer and a model_index.json.
        config_dir = Path(scratch) / "config"
        shutil.copytree(configs, config_dir, symlinks=False,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt"))
        if not (config_dir / "tokenizer").exists():
            shutil.copytree(CLIP_TOKENIZER_DIR, config_dir / "tokenizer")
        if not (config_dir / "model_index.json").exists():
            (config_dir / "model_index.json").write_text(json.dumps(_MODEL_INDEX))
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config_dir), local_files_only=True, safety_checker=None,
                requires_safety_checker=False)
        except Exception as e:  # shapes that do not fit the family's configs, a damaged file
            raise InvalidArgument(f"`base_model` {path.name!r} could not be read as a {configs.name} checkpoint "
                                  f"({type(e).__name__}: {str(e)[:300]}): pass a Stable Diffusion 1.x or 2.x "
                                  "checkpoint") from None
    save_pipeline(target, pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler)
    return target


# model_index.json of a Stable Diffusion pipeline without safety checker, for configs that ship none.
_MODEL_INDEX = {
    "_class_name": SUPPORTED_PIPELINE, "feature_extractor": [None, None], "safety_checker": [None, None],
    "requires_safety_checker": False, "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}
