"""Sampling benchmark: persona's Triton path and in-process engine beside diffusers' StableDiffusionPipeline (and
the pipeline with a `torch.compile`d UNet), on one device in one run; plus start and hot-load times.

Every path draws the same prompts with the same seeds, scheduler (DDIM), steps, guidance and size, in batches of
`batch` images; a path's figure is the median over `repeats` timed calls after `warmup` untimed ones, in seconds
per image. Peak GPU memory: `torch.cuda.max_memory_allocated` for the in-process paths; for Triton, whose models
live in other processes, the peak of the device's used memory (sampled) above what it was before the server
started.

Hot-load: a second concept that shares the base's text encoder and VAE but has its own UNet (the base UNet with
its weights nudged, as a fused LoRA would be). On Triton it is loaded while the first stays loaded; the figure is
the wall time of `TritonEngine.load` for it, export excluded (exports are made once, at training's end or with
`persona-cli export`). In the embedded engine (full, one model) it takes over the base's modules: its weights are
copied in place into the captured graphs; the figure is `EmbeddedEngine.load`, and `recaptured` says whether
drawing it then needed a new capture (it should not).

Starts (embedded paths): seconds from nothing to the first image (engine, model load, capture or compile, one
image at the first batch size) in a fresh process, twice on one cache folder: `first` with it empty, `cached` with
what the first left (torch.compile's kernels; CUDA graphs are captured anew every start).
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from persona.services.runtime.devices import describe_device
from persona.services.runtime.errors import InvalidArgument

PATHS = ("triton", "embedded", "embedded-compile", "diffusers", "diffusers-compile")
REFERENCES = ("diffusers", "diffusers-compile")  # every row's ratio is to each of these
COMPILED = ("embedded-compile", "diffusers-compile")
PROMPT = "a photo of a sks dog on the beach, golden hour"
NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class SamplingRow:
    path: str
    batch: int
    seconds_per_image: float
    # Bytes; None on CPU. `memory_scope` says what was measured ("process" or "device").
    peak_gpu_mem_bytes: int | None
    memory_scope: str
    # diffusers' (and diffusers + compile's) s/image ÷ this path's for the same batch (> 1: this path is faster);
    # None without that row.
    speedup_vs_diffusers: float | None = None
    speedup_vs_diffusers_compile: float | None = None


@dataclass(frozen=True)
class StartRow:
    """Seconds from nothing to the first image in a fresh process: on an empty cache folder, then on what that
    left; hot-load: a second concept of the same base into the loaded engine (`recaptured`: it needed a new CUDA
    graph capture)."""

    path: str
    first_start_seconds: float | None
    cached_start_seconds: float | None
    hot_load_seconds: float | None
    recaptured: bool | None = None


@dataclass(frozen=True)
class SamplingBenchmark:
    device: str
    rows: list[SamplingRow]
    hot_load_seconds: float | None  # Triton's
    first_load_seconds: float | None  # Triton's
    triton_components: str | None
    starts: list[StartRow]


def run_sampling_benchmark(base_model_dir: Path, *, device, paths: Sequence[str] = PATHS,
                           batch_sizes: Sequence[int] = (1, 4), steps: int = 50, guidance_scale: float = 7.5,
                           resolution: int = 512, repeats: int = 3, warmup: int = 1, work_dir: Path | None = None,
                           on_stage: Callable[[str], None] = lambda _: None) -> SamplingBenchmark:
    """Times each of `paths` at each batch size; see the module docstring."""
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise InvalidArgument(f"`paths` has {', '.join(unknown) or 'nothing'}: use some of {', '.join(PATHS)}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise InvalidArgument(f"`batch_sizes` is {list(batch_sizes)}: give sizes ≥ 1")
    if steps < 1 or repeats < 1 or warmup < 0 or resolution % 8:
        raise InvalidArgument("`steps` and `repeats` must be ≥ 1, `warmup` ≥ 0, `resolution` a multiple of 8")
    own_work_dir = work_dir is None
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="persona-bench-generate-"))
    rows: list[SamplingRow] = []
    starts: list[StartRow] = []
    hot_load = first_load = components = None
    try:
        for path in paths:
            on_stage(path)
            if path == "triton":
                timings, hot_load, first_load, components = _triton(base_model_dir, device, batch_sizes, steps,
                                                                    guidance_scale, resolution, repeats, warmup,
                                                                    work_dir, on_stage)
            elif path.startswith("embedded"):
                compiled = path == "embedded-compile"
                cache = work_dir / f"cache-{path}"
                on_stage(f"{path}: first and cached start, each in a fresh process")
                first, cached = (_start_in_child(base_model_dir, device, compiled, cache, steps, guidance_scale,
                                                 resolution) for _ in range(2))
                timings, hot, recaptured = _embedded(base_model_dir, device, batch_sizes, steps, guidance_scale,
                                                     resolution, repeats, warmup, compiled, cache, work_dir)
                starts.append(StartRow(path, first, cached, hot, recaptured))
            else:
                timings = _diffusers(base_model_dir, device, batch_sizes, steps, guidance_scale, resolution, repeats,
                                     warmup, compiled=path == "diffusers-compile")
            for batch, (seconds, memory, scope) in timings.items():
                rows.append(SamplingRow(path, batch, seconds, memory, scope))
    finally:
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    reference = {(r.path, r.batch): r.seconds_per_image for r in rows if r.path in REFERENCES}

    def ratio(to: str, row: SamplingRow) -> float | None:
        seconds = reference.get((to, row.batch))
        return None if seconds is None else seconds / row.seconds_per_image

    rows = [replace(r, speedup_vs_diffusers=ratio("diffusers", r),
                    speedup_vs_diffusers_compile=ratio("diffusers-compile", r)) for r in rows]
    return SamplingBenchmark(describe_device(device), rows, hot_load, first_load, components, starts)


# --- the paths ---------------------------------------------------------------------------------------------------


def _batch(batch: int, steps: int, guidance_scale: float, resolution: int):
    from persona.services.generate.sampling import SamplingSettings

    return [SamplingSettings(prompt=PROMPT, negative_prompt=NEGATIVE, seed=index, steps=steps,
                             guidance_scale=guidance_scale, scheduler="ddim", height=resolution, width=resolution)
            for index in range(batch)]


def _time(draw: Callable[[], object], device, repeats: int, warmup: int) -> float:
    """Median seconds of `draw()` over `repeats` calls after `warmup` (CUDA synchronised)."""
    for _ in range(warmup):
        draw()
    _synchronize(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        draw()
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _embedded_engine(device, compiled: bool, cache_dir: Path):
    from persona.services.generate.domain import EmbeddedEngine
    from persona.services.generate.settings import GenerateSettings

    settings = GenerateSettings(device=str(device), max_loaded=1, cuda_graphs=True, compile=compiled)
    return EmbeddedEngine(settings, cache_dir=cache_dir)


def _embedded(folder, device, batch_sizes, steps, guidance, resolution, repeats, warmup, compiled: bool,
              cache_dir: Path, work_dir: Path) -> tuple[dict, float, bool]:
    """persona's embedded engine as the service runs it (fp16 + one CUDA graph per shape on CUDA); then the
    hot-load of a second concept into it. Returns (timings, hot-load seconds, whether drawing it recaptured)."""
    _reset_peak(device)
    engine = _embedded_engine(device, compiled, cache_dir)
    engine.load("bench-base", folder)
    timings = {}
    for batch in batch_sizes:
        settings = _batch(batch, steps, guidance, resolution)
        seconds = _time(lambda: engine.draw_batch("bench-base", settings), device, repeats, warmup)
        timings[batch] = (seconds / batch, _peak(device), "process")
    models = engine._models["bench-base"][0]
    shapes = dict(getattr(models, "_denoisers", {}))
    concept = _nudged_unet_copy(folder, work_dir / "embedded-concept")
    started = time.perf_counter()
    engine.load("bench-concept", concept)  # full (one model): copied into the base's modules in place
    engine.draw_batch("bench-concept", _batch(batch_sizes[0], 2, guidance, resolution))
    _synchronize(device)
    hot_load = time.perf_counter() - started
    reused = engine._models["bench-concept"][0] is models
    recaptured = not reused or getattr(models, "_denoisers", {}) != shapes
    engine.close()
    _free(device)
    return timings, hot_load, recaptured


def _start_in_child(folder, device, compiled: bool, cache_dir: Path, steps: int, guidance: float,
                    resolution: int) -> float:
    """Seconds to the first image in a fresh Python process (imports excluded): see the module docstring."""
    import json
    import subprocess
    import sys

    arguments = json.dumps({"folder": str(folder), "device": str(device), "compiled": compiled,
                            "cache_dir": str(cache_dir), "steps": steps, "guidance": guidance,
                            "resolution": resolution})
    done = subprocess.run([sys.executable, "-c", "import sys; from persona.bench.generate import "
                           "start_child; start_child(sys.argv[1])", arguments],
                          capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the start measurement failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return float(json.loads(lines[-1])["seconds"])


def start_child(arguments: str) -> None:
    """The child of `_start_in_child`: imports first, then the timed start; prints {"seconds": …}."""
    import json

    import torch
    from diffusers import UNet2DConditionModel  # noqa: F401 - imported before the clock starts
    from transformers import CLIPTextModel  # noqa: F401

    given = json.loads(arguments)
    device = torch.device(given["device"])
    started = time.perf_counter()
    engine = _embedded_engine(device, given["compiled"], Path(given["cache_dir"]))
    engine.load("bench-start", Path(given["folder"]))
    engine.draw_batch("bench-start", _batch(1, given["steps"], given["guidance"], given["resolution"]))
    _synchronize(device)
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


def _diffusers(folder, device, batch_sizes, steps, guidance, resolution, repeats, warmup, compiled: bool) -> dict:
    """diffusers' own pipeline, fp16 on CUDA with its default SDPA attention (+ torch.compile of the UNet)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    _reset_peak(device)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    timings = {}
    for batch in batch_sizes:
        def draw():
            return pipe([PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, num_inference_steps=steps,
                        guidance_scale=guidance, height=resolution, width=resolution,
                        generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)]).images
        # torch.compile compiles (minutes on a GPU) in the first calls: give it its own warmup.
        seconds = _time(draw, device, repeats, warmup + (2 if compiled else 0))
        timings[batch] = (seconds / batch, _peak(device), "process")
    pipe = None
    _free(device)
    return timings


