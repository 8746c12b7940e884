"""`TritonEngine`: the generate engine over a Triton server, through `tritonclient` (gRPC).

A model is loaded by writing its ONNX export — or, with torch components, its diffusers folder — into the model
repository (`TritonRepository`: shared component models, one `sd_pipeline` model, a folder per concept) and
asking Triton to load what is not READY yet; drawing is one inference request to `sd_pipeline` per batch of
images: prompts tokenised here with the concept's tokenizer and sent as INT64 token ids, the concept, scheduler and
shared settings as request parameters (no BYTES tensor: triton_models says why). Nothing restarts: new concepts arrive by Triton's explicit model control while others keep serving.

A p3s concept (torch components only) is its base model's folder plus its condition file, whose UNet component
attaches the condition per request; each draw's weight schedule, λ and reference photo, resolved here against
what the concept trained with, travel as request parameters (triton_p3s.py). A customcontrast concept (torch
components only) is its base model's folder plus its token files, whose UNet component runs one denoising step per
call with the concept's tokens; its prompts are tokenised here with the identifier as N_t placeholder slots
(triton_customcontrast.py).

Where Triton lives (`TritonEndpoint`): a server persona starts itself on the repository (`ManagedTriton`: the
`tritonserver` bundled in nvidia-pytriton, or NVIDIA's), or one someone else runs (`ExternalTriton`: a URL, e.g.
a Kubernetes Service, with the repository on a shared volume). A Triton that is down is UNAVAILABLE within
`rpc_timeout_s`; one that comes back (restarted, so with nothing loaded) is loaded again on the next call. A
managed server that died is started again by that call.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, Sequence

from persona.services.runtime.devices import cuda_available
from persona.services.runtime.errors import FailedPrecondition, NotFound, PersonaError, Unavailable

from ..models.customcontrast.concept import TOKENS_FILE as CUSTOMCONTRAST_TOKENS, read_prompt_slots
from ..models.p3s.condition import read_summary
from .domain import LoadedModel, P3SDrawing
from .sampling import LoopSettings, SamplingSettings, tokenize
from .triton_models import PIPELINE_MODEL
from .triton_repository import RepositoryEntry, TritonRepository, model_name
from .triton_client import load_model, to_persona_error, unload_model
from .triton_customcontrast import prompt_ids
from .triton_p3s import drawing_parameters
from .triton_server import TritonServer

log = logging.getLogger("persona.generate.triton")


class TritonEndpoint(Protocol):
    url: str

    def ensure_running(self) -> None:
        """Raises Unavailable when the server cannot be reached (a managed one is started if it died)."""


class ExternalTriton:
    """A Triton someone else runs (`persona-cli up`, a Kubernetes Deployment): only its gRPC address."""

    def __init__(self, url: str):
        self.url = url

    def ensure_running(self) -> None:
        pass  # calls fail fast with UNAVAILABLE when it is down; nothing here can bring it back


class ManagedTriton:
    """A tritonserver child process on the repository, started on first use and again if it died."""

    def __init__(self, repository: Path, log_file: Path, start_timeout_s: float = 120.0):
        self.server = TritonServer(repository, log_file=log_file, http_port=None, metrics_port=None)
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self.restarts = 0

    @property
    def url(self) -> str:
        self.ensure_running()
        return self.server.grpc_url

    def ensure_running(self) -> None:
        with self._lock:
            if self.server.is_running():
                return
            if self.server.process is not None:
                self.restarts += 1
                log.warning("tritonserver (pid %s) exited with %s; starting it again (log %s)", self.server.pid,
                            self.server.process.returncode, self.server.log_file)
                self.server.stop()
            self.server.start(timeout_s=self.start_timeout_s)

    def stop(self) -> None:
        with self._lock:
            self.server.stop()


class TritonEngine:
    """Draws on Triton; holds which engine keys (concept ids, base:<path>) are loaded as which repository entry."""

    name = "triton"

    def __init__(self, repository: TritonRepository, endpoint: TritonEndpoint, *, rpc_timeout_s: float = 10.0,
                 load_timeout_s: float = 600.0, infer_timeout_s: float = 3600.0):
        self.repository = repository
        self.endpoint = endpoint
        self.rpc_timeout_s = rpc_timeout_s
        self.load_timeout_s = load_timeout_s
        self.infer_timeout_s = infer_timeout_s
        self._loaded: dict[str, tuple[RepositoryEntry, LoadedModel, object]] = {}  # key → (entry, info, tokenizer)
        self._conditions: dict[str, tuple[int, dict]] = {}  # a p3s concept's key → (photos, training settings)
        self._slots: dict[str, tuple[str, int]] = {}  # a customcontrast concept's key → (identifier, N_t)
        self._lock = threading.RLock()

    @property
    def model_format(self) -> str:
        """What `load` takes: a diffusers folder for torch components, TensorRT engines for tensorrt ones, else an
        ONNX export."""
        return {"torch": "diffusers", "tensorrt": "tensorrt"}.get(self.repository.component_backend, "onnx")

    @property
    def attaches_conditions(self) -> bool:
        """Whether `load` takes a p3s condition or customcontrast tokens: with torch components (their UNet is
        per-step python logic that no ONNX graph or TensorRT engine holds; the domain refuses them otherwise)."""
        return self.repository.component_backend == "torch"

    # -- Engine

    def load(self, key: str, folder: Path, condition: Path | None = None) -> LoadedModel:
        """`folder`: what `model_format` says; `condition`: a p3s concept's condition file or a customcontrast
        concept's tokens file (`folder` is then its base model's diffusers folder)."""
        from transformers import CLIPTokenizer

        with self._lock:
            if key in self._loaded:
                entry, info, _ = self._loaded[key]
                self._ensure_ready(entry)
                return LoadedModel(key, info.resolution, 0.0)
            started = time.perf_counter()
            entry = self.repository.add(model_name(key), folder, condition=condition)
            if condition is not None and Path(condition).name == CUSTOMCONTRAST_TOKENS:
                self._slots[key] = read_prompt_slots(condition)
            elif condition is not None:
                self._conditions[key] = read_summary(condition)
            tokenizer = CLIPTokenizer.from_pretrained(Path(folder) / "tokenizer")  # every export format keeps it
            self._ensure_ready(entry)
            info = LoadedModel(key, entry.native_resolution, time.perf_counter() - started)
            self._loaded[key] = (entry, info, tokenizer)
            return info

    def unload(self, key: str) -> bool:
        with self._lock:
            found = self._loaded.pop(key, None)
            self._conditions.pop(key, None)
            self._slots.pop(key, None)
            if found is None:
                return False
            in_use = {m for entry, _, _ in self._loaded.values() for m in entry.components.values()}
            with self._client() as client:
                for model in found[0].components.values():
                    if model not in in_use:
                        unload_model(client, model, timeout_s=self.rpc_timeout_s * 3, wait=False)
            return True

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return [info for _, info, _ in self._loaded.values()]

    def start(self) -> None:
        """Starts a managed tritonserver now (an external one is only expected to be there)."""
        self.endpoint.ensure_running()

    def close(self) -> None:
        """Stops the tritonserver persona started (an external one keeps running, models and all)."""
        stop = getattr(self.endpoint, "stop", None)
        if stop is not None:
            stop()

    def draw_batch(self, key: str, batch: Sequence[SamplingSettings], p3s: P3SDrawing | None = None) -> list:
        """One `sd_pipeline` request for the whole batch (a p3s concept's with `p3s`' settings, unset = as
        trained); a Triton that lost its models (restarted) gets them loaded again and the request is sent once
        more. A customcontrast concept's prompts name its identifier once (else INVALID_ARGUMENT naming `prompts`)."""
        from PIL import Image

        with self._lock:
            entry, _, tokenizer = self._loaded[key]
            condition, slots = self._conditions.get(key), self._slots.get(key)
        extra = {}
        if condition is not None:
            p3s = p3s or P3SDrawing()
            extra = drawing_parameters(*condition, p3s.reference, p3s.weights, p3s.injection_lambda)
        try:
            pixels = self._infer(entry, tokenizer, batch, extra, slots)
        except (FailedPrecondition, NotFound, Unavailable) as error:
            self.endpoint.ensure_running()  # a managed server that died is started again here
            if not self._reload_if_lost(entry):
                raise error
            pixels = self._infer(entry, tokenizer, batch, extra, slots)
        return [Image.fromarray(image) for image in pixels]

    # -- Triton calls

    def _client(self):
        import tritonclient.grpc as grpcclient

        self.endpoint.ensure_running()
        return grpcclient.InferenceServerClient(self.endpoint.url)

    def _ensure_ready(self, entry: RepositoryEntry) -> None:
        """Loads `sd_pipeline` and the entry's components unless READY (in parallel: each is a process)."""
        with self._client() as client:
            wanted = [PIPELINE_MODEL, *entry.components.values()]
            missing = [m for m in wanted if not self._ready(client, m)]
        if not missing:
            return

        def load(model: str) -> float:
            with self._client() as client:
                return load_model(client, model, timeout_s=self.load_timeout_s)

        with ThreadPoolExecutor(max_workers=len(missing)) as pool:
            futures = [pool.submit(load, m) for m in missing]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

    def _ready(self, client, model: str) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return client.is_model_ready(model, client_timeout=self.rpc_timeout_s)
        except InferenceServerException as error:
            raise to_persona_error(error, f"asking Triton whether `{model}` is ready") from error

    def _reload_if_lost(self, entry: RepositoryEntry) -> bool:
        """True when something of `entry` was not READY and has been loaded again."""
        with self._client() as client:
            lost = [m for m in (PIPELINE_MODEL, *entry.components.values()) if not self._ready(client, m)]
        if not lost:
            return False
        log.warning("Triton lost %s (restarted?); loading again", ", ".join(lost))
        self._ensure_ready(entry)
        return True

    def _infer(self, entry: RepositoryEntry, tokenizer, batch: Sequence[SamplingSettings], extra: dict,
               slots: tuple[str, int] | None = None):
        from dataclasses import asdict

        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        prompts = [s.prompt for s in batch]
        columns = [
            ("PROMPT_IDS", (prompt_ids(tokenizer, prompts, *slots) if slots else tokenize(tokenizer, prompts))
             .numpy().astype(np.int64)),
            ("NEGATIVE_IDS", tokenize(tokenizer, [s.negative_prompt for s in batch]).numpy().astype(np.int64)),
            ("SEEDS", np.array([s.seed for s in batch], dtype=np.int64)),
        ]
        inputs = []
        for name, array in columns:
            tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        parameters = {"concept": entry.name, **asdict(LoopSettings.of(batch[0]))}
        parameters["guidance_scale"] = float(parameters["guidance_scale"])  # a double, even when whole
        parameters.update(extra)  # a p3s draw's settings (triton_p3s.P3S_PARAMETERS)
        try:
            with self._client() as client:
                result = client.infer(PIPELINE_MODEL, inputs, parameters=parameters,
                                      client_timeout=self.infer_timeout_s)
        except InferenceServerException as error:
            raise to_persona_error(error, f"drawing on Triton ({entry.name})") from error
        except PersonaError:
            raise
        return result.as_numpy("IMAGES")


