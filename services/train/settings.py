"""Settings of the train service: where base models are kept and how they are found, env PERSONA_*."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from persona.services.models.base_models import SD_CONFIGS_DIR
from persona.services.runtime.errors import InvalidSetting
from persona.services.runtime.settings import default_home, env_flag, env_int, env_list, env_text


DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Where train jobs run (TrainSettings.dispatcher); persona.services.train.dispatch builds them.
DISPATCHERS = ("thread", "subprocess", "kubernetes")


def _default_model_cache() -> Path:
    return default_home() / "models"


def _default_single_file_configs() -> Path:
    return SD_CONFIGS_DIR


@dataclass(frozen=True)
class KubernetesJobSettings:
    """Where the Kubernetes dispatcher puts train jobs (PERSONA_K8S_*; the Helm chart sets them all)."""

    namespace: str = "default"  # PERSONA_K8S_NAMESPACE (the chart: the pod's own, by the downward API)
    image: str = ""  # PERSONA_K8S_IMAGE: the worker image (the persona image, with a CUDA torch)
    service_account: str = "default"  # PERSONA_K8S_SERVICE_ACCOUNT: the worker pods' (no API token mounted)
    data_claim: str = "persona-data"  # PERSONA_K8S_DATA_CLAIM: PVC mounted at /data (ReadWriteMany)
    models_claim: str = "persona-models"  # PERSONA_K8S_MODELS_CLAIM: PVC mounted at /models
    gpu: int = 1  # PERSONA_K8S_GPU: nvidia.com/gpu per worker pod
    node_selector: dict = field(default_factory=dict)  # PERSONA_K8S_NODE_SELECTOR: JSON object
    tolerations: list = field(default_factory=list)  # PERSONA_K8S_TOLERATIONS: JSON list
    config_map: str = ""  # PERSONA_K8S_CONFIGMAP: envFrom of the worker (the server's PERSONA_* settings)
    secret: str = ""  # PERSONA_K8S_SECRET: envFrom of the worker (PERSONA_DATABASE_URL, keys)
    image_pull_secrets: list = field(default_factory=list)  # PERSONA_K8S_IMAGE_PULL_SECRETS: comma-separated names

    @classmethod
    def from_env(cls) -> "KubernetesJobSettings":
        def json_env(name: str, kind: type):
            raw = os.environ.get(name, "").strip()
            try:
                value = json.loads(raw) if raw else kind()
            except json.JSONDecodeError as e:
                value = e
            if not isinstance(value, kind):
                what, example = ("object", "{}") if kind is dict else ("list", "[]")
                raise InvalidSetting(f"{name} is {raw!r}: set a JSON {what}, e.g. {name}='{example}'")
            return value

        return cls(namespace=env_text("PERSONA_K8S_NAMESPACE", cls.namespace),
                   image=env_text("PERSONA_K8S_IMAGE", ""),
                   service_account=env_text("PERSONA_K8S_SERVICE_ACCOUNT", cls.service_account),
                   data_claim=env_text("PERSONA_K8S_DATA_CLAIM", cls.data_claim),
                   models_claim=env_text("PERSONA_K8S_MODELS_CLAIM", cls.models_claim),
                   gpu=env_int("PERSONA_K8S_GPU", cls.gpu), node_selector=json_env("PERSONA_K8S_NODE_SELECTOR", dict),
                   tolerations=json_env("PERSONA_K8S_TOLERATIONS", list),
                   config_map=env_text("PERSONA_K8S_CONFIGMAP", ""), secret=env_text("PERSONA_K8S_SECRET", ""),
                   image_pull_secrets=list(env_list("PERSONA_K8S_IMAGE_PULL_SECRETS")))


@dataclass(frozen=True)
class TrainSettings:
    # Folder holding built-in base models such as `tiny` (PERSONA_MODEL_CACHE, default
    # <PERSONA_HOME>/models). Hub models stay in the Hugging Face cache (HF_HOME), not here.
    base_model_cache_dir: Path = field(default_factory=_default_model_cache)
    # Let a hub id that is not in the local Hugging Face cache be downloaded
    # (PERSONA_TRAIN_DOWNLOAD_BASE_MODELS=1). Off by default: a server should not pull gigabytes
    # during a request; HF_HUB_OFFLINE=1 forbids it regardless.
    download_base_models: bool = False
    # Folder with one diffusers config folder per architecture (sd15/, sd21-base/: unet, vae, text_encoder,
    # scheduler configs) that single-file checkpoints are read with (PERSONA_SINGLE_FILE_CONFIGS; default: the
    # released configs shipped with persona).
    single_file_configs: Path = field(default_factory=_default_single_file_configs)
    # Base model when a request names none (PERSONA_BASE_MODEL).
    default_base_model: str = DEFAULT_BASE_MODEL
    # Training device, e.g. "cuda:1" or "cpu" (PERSONA_TRAIN_DEVICE); None: cuda when available, else cpu.
    device: str | None = None
    # Where train jobs run (PERSONA_TRAIN_DISPATCHER): thread (this process), subprocess (a `persona-cli
    # run-job` child process per job) or kubernetes (a Kubernetes Job per train job; needs a shared
    # metadata store, PERSONA_DATABASE_URL, and `kubernetes` below).
    dispatcher: str = "thread"
    kubernetes: KubernetesJobSettings = field(default_factory=KubernetesJobSettings)
    # Bounds of one training run's cost (PERSONA_TRAIN_MAX_RESOLUTION, PERSONA_TRAIN_MAX_BATCH): the image side in
    # pixels (1024 fits SDXL-size bases; SD-1.5 trains at 512) and subject images per step.
    max_resolution: int = 1024
    max_batch_size: int = 16

    @classmethod
    def from_env(cls, data_dir: Path | None = None) -> "TrainSettings":
        """Settings from PERSONA_* variables; the model cache defaults to `data_dir`/models (else PERSONA_HOME's)."""
        cache = os.environ.get("PERSONA_MODEL_CACHE")
        dispatcher = os.environ.get("PERSONA_TRAIN_DISPATCHER", "").strip().lower() or "thread"
        if dispatcher not in DISPATCHERS:
            raise InvalidSetting(f"PERSONA_TRAIN_DISPATCHER is {dispatcher!r}: use thread, subprocess or kubernetes")
        return cls(
            dispatcher=dispatcher,
            kubernetes=KubernetesJobSettings.from_env() if dispatcher == "kubernetes" else KubernetesJobSettings(),
            base_model_cache_dir=Path(cache) if cache else (Path(data_dir) / "models" if data_dir is not None
                                                            else _default_model_cache()),
            download_base_models=env_flag("PERSONA_TRAIN_DOWNLOAD_BASE_MODELS") is True,
            single_file_configs=Path(env_text("PERSONA_SINGLE_FILE_CONFIGS") or _default_single_file_configs()),
            default_base_model=env_text("PERSONA_BASE_MODEL", DEFAULT_BASE_MODEL),
            device=env_text("PERSONA_TRAIN_DEVICE"),
            max_resolution=env_int("PERSONA_TRAIN_MAX_RESOLUTION", cls.max_resolution),
            max_batch_size=env_int("PERSONA_TRAIN_MAX_BATCH", cls.max_batch_size),
        )
