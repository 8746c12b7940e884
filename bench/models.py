"""What every benchmark starts from: the base model folder it times, where such folders are cached, the device."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from persona.services.models.base_models import TINY, missing_components, read_model_configs
from persona.services.models.builders import RANDOM_FAMILIES, build_random_base_model, tiny_base_model
from persona.services.runtime.devices import describe_device, torch_device
from persona.services.runtime.errors import InvalidArgument
from persona.services.train.settings import TrainSettings

__all__ = ["DEFAULT_CONFIG_ROOT", "bench_base_model", "describe_device", "model_cache", "native_resolution",
           "torch_device"]

# Where the real-size configs (sd15/, sd21-base/) are looked for when no config root is given:
# PERSONA_MODEL_CONFIGS, else ../shared/models/configs beside the repository.
DEFAULT_CONFIG_ROOT = Path(__file__).resolve().parents[2] / "shared" / "models" / "configs"


def model_cache(data_dir: Path | None = None) -> Path:
    """The train service's model cache (PERSONA_MODEL_CACHE), else `data_dir`/models when a data dir is given."""
    cache = TrainSettings.from_env().base_model_cache_dir
    if data_dir is not None and not os.environ.get("PERSONA_MODEL_CACHE"):
        cache = Path(data_dir) / "models"
    return cache


def native_resolution(folder: Path) -> int:
    """The image side a base model folder was trained at (its VAE and UNet configs say)."""
    return read_model_configs(folder).native_resolution


def bench_base_model(ref: str, cache_dir: Path, config_root: Path | None = None) -> Path:
    """The diffusers folder for `ref`: `tiny`, `sd15` / `sd21-base` (real-size random weights from the configs
    under `config_root`, built once into `cache_dir`), or a local diffusers folder."""
    ref = (ref or "").strip()
    if ref == TINY:
        return tiny_base_model(cache_dir)
    if ref in RANDOM_FAMILIES:
        root = Path(config_root or os.environ.get("PERSONA_MODEL_CONFIGS") or DEFAULT_CONFIG_ROOT)
        target = Path(cache_dir) / f"random-{ref}"
        if not (target / "model_index.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                build_random_base_model(ref, tmp, root)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise InvalidArgument(f"`base_model` {ref!r} is not tiny, {', '.join(RANDOM_FAMILIES)} or an existing "
                              "diffusers folder")
    missing = missing_components(folder)
    if missing:
        raise InvalidArgument(f"`base_model` {ref!r} is not a diffusers Stable Diffusion folder: missing "
                              f"{', '.join(missing)}")
    return folder.resolve()