def _triton(folder, device, batch_sizes, steps, guidance, resolution, repeats, warmup, work_dir: Path, on_stage):
    from persona.services.generate.settings import GenerateSettings
    from persona.services.generate.triton_engine import triton_engine_from_settings

    gpu = device.type == "cuda"
    settings = GenerateSettings(engine="triton", triton_gpu=gpu, onnx_fp16=gpu,
                                triton_repository=work_dir / "triton" / "models")
    engine = triton_engine_from_settings(settings, work_dir)
    memory = _DeviceMemory(device)
    try:
        engine.endpoint.ensure_running()
        base = _engine_folder(engine, folder, work_dir / "base", gpu, on_stage)
        on_stage("triton: loading")
        first_load = engine.load("bench-base", base).load_seconds
        timings = {}
        for batch in batch_sizes:
            settings_batch = _batch(batch, steps, guidance, resolution)
            seconds = _time(lambda: engine.draw_batch("bench-base", settings_batch), device, repeats, warmup)
            timings[batch] = (seconds / batch, memory.peak(), "device")
        # Hot-load: a concept with its own UNet while the base stays loaded (and serving).
        concept = _nudged_unet_copy(folder, work_dir / "concept")
        concept_folder = _engine_folder(engine, concept, work_dir / "concept-export", gpu, on_stage)
        on_stage("triton: hot-loading a second concept")
        hot_load = engine.load("bench-concept", concept_folder).load_seconds
        engine.draw_batch("bench-concept", _batch(1, 2, guidance, resolution))  # it serves
        return timings, hot_load, first_load, engine.repository.component_backend
    finally:
        memory.stop()
        engine.close()