def triton_engine_from_settings(settings, data_dir: Path) -> TritonEngine:
    """The Triton engine `settings` (GenerateSettings) describe, on `data_dir` unless they name a repository."""
    root = settings.triton_repository or data_dir / "triton" / "models"
    if settings.triton_url:
        endpoint: TritonEndpoint = ExternalTriton(settings.triton_url)
        native_onnxruntime = native_tensorrt = False
    else:
        endpoint = ManagedTriton(root, log_file=data_dir / "triton" / "tritonserver.log")
        endpoint.server.install = endpoint.server.install or _find_install()
        backends = endpoint.server.install.backend_dir
        native_onnxruntime = backends is not None and (backends / "onnxruntime").is_dir()
        native_tensorrt = backends is not None and (backends / "tensorrt").is_dir()
    gpu = settings.triton_gpu
    if gpu is None:
        gpu = cuda_available()
    # TensorRT engines on a GPU where the server runs plans and this process can build them (NVIDIA's image);
    # else native onnxruntime where the server has it; else torch on GPU instances (the python backend running ONNX
    # Runtime would compute on the CPU there: the nvidia-pytriton machines have a CPU onnxruntime only); else ONNX
    # Runtime in python models on CPU.
    backend = settings.triton_component_backend or (
        "tensorrt" if gpu and native_tensorrt and _can_build_tensorrt() else
        "onnxruntime" if native_onnxruntime else "torch" if gpu else "python")
    repository = TritonRepository(root, component_backend=backend, instance_kind="KIND_GPU" if gpu else "KIND_CPU")
    return TritonEngine(repository, endpoint, rpc_timeout_s=settings.triton_rpc_timeout_s,
                        load_timeout_s=settings.triton_load_timeout_s)


def _can_build_tensorrt() -> bool:
    from persona.services.models.tensorrt_build import tensorrt_available

    return tensorrt_available()[0]


def _find_install():
    from .triton_install import find_tritonserver

    return find_tritonserver()
