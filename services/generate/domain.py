"""Generate use cases: validate a request, find the model (a concept's diffusers folder or a base model), draw.

Concepts, base models and their exports (ONNX, TensorRT) come from the model library (services/models).

The engine is what holds models and runs the sampling loop: `EmbeddedEngine` in this process (torch, the
laptop default) on a model's diffusers folder; `TritonEngine` (triton_engine.py) on its ONNX export, served from a
Triton model repository. Both run the same loop (sampling.py).

A p3s concept has no export (its condition branch runs beside the UNet, models/p3s/): an engine that
`attaches_conditions` loads its base model with the condition file — the embedded engine attaches it for each
draw, the Triton engine with torch components serves it as a conditioned UNet component — and others refuse it.
A customcontrast concept (made from a CustomContrast encoder without fine-tuning) has no export either and loads
the same way, with its tokens file: the embedded engine attaches its tokens for each draw (customcontrast.py), the
Triton engine with torch components serves its UNet, text encoder and tokens as one component that runs a step per
call (triton_customcontrast.py); others refuse it.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from persona.services.runtime.budget import Budget
from persona.services.runtime.devices import cuda_available, device_name
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

from ..models.base_models import read_model_configs
from ..models.exports import base_model_key
from ..models.customcontrast.concept import TOKENS_FILE as CUSTOMCONTRAST_TOKENS, ConceptTokens, load_concept
from ..models.fusing import CUSTOMCONTRAST, IN_PROCESS_METHODS, P3S
from ..models.p3s.condition import WEIGHT_NAME as P3S_WEIGHTS, AttachedCondition, load_condition
from ..models.p3s.weights import drawing_weights
from ..models.library import ModelLibrary
from ..subjects.images import png_bytes
from . import customcontrast, sampling
from .options import BY_NAME as SETTINGS_BY_NAME, MAX_IMAGES_PER_REQUEST, MAX_PROMPT_CHARS, P3S_SETTINGS, SETTINGS
from .sampling import SamplingSettings
from .settings import GenerateSettings

# Longest a queued Generate waits for a slot (it stops waiting at once when its client goes away).
QUEUE_WAIT_S = 600.0


@dataclass(frozen=True)
class GenerateRequest:
    """Generate's fields as plain values; None = unset (the default applies). The settings after the model are
    declared in options.py."""

    prompts: tuple[str, ...]
    concept_id: str = ""
    base_model: str = ""
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str = ""
    width: int | None = None
    height: int | None = None
    images_per_prompt: int | None = None
    p3s_weight_schedule: str = ""
    p3s_weight_alpha: float | None = None
    p3s_weight_beta: float | None = None
    p3s_weight_k: float | None = None
    p3s_injection_lambda: float | None = None
    p3s_reference: int | None = None


@dataclass(frozen=True)
class P3SDrawing:
    """How one request draws a p3s concept: the photo that conditions it, the ε_t options it sets
    ({"p3s_weight_alpha": 0.0, ...}; the rest are the concept's trained ones) and λ (None: the concept's)."""

    reference: int = 0
    weights: dict = field(default_factory=dict)
    injection_lambda: float | None = None


def p3s_drawing(request: GenerateRequest, method: str) -> P3SDrawing | None:
    """The request's p3s settings for a model trained with `method` ("" for a base model): None for a model that
    is not p3s, and then setting any of them is refused by name."""
    given = {name: getattr(request, name) for name in P3S_SETTINGS if getattr(request, name) not in (None, "")}
    if method != P3S:
        if given:
            what = f"concept {request.concept_id}, a {method} concept" if method else "a base model"
            raise InvalidArgument(f"`{next(iter(given))}` is set but the request draws {what}: the p3s_* settings "
                                  "are for p3s concepts only; leave them unset")
        return None
    reference = given.pop("p3s_reference", 0)
    injection_lambda = given.pop("p3s_injection_lambda", None)
    return P3SDrawing(reference, given, injection_lambda)


@dataclass(frozen=True)
class GeneratedImage:
    prompt_index: int
    image_index: int
    settings: SamplingSettings
    concept_id: str
    base_model: str
    png: bytes
    seconds: float
    engine: str


@dataclass(frozen=True)
class LoadedModel:
    key: str
    resolution: int
    load_seconds: float


class Engine(Protocol):
    name: str
    # What `load` takes: "diffusers" (a diffusers folder), "onnx" (an onnx_export folder) or "tensorrt" (a
    # tensorrt_build folder).
    model_format: str
    # True: `load(key, base_folder, condition=...)` takes a p3s condition file (`draw_batch(..., p3s=P3SDrawing)`
    # draws with it) or a customcontrast tokens file (the embedded engine, Triton with torch components); False: p3s
    # and customcontrast concepts are refused first.
    attaches_conditions: bool

    def load(self, key: str, folder: Path) -> LoadedModel: ...

    def unload(self, key: str) -> bool: ...

    def loaded(self) -> list[LoadedModel]: ...

    def draw_batch(self, key: str, batch: Sequence[SamplingSettings]) -> list:
        """PIL images, one per entry; entries share `sampling.batch_key`."""

    def start(self) -> None:
        """Brings up what the engine draws on (nothing for the embedded engine); otherwise it starts on first use."""

    def close(self) -> None: ...


class EmbeddedEngine:
    """Models in this process (torch), the `max_loaded` most recently used kept; one batch at a time. On CUDA each
    shape's denoising step is a CUDA graph (settings.cuda_graphs); a model loaded when the engine is full takes over
    the least recently used one's modules when the architecture is the same (a concept of the same base): its
    weights are copied in place, so the captured graphs draw it with no new capture (the hot-load)."""

    name = "embedded"
    model_format = "diffusers"
    attaches_conditions = True

    def __init__(self, settings: GenerateSettings, cache_dir: Path | None = None):
        self.settings = settings
        self.cache_dir = cache_dir  # torch.compile's kernels (settings.compile), kept across restarts
        # key → (models, tokenizer, scheduler, info, folder, p3s condition or None)
        self._models: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.RLock()

    def load(self, key: str, folder: Path, condition: Path | None = None) -> LoadedModel:
        """`folder`: a diffusers folder; `condition`: a p3s_condition.safetensors trained on it (a p3s concept,
        drawn as its base model with the condition attached per draw) or a customcontrast concept's tokens file
        made on it (attached per draw too)."""
        from transformers import CLIPTokenizer

        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return replace(self._models[key][3], load_seconds=0.0)
            started = time.perf_counter()
            models = self._recycled(folder) or self._fresh(folder)
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
            attached = None
            if condition is not None and Path(condition).name == CUSTOMCONTRAST_TOKENS:
                attached = load_concept(Path(condition).parent)
            elif condition is not None:
                attached = load_condition(condition, models.unet)
            info = LoadedModel(key, read_model_configs(folder).native_resolution, time.perf_counter() - started)
            self._models[key] = (models, tokenizer, sampling.scheduler_config(folder), info, Path(folder), attached)
            while len(self._models) > self.settings.max_loaded:
                self._models.popitem(last=False)
            return info

    def _fresh(self, folder: Path):
        import torch

        device = device_name(self.settings.device)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        models = sampling.TorchModels.from_folder(folder, device=device, dtype=dtype,
                                                  cuda_graphs=self.settings.cuda_graphs)
        if self.settings.compile:
            models.compile_unet(self.cache_dir / "torchinductor" if self.cache_dir else None)
        return models

    def _recycled(self, folder: Path):
        """The least recently used model's modules with `folder`'s weights copied in, when the engine is full and
        the architectures match; else None (and nothing changed)."""
        import logging

        if len(self._models) < self.settings.max_loaded or not self._models:
            return None
        oldest = next(iter(self._models))
        models = self._models[oldest][0]
        if not all((Path(folder) / name / "config.json").is_file() for name in models.COMPONENTS):
            return None
        del self._models[oldest]  # evicted either way; its modules may be half-copied on a mismatch
        try:
            models.load_weights(folder)
        except ValueError as error:
            logging.getLogger("persona.generate").info("loading %s afresh: %s", folder, error)
            return None
        return models

    def unload(self, key: str) -> bool:
        with self._lock:
            return self._models.pop(key, None) is not None

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return [entry[3] for entry in self._models.values()]

    def start(self) -> None:
        pass  # torch in this process: nothing to bring up

    def close(self) -> None:
        with self._lock:
            self._models.clear()

    def draw_batch(self, key: str, batch: Sequence[SamplingSettings], p3s: P3SDrawing | None = None) -> list:
        with self._lock:
            models, tokenizer, scheduler_config, _, _, condition = self._models[key]
            if condition is None:
                return sampling.sample_batch(models, tokenizer, scheduler_config, batch)
            if isinstance(condition, ConceptTokens):
                return customcontrast.draw(models, tokenizer, scheduler_config, batch, condition)
            return self._draw_p3s(models, tokenizer, scheduler_config, batch, condition, p3s or P3SDrawing())

    @staticmethod
    def _draw_p3s(models, tokenizer, scheduler_config, batch, condition, p3s: P3SDrawing) -> list:
        """The shared loop with the p3s condition attached to the UNet for this batch only (so the modules stay
        the plain base model between draws, and another concept can take them over): every UNet call first runs
        the copy on (x_t, c, t) with the chosen photo's I'' and hands f_i × ε_t to the injected self-attentions
        (Eq. 6–10, models/p3s/). Both classifier-free-guidance halves get the features, each from the copy run on
        its own text (the negative prompt for the unconditional half): the reference conditions the image in both,
        so guidance contrasts the prompts, as ControlNet (whose trainable copy P3S follows) conditions both."""
        weights = drawing_weights(condition.settings, p3s.weights)
        attached = AttachedCondition(models.unet, condition, p3s.reference, weights, p3s.injection_lambda)
        try:
            # The plain loop on the eager UNet: a CUDA graph (denoise.py) or a compiled UNet would replay what
            # they captured without the copy's per-step features.
            with models.eager_unet():
                return sampling.sample_batch(models, tokenizer, scheduler_config, batch, static=False)
        finally:
            attached.remove()


class GenerateDomain:
    """Draws images of the caller's concepts (or of base models) on one engine."""

    def __init__(self, models: ModelLibrary, engine: Engine, settings: GenerateSettings, cache_dir: Path):
        self.models, self.engine, self.settings, self.cache_dir = models, engine, settings, cache_dir
        # Which tenant loaded which concept (the engine is shared; keys are concept ids or base:<ref>).
        self._owners: dict[str, str] = {}
        self._owners_lock = threading.Lock()
        # Streams drawing each concept now (`_using`), and the condition `unload` waits on for them to end.
        self._in_use: Counter[str] = Counter()
        self._use = threading.Condition()
        # Generate calls drawing at once, and a bounded queue behind them (the servicer holds a slot per call).
        self.admission = Budget(settings.concurrency, queue=settings.queue, wait_s=QUEUE_WAIT_S,
                                what="Generate calls", settings="PERSONA_GENERATE_CONCURRENCY, PERSONA_GENERATE_QUEUE")

    def check(self, request: GenerateRequest) -> None:
        """Raises InvalidArgument for what `generate` would refuse, without loading anything (other services
        check sampling settings up front before queueing work that generates)."""
        self._validated(request)
        if request.base_model:
            p3s_drawing(request, "")
        for name, side in (("width", request.width), ("height", request.height)):
            if side is not None:
                _side(name, side, 0)
        if request.width is not None and request.height is not None:
            checked = self._validated(request)
            self._check_cost(request.width, request.height, checked["steps"],
                             checked["per_prompt"] * len(checked["prompts"]))

    def _check_cost(self, width: int, height: int, steps: int, images: int) -> None:
        """Refuses a request over the settings' bounds on pixels per image and steps × megapixels."""
        s = self.settings
        if width * height > s.max_pixels:
            raise InvalidArgument(f"`width` × `height` is {width}×{height} = {width * height:,} pixels; this server "
                                  f"draws at most {s.max_pixels:,} (PERSONA_GENERATE_MAX_PIXELS): draw smaller")
        work = steps * width * height * images / 1e6
        if work > s.max_megapixel_steps:
            raise InvalidArgument(
                f"`steps` × `width` × `height` × images is {steps} × {width}×{height} × {images} = {work:.0f} "
                f"megapixel-steps; this server allows {s.max_megapixel_steps:g} per request "
                "(PERSONA_GENERATE_MAX_MEGAPIXEL_STEPS): use fewer steps, smaller or fewer images")

    def _validated(self, request: GenerateRequest) -> dict:
        prompts = _prompts(request.prompts)
        if bool(request.concept_id) == bool(request.base_model):
            raise InvalidArgument("give exactly one of `concept_id` and `base_model`: e.g. concept_id from "
                                  "`persona-cli concepts list`, or base_model tiny")
        for option in SETTINGS:  # each setting given within its declared bounds and choices
            option.check(getattr(request, option.name))
        per_prompt, steps, guidance, scheduler, seed = (
            _setting(request, name) for name in ("images_per_prompt", "steps", "guidance_scale", "scheduler", "seed"))
        if per_prompt * len(prompts) > min(self.settings.max_images, MAX_IMAGES_PER_REQUEST):
            raise InvalidArgument(f"`prompts` × `images_per_prompt` is {per_prompt * len(prompts)} images; at most "
                                  f"{min(self.settings.max_images, MAX_IMAGES_PER_REQUEST)} per request "
                                  "(PERSONA_GENERATE_MAX_IMAGES): split it")
        return dict(prompts=prompts, per_prompt=per_prompt, steps=steps, guidance=guidance, scheduler=scheduler,
                    seed=seed)

    def generate(self, tenant_id: str, request: GenerateRequest) -> Iterator[GeneratedImage]:
        """Validates everything, loads the model if needed, then yields each image as it is drawn."""
        checked = self._validated(request)
        prompts, per_prompt, steps, guidance, scheduler, seed = (
            checked[k] for k in ("prompts", "per_prompt", "steps", "guidance", "scheduler", "seed"))
        method = self.models.get(tenant_id, request.concept_id).method if request.concept_id else ""
        p3s = p3s_drawing(request, method)  # refused before anything loads
        loaded = self._load(tenant_id, request.concept_id, request.base_model)
        width = _side("width", request.width, loaded.resolution)
        height = _side("height", request.height, loaded.resolution)
        self._check_cost(width, height, steps, len(prompts) * per_prompt)

        planned = [(prompt_index, image_index, SamplingSettings(
                        prompt=prompt, negative_prompt=request.negative_prompt, seed=seed + prompt_index * per_prompt
                        + image_index, steps=steps, guidance_scale=guidance, scheduler=scheduler, height=height,
                        width=width))
                   for prompt_index, prompt in enumerate(prompts) for image_index in range(per_prompt)]

        def images() -> Iterator[GeneratedImage]:
            # While the images are drawn, UnloadConcept of this concept waits (it unloads once they are done).
            with self._using(request.concept_id):
                # `batch_size` images per engine call (one UNet pass for all); each is streamed when its batch ends.
                for start in range(0, len(planned), self.settings.batch_size):
                    chunk = planned[start:start + self.settings.batch_size]
                    started = time.perf_counter()
                    batch = [settings for _, _, settings in chunk]
                    try:
                        drawn = self._draw(loaded.key, batch, p3s)
                    except KeyError:  # unloaded before this stream began, or evicted: load it again
                        self._load(tenant_id, request.concept_id, request.base_model)
                        drawn = self._draw(loaded.key, batch, p3s)
                    seconds = (time.perf_counter() - started) / len(chunk)
                    for (prompt_index, image_index, settings), image in zip(chunk, drawn):
                        yield GeneratedImage(prompt_index, image_index, settings, request.concept_id,
                                             request.base_model, png_bytes(image), seconds, self.engine.name)
        return images()

    def _draw(self, key: str, batch: list[SamplingSettings], p3s: P3SDrawing | None) -> list:
        # Only an engine that attaches conditions takes `p3s` (_load refused p3s concepts for the others).
        return self.engine.draw_batch(key, batch, p3s=p3s) if p3s else self.engine.draw_batch(key, batch)

    @contextlib.contextmanager
    def _using(self, concept_id: str) -> Iterator[None]:
        """Counts a stream drawing `concept_id` ("" for a base model) while it lasts, for `unload` to wait on."""
        with self._use:
            self._in_use[concept_id] += 1
        try:
            yield
        finally:
            with self._use:
                self._in_use[concept_id] -= 1
                if not self._in_use[concept_id]:
                    del self._in_use[concept_id]
                self._use.notify_all()

    def load(self, tenant_id: str, concept_id: str) -> LoadedModel:
        if not concept_id:
            raise InvalidArgument("`concept_id` is empty: pass an id from `persona-cli concepts list`")
        return self._load(tenant_id, concept_id, "")

    def unload(self, tenant_id: str, concept_id: str) -> None:
        self.models.get(tenant_id, concept_id)  # NOT_FOUND for another tenant's concept
        with self._use:
            # After the streams drawing it end (none starts meanwhile): a draw never loses its model mid-way.
            self._use.wait_for(lambda: not self._in_use.get(concept_id))
            with self._owners_lock:
                self._owners.pop(concept_id, None)
            if not self.engine.unload(concept_id):
                raise NotFound(f"concept {concept_id} is not loaded: see ListLoadedConcepts")

    def loaded(self, tenant_id: str) -> list[LoadedModel]:
        with self._owners_lock:
            mine = {key for key, owner in self._owners.items() if owner == tenant_id}
        return [m for m in self.engine.loaded() if m.key in mine]

    def _load(self, tenant_id: str, concept_id: str, base_model: str) -> LoadedModel:
        if concept_id:
            concept = self.models.get(tenant_id, concept_id)
            if not concept.files_of("weights"):
                raise FailedPrecondition(f"concept {concept_id} is {concept.state} and has no weights yet: wait for "
                                         f"job {concept.job_id} (`persona-cli jobs watch {concept.job_id}`)")
            if concept.method in IN_PROCESS_METHODS:
                loaded = self._load_with_condition(tenant_id, concept)
            elif self.engine.model_format in ("onnx", "tensorrt"):
                fmt = self.engine.model_format
                loaded = self.engine.load(concept_id, self.models.exports.export_folder(
                    tenant_id, concept_id, fmt, self.cache_dir / fmt / concept_id, fp16=self._onnx_fp16()))
            else:
                loaded = self.engine.load(concept_id, self.models.exports.diffusers_folder(
                    tenant_id, concept_id, self.cache_dir / concept_id))
            with self._owners_lock:
                self._owners[concept_id] = tenant_id
            return replace(loaded, resolution=concept.resolution or loaded.resolution)
        base = self.models.resolve_base(base_model)
        if self.engine.model_format == "diffusers":
            folder = base.path
        else:  # the base model's ONNX export (or TensorRT engines), made once per folder and precision
            fmt, fp16 = self.engine.model_format, self._onnx_fp16()
            target = self.cache_dir / f"base-{fmt}-{'fp16' if fp16 else 'fp32'}" / base_model_key(base)
            folder = self.models.exports.base_model_folder(base, fmt, target, fp16)
        return self.engine.load(f"base:{base.path}", folder)

    def _load_with_condition(self, tenant_id: str, concept) -> LoadedModel:
        """A p3s or customcontrast concept: its base model with the concept's file attached (it has no export)."""
        if not self.engine.attaches_conditions:
            what = ("was made with customcontrast, whose tokens feed the UNet's cross-attention at every step"
                    if concept.method == CUSTOMCONTRAST else
                    f"was trained with {concept.method}, whose condition branch runs beside the UNet at every step")
            raise FailedPrecondition(
                f"concept {concept.concept_id} {what}, which this server's {self.engine.name} engine cannot run (ONNX "
                "and TensorRT components cannot hold it): draw it with PERSONA_GENERATE_ENGINE=embedded, or on Triton "
                "with torch components (PERSONA_TRITON_COMPONENT_BACKEND=torch)")
        base, weights = self.models.exports.weights_folder(tenant_id, concept.concept_id,
                                                           self.cache_dir / "p3s" / concept.concept_id)
        own = CUSTOMCONTRAST_TOKENS if concept.method == CUSTOMCONTRAST else P3S_WEIGHTS
        return self.engine.load(concept.concept_id, base, condition=weights / own)

    def _onnx_fp16(self) -> bool:
        """fp16 graphs where the engine's GPU can run them; fp32 on CPU (fp16 there is slow, not smaller)."""
        if self.settings.onnx_fp16 is not None:
            return self.settings.onnx_fp16
        return cuda_available()


def _prompts(prompts) -> list[str]:
    cleaned = [" ".join(p.split()) for p in prompts]
    if not cleaned or not all(cleaned):
        raise InvalidArgument("`prompts` is empty or has an empty prompt: e.g. 'a sks dog on the beach'")
    for index, prompt in enumerate(cleaned):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"`prompts[{index}]` is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    return cleaned


def _setting(request: GenerateRequest, name: str):
    """The request's value of a declared setting, or its default when unset (None, or "" for a text)."""
    value = getattr(request, name)
    return SETTINGS_BY_NAME[name].default if value is None or value == "" else value


def _side(name: str, value: int | None, default: int) -> int:
    value = default if value is None else value
    if not 8 <= value <= sampling.MAX_SIDE or value % 8:
        native = f"the model's {default}" if default else "the model's native size"
        raise InvalidArgument(f"`{name}` is {value}: use a multiple of 8 from 8 to {sampling.MAX_SIDE} "
                              f"(default: {native})")
    return value