def _engine_folder(engine, folder: Path, target: Path, fp16: bool, on_stage) -> Path:
    """What the engine loads: the diffusers folder itself, or its ONNX export (made here, not timed)."""
    if engine.model_format == "diffusers":
        return folder
    from persona.services.models.onnx_export import export_pipeline_to_onnx

    on_stage(f"exporting {folder.name} to ONNX")
    export_pipeline_to_onnx(folder, target, fp16=fp16, overwrite=True)
    return target


def _nudged_unet_copy(folder: Path, target: Path) -> Path:
    """The base folder with a UNet whose weights differ slightly (links for everything else)."""
    import torch
    from diffusers import UNet2DConditionModel

    from persona.services.generate.triton_repository import link_or_copy

    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("unet"), copy_function=link_or_copy)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.mul_(1.001)
    unet.save_pretrained(target / "unet")
    return target


# --- devices and memory --------------------------------------------------------------------------------------------


class _DeviceMemory:
    """Peak of the GPU's used memory above its level at creation, sampled every 10 ms (other processes count)."""

    def __init__(self, device):
        self.device = device
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None
        if device.type == "cuda":
            self._base = self._used()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, self._used() - self._base)

    def peak(self) -> int | None:
        return self._peak if self._thread is not None else None

    def stop(self) -> None:
        self._stop.set()


def _synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated(device)


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
