"""Settings of the generate service, env PERSONA_GENERATE_* and PERSONA_TRITON_*."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persona.services.runtime.errors import InvalidSetting
from persona.services.runtime.settings import env_flag, env_float, env_int, env_text

ENGINES = ("embedded", "triton")


@dataclass(frozen=True)
class GenerateSettings:
    # Who draws (PERSONA_GENERATE_ENGINE): "embedded" = torch in this process (the laptop default); "triton" =
    # a Triton server on the concepts' ONNX exports (PERSONA_TRITON_URL, or one persona starts itself).
    engine: str = "embedded"
    # Where the embedded engine runs (PERSONA_GENERATE_DEVICE); None: cuda when available (fp16), else cpu.
    device: str | None = None
    # Models the embedded engine keeps loaded, least recently used dropped first (PERSONA_GENERATE_MAX_LOADED).
    max_loaded: int = 2
    # Embedded engine on CUDA: each shape's denoising step (UNet on both CFG halves + DDIM update) captured as one
    # CUDA graph and replayed (PERSONA_GENERATE_CUDA_GRAPHS, default 1; denoise.py).
    cuda_graphs: bool = True
    # Embedded engine: torch.compile the UNet too (PERSONA_GENERATE_COMPILE=1; minutes on first use, kernels
    # cached under <data dir>/cache/torchinductor for the next start).
    compile: bool = False
    # Images drawn in one pass of the sampling loop (PERSONA_GENERATE_BATCH): more is faster per image on a GPU,
    # but each image is streamed only when its batch is done.
    batch_size: int = 1
    # gRPC address of a Triton someone else runs (PERSONA_TRITON_URL, e.g. triton:8001); None with engine
    # "triton": persona starts `tritonserver` itself on `triton_repository`.
    triton_url: str | None = None
    # The model repository persona writes and Triton serves (PERSONA_TRITON_REPOSITORY); None:
    # <data dir>/triton/models. With an external Triton it must be the folder that server reads.
    triton_repository: Path | None = None
    # How components are served (PERSONA_TRITON_COMPONENT_BACKEND): "python" (ONNX Runtime in a python model;
    # what the tritonserver bundled in nvidia-pytriton can do), "onnxruntime" (Triton's native backend, NVIDIA's
    # image), "torch" (torch on the concept's diffusers weights in a python model, fp16 + CUDA graphs on GPU) or
    # "tensorrt" (TensorRT engines on Triton's native backend; needs `tensorrt` here and a GPU). None: tensorrt on
    # a GPU where the server persona starts has that backend and TensorRT imports, else onnxruntime when it has
    # that backend, else torch on GPU instances, else python.
    triton_component_backend: str | None = None
    # Triton instance kind for the models (PERSONA_TRITON_GPU=1: KIND_GPU); None: GPU when torch sees CUDA.
    triton_gpu: bool | None = None
    # ONNX precision (PERSONA_GENERATE_ONNX_FP16); None: fp16 where CUDA is available, else fp32.
    onnx_fp16: bool | None = None
    # Seconds a Triton health/readiness call may take before Triton counts as down (PERSONA_TRITON_RPC_TIMEOUT_S).
    triton_rpc_timeout_s: float = 10.0
    # Seconds a model load may take (PERSONA_TRITON_LOAD_TIMEOUT_S).
    triton_load_timeout_s: float = 600.0

    # What one Generate may cost, so no request runs for minutes or fills the memory: pixels of one image
    # (PERSONA_GENERATE_MAX_PIXELS, default 1024²), images (PERSONA_GENERATE_MAX_IMAGES) and steps × megapixels
    # summed over the images (PERSONA_GENERATE_MAX_MEGAPIXEL_STEPS; 256 = four 1024² images at 60 steps, or
    # sixteen 512² at 60).
    max_pixels: int = 1024 * 1024
    max_images: int = 16
    max_megapixel_steps: float = 256.0
    # Generate calls drawing at once (PERSONA_GENERATE_CONCURRENCY) and waiting behind them
    # (PERSONA_GENERATE_QUEUE); a call beyond both is RESOURCE_EXHAUSTED at once, with a time to retry after.
    concurrency: int = 1
    queue: int = 8

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidSetting(f"`PERSONA_GENERATE_ENGINE` is {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.batch_size < 1:
            raise InvalidSetting(f"`PERSONA_GENERATE_BATCH` is {self.batch_size}: use 1 or more")
        for name, value in (("PERSONA_GENERATE_MAX_PIXELS", self.max_pixels),
                            ("PERSONA_GENERATE_MAX_IMAGES", self.max_images),
                            ("PERSONA_GENERATE_MAX_MEGAPIXEL_STEPS", self.max_megapixel_steps),
                            ("PERSONA_GENERATE_CONCURRENCY", self.concurrency)):
            if not value > 0:
                raise InvalidSetting(f"`{name}` is {value}: use a positive number")
        if self.queue < 0:
            raise InvalidSetting(f"`PERSONA_GENERATE_QUEUE` is {self.queue}: use 0 or more")

    @classmethod
    def from_env(cls, **overrides) -> "GenerateSettings":
        repository = env_text("PERSONA_TRITON_REPOSITORY")
        values = dict(
            engine=env_text("PERSONA_GENERATE_ENGINE", "embedded"),
            device=env_text("PERSONA_GENERATE_DEVICE"),
            max_loaded=max(1, env_int("PERSONA_GENERATE_MAX_LOADED", 2)),
            batch_size=env_int("PERSONA_GENERATE_BATCH", 1),
            cuda_graphs=env_flag("PERSONA_GENERATE_CUDA_GRAPHS") is not False,
            compile=env_flag("PERSONA_GENERATE_COMPILE") is True,
            triton_url=env_text("PERSONA_TRITON_URL"),
            triton_repository=Path(repository).expanduser() if repository else None,
            triton_component_backend=env_text("PERSONA_TRITON_COMPONENT_BACKEND"),
            triton_gpu=env_flag("PERSONA_TRITON_GPU"),
            onnx_fp16=env_flag("PERSONA_GENERATE_ONNX_FP16"),
            triton_rpc_timeout_s=env_float("PERSONA_TRITON_RPC_TIMEOUT_S", 10.0),
            triton_load_timeout_s=env_float("PERSONA_TRITON_LOAD_TIMEOUT_S", 600.0),
            max_pixels=env_int("PERSONA_GENERATE_MAX_PIXELS", cls.max_pixels),
            max_images=env_int("PERSONA_GENERATE_MAX_IMAGES", cls.max_images),
            max_megapixel_steps=env_float("PERSONA_GENERATE_MAX_MEGAPIXEL_STEPS", cls.max_megapixel_steps),
            concurrency=env_int("PERSONA_GENERATE_CONCURRENCY", cls.concurrency),
            queue=env_int("PERSONA_GENERATE_QUEUE", cls.queue),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
