"""Exports: a concept's weights (or a base model) converted to another format once per (format, precision) and kept
in the artifact store, and folders of them copied out for the engines (Triton, the embedded sampler, evaluation).

The one place every export format is made, for concepts and base models alike (one exporter, one cache): diffusers
(each method's weights fused into the base pipeline, fusing.py), the methods' own formats (lora, ti,
custom_diffusion, svdiff), kohya (kohya.py), onnx (onnx_export.py, plus the diffusers layout of onnx_layout.py) and
tensorrt (tensorrt_build.py). onnx starts from the diffusers export and must pass its parity check against torch;
tensorrt builds engines from the onnx export of the same precision, or refits another concept's engines of the same
base model. A concept's exports are its files (role "export:<format>"); a base model's are recorded under the work
folder by its resolved path. `ConceptExports.start_export` runs any export as an "export" job that reports each
component and can be cancelled between them; `export` runs it in the caller's thread.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Protocol

from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.runtime.model_loading import loading_models
from persona.services.runtime.job_store import JobRecord
from persona.services.runtime.jobs import JobContext, JobRunner, hold

from . import concepts as concept_store
from . import fusing
from .base_models import BaseModelSettings, ResolvedBaseModel, resolve_base_model
from .concepts import Concept, ConceptFile, ConceptStore
from .kohya import export_kohya_lora, family_for
from .onnx_export import COMPONENTS, check_parity, export_pipeline_to_onnx
from .onnx_layout import add_diffusers_layout

EXPORT_JOB_KIND = "export"
# Export format → the methods it can export (None: any).
EXPORT_FORMATS = {"diffusers": None, "lora": ("lora",), "kohya": ("lora",), "ti": ("ti",), "onnx": None,
                  "tensorrt": None, "custom_diffusion": ("custom_diffusion",), "svdiff": ("svdiff",)}
# Export formats that are a method's own saved weights as they are (method → format).
EXPORT_NATIVE = {"lora": "lora", "ti": "ti", "custom_diffusion": "custom_diffusion", "svdiff": "svdiff"}
# Formats exported (and cached) once per precision, fp16 or fp32.
PRECISION_FORMATS = ("onnx", "tensorrt")


class ExportSettings(BaseModelSettings, Protocol):
    """What exports read of the train service's settings (train/settings.py)."""

    # The device of exports, e.g. "cuda:1" or "cpu"; None: cuda when available, else cpu.
    device: str | None


@dataclass(frozen=True)
class Export:
    """A concept's files in one format; `fp16` is the precision of an onnx/tensorrt export (False otherwise)."""

    format: str
    fp16: bool
    files: list[ConceptFile] = field(default_factory=list)


@dataclass(frozen=True)
class _ExportPlan:
    """A checked export request: the concept (or base model), what to convert it to, and the role its files are kept
    under."""

    concept: Concept | None
    format: str
    fp16: bool
    role: str
    # The base model exported, when `concept` is None.
    base: ResolvedBaseModel | None = None

    @property
    def name(self) -> str:
        """What is exported, for messages: the concept id, or "base model <ref>"."""
        return self.concept.concept_id if self.concept is not None else f"base model {self.base.ref}"

    @property
    def key(self) -> str:
        """What is exported, for the export locks: the concept id, or "base:<base_model_key>"."""
        return self.concept.concept_id if self.concept is not None else f"base:{base_model_key(self.base)}"

    def source(self, format_name: str, fp16: bool) -> "_ExportPlan":
        """The export of the same model this one is converted from (onnx → diffusers, tensorrt → onnx)."""
        role = concept_store.export_role(format_name, fp16 if format_name in PRECISION_FORMATS else None)
        return _ExportPlan(self.concept, format_name, fp16, role, self.base)


class ConceptExports:
    """The exports of every tenant's concepts and of base models (ModelLibrary.exports). `get_concept(tenant, id)`
    reads a concept as the library shows it (NotFound for other tenants'); `device(ctx)` holds the device (a GPU
    export waits for a training run); `on_cuda()` says whether exports run on a GPU (fp16 by default then)."""

    def __init__(self, concepts: ConceptStore, artifacts: LocalArtifactStore, settings: ExportSettings,
                 work_dir: Path, runner: JobRunner, get_concept: Callable[[str, str], Concept],
                 device: Callable[[JobContext | None], ContextManager], on_cuda: Callable[[], bool]):
        self.concepts, self.artifacts, self.settings, self.work_dir = concepts, artifacts, settings, work_dir
        self.runner, self.get_concept, self.device, self.on_cuda = runner, get_concept, device, on_cuda
        # One conversion per (concept, export role) and one copy per target folder at a time: a second
        # caller waits and then takes the first one's result instead of converting again.
        self._keyed_locks: dict[str, threading.Lock] = {}
        self._keyed_locks_guard = threading.Lock()
        # An interrupted export restarts from scratch (or from what it had already cached).
        runner.register(EXPORT_JOB_KIND, self._run_export, resumable=True)

    def export(self, tenant_id: str, concept_id: str, format_name: str, fp16: bool | None = None) -> Export:
        """The files of `concept_id` in `format_name`, converted once and kept (a second call reuses them).

        `fp16` is the precision of an onnx/tensorrt export (None: fp16 when the export device is CUDA).
        Converts in the caller's thread; `start_export` does the same as a job.
        """
        plan = self._plan(tenant_id, concept_id, format_name, fp16)
        return Export(plan.format, plan.fp16, self._exported(plan))

    def start_export(self, tenant_id: str, concept_id: str, format_name: str, fp16: bool | None = None) -> JobRecord:
        """Checks the request as `export` does, then queues an "export" job converting it."""
        plan = self._plan(tenant_id, concept_id, format_name, fp16)
        params = {"concept_id": plan.concept.concept_id, "format": plan.format, "fp16": plan.fp16}
        return self.runner.submit(tenant_id, EXPORT_JOB_KIND, params, plan.concept.subject_id)

    def diffusers_folder(self, tenant_id: str, concept_id: str, target: Path) -> Path:
        """The concept as a full diffusers folder at `target` (the cached diffusers export, copied out once)."""
        return self._folder(self.export(tenant_id, concept_id, "diffusers").files, target)

    def weights_folder(self, tenant_id: str, concept_id: str, target: Path) -> tuple[Path, Path]:
        """(the base model's folder, the concept's own weights at `target`, copied out once as its method saved
        them): what the generate engine needs to draw a concept that has no export (fusing.IN_PROCESS_METHODS)."""
        concept = self.get_concept(tenant_id, concept_id)
        weights = concept.files_of(concept_store.WEIGHTS)
        if not weights:
            raise FailedPrecondition(f"concept {concept_id} is {concept.state} and has no weights yet: wait for its "
                                     "training job to finish")
        return Path(resolve_base_model(concept.base_model, self.settings).path), self._folder(weights, target)

    def onnx_folder(self, tenant_id: str, concept_id: str, target: Path, fp16: bool) -> Path:
        """The concept's onnx export (layout of onnx_export.py) at `target`, copied out once."""
        return self.export_folder(tenant_id, concept_id, "onnx", target, fp16)

    def export_folder(self, tenant_id: str, concept_id: str, format_name: str, target: Path,
                      fp16: bool | None = None) -> Path:
        """The concept's `format_name` export at `target` (converted first if needed), copied out once."""
        return self._folder(self.export(tenant_id, concept_id, format_name, fp16).files, target)

    def base_model_folder(self, base: ResolvedBaseModel, format_name: str, target: Path, fp16: bool) -> Path:
        """A base model's onnx or tensorrt export at `target`: converted once per (resolved folder, precision) by the
        same code as a concept's, kept in the artifact store, copied out once."""
        if format_name not in PRECISION_FORMATS:
            raise InvalidArgument(f"`format` is {format_name!r}: a base model exports to "
                                  f"{' or '.join(PRECISION_FORMATS)} (it is a diffusers folder already)")
        if format_name == "tensorrt":
            _tensorrt_builder()
        plan = _ExportPlan(None, format_name, bool(fp16), concept_store.export_role(format_name, bool(fp16)), base)
        return self._folder(self._exported(plan), target)

    # Validation of a request -----------------------------------------------------------------------

    def _plan(self, tenant_id: str, concept_id: str, format_name: str, fp16: bool | None) -> _ExportPlan:
        if format_name not in EXPORT_FORMATS:
            raise InvalidArgument(f"`format` is {format_name!r}: use one of {', '.join(EXPORT_FORMATS)}")
        if fp16 is not None and format_name not in PRECISION_FORMATS:
            raise InvalidArgument(f"`fp16` is set but format {format_name} has no precision to choose: leave "
                                  f"`fp16` unset, or export to {' or '.join(PRECISION_FORMATS)}")
        concept = self.get_concept(tenant_id, concept_id)
        weights = concept.files_of(concept_store.WEIGHTS)
        if not weights:
            raise FailedPrecondition(f"concept {concept_id} is {concept.state} and has no weights yet: "
                                     + ("wait for its training job to finish" if concept.state == "TRAINING"
                                        else "train it again"))
        if concept.method in fusing.IN_PROCESS_METHODS:
            raise FailedPrecondition(fusing.in_process_only(concept.method, concept_id))
        methods = EXPORT_FORMATS[format_name]
        if methods is not None and concept.method not in methods:
            own = [f for f, m in EXPORT_FORMATS.items() if m is not None and concept.method in m]
            raise FailedPrecondition(
                f"`format` {format_name} needs a {' or '.join(methods)} concept; {concept_id} was trained with "
                f"{concept.method}: use format diffusers or onnx" + (f" or {'/'.join(own)}" if own else ""))
        if format_name == "tensorrt":
            _tensorrt_builder()  # refused now, not minutes later in the job
        if format_name not in PRECISION_FORMATS:
            return _ExportPlan(concept, format_name, False, concept_store.export_role(format_name))
        fp16 = self.on_cuda() if fp16 is None else bool(fp16)
        return _ExportPlan(concept, format_name, fp16, concept_store.export_role(format_name, fp16))

    # The export job -----------------------------------------------------------------------------------

    def _run_export(self, ctx: JobContext) -> dict:
        params = ctx.job.params
        plan = self._plan(ctx.job.tenant_id, params["concept_id"], params["format"],
                                 params.get("fp16") if params["format"] in PRECISION_FORMATS else None)
        ctx.log(f"exporting {plan.concept.concept_id} to {_format_label(plan)}", concept_id=plan.concept.concept_id)
        files = self._exported(plan, ctx)
        return {"concept_id": plan.concept.concept_id, "format": plan.format, "fp16": plan.fp16,
                "files": [{"path": f.path, "artifact_id": f.artifact_id, "size_bytes": f.size_bytes} for f in files]}

    def _exported(self, plan: _ExportPlan, ctx: JobContext | None = None,
                  share: tuple[float, float] = (0.0, 1.0)) -> list[ConceptFile]:
        """The plan's cached files, else converts and caches them. `ctx` (a job) gets progress events, within
        `share` of the job's progress, and is checked for cancellation between steps."""
        with hold(self._keyed_lock(f"{plan.key}/{plan.role}"), ctx,
                      f"waiting for another {_format_label(plan)} export of {plan.name} to finish"):
            # Re-read inside the lock: the export this call waited for may just have stored the files.
            cached = self._cached(plan)
            if cached and all(self.artifacts.exists(f.artifact_id) for f in cached):
                if ctx is not None:
                    ctx.progress(share[1], f"{_format_label(plan)} export already cached", stage=plan.format,
                                 cached=True)
                return cached
            if ctx is not None:
                ctx.check_cancelled()
                # Said before converting: fusing adapters into a real model is a silent half minute or more.
                ctx.progress(share[0], f"converting to {_format_label(plan)}", stage=plan.format)
            with tempfile.TemporaryDirectory(dir=self._scratch()) as scratch:
                out_dir = Path(scratch) / "export"
                if plan.format == "onnx":
                    self._convert_onnx(plan, Path(scratch), out_dir, ctx, share)
                elif plan.format == "tensorrt":
                    self._convert_tensorrt(plan, Path(scratch), out_dir, ctx)
                else:
                    self._convert(plan.concept, plan.format, Path(scratch), out_dir)
                files = store_folder(self.artifacts, out_dir, plan.role)
            self._keep(plan, files)
            return files

    def _cached(self, plan: _ExportPlan) -> list[ConceptFile]:
        """The files kept for the plan's export: the concept's files of its role, or a base model's record."""
        if plan.concept is not None:
            return self.concepts.get(plan.concept.concept_id).files_of(plan.role)
        record = self._base_record(plan)
        if not record.is_file():
            return []
        return [ConceptFile(**f) for f in json.loads(record.read_text())]

    def _keep(self, plan: _ExportPlan, files: list[ConceptFile]) -> None:
        if plan.concept is not None:
            self.concepts.replace_files(plan.concept.concept_id, plan.role, files)
            return
        record = self._base_record(plan)
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f".{record.name}.partial")
        partial.write_text(json.dumps([f.__dict__ for f in files]))
        os.replace(partial, record)  # whole record or none

    def _base_record(self, plan: _ExportPlan) -> Path:
        """Where a base model's export of the plan's role is recorded (the files' artifact ids)."""
        return self.work_dir / "base-exports" / base_model_key(plan.base) / f"{plan.role.replace(':', '-')}.json"

    def _convert_onnx(self, plan: _ExportPlan, scratch: Path, out_dir: Path, ctx: JobContext | None,
                      share: tuple[float, float]) -> None:
        """diffusers export (adapters fused, TI token added) → three ONNX graphs, which must match torch."""
        if plan.concept is None:  # a base model is a diffusers folder already
            model_dir = plan.base.path
        else:
            diffusers = self._exported(plan.source("diffusers", False), ctx, share=(share[0], share[0]))
            model_dir = materialize(self.artifacts, diffusers, scratch / "diffusers")
        if ctx is not None:
            ctx.check_cancelled()
        with self.device(ctx) if self.on_cuda() else contextlib.nullcontext():
            result = export_pipeline_to_onnx(model_dir, out_dir, fp16=plan.fp16, device=self._export_device(),
                                             on_progress=_component_progress(ctx, "onnx", share))
        try:
            check_parity(result)
        except FailedPrecondition as error:
            diffs = ", ".join(f"{name} {diff:.3g}" for name, diff in result.max_abs_diffs().items())
            advice = ("export it in fp32 instead (`fp16` false, `persona-cli export … --fp32`)" if plan.fp16
                      else "this is a bug: report it with the server log")
            raise FailedPrecondition(f"the {_format_label(plan)} export of {plan.name} differs from "
                                     f"torch by more than its tolerance (max abs diff: {diffs}): {advice}") from error
        add_diffusers_layout(out_dir, model_dir)  # also a folder OnnxStableDiffusionPipeline.from_pretrained loads

    def _convert_tensorrt(self, plan: _ExportPlan, scratch: Path, out_dir: Path, ctx: JobContext | None) -> None:
        """The onnx export of the same precision (cached on the way) → TensorRT engines. Same precision because
        TensorRT 11's strongly typed networks take fp16 only from fp16 graphs (10 also takes them)."""
        builder = _tensorrt_builder()
        onnx_files = self._exported(plan.source("onnx", plan.fp16), ctx, share=(0.0, 0.5))
        onnx_dir = materialize(self.artifacts, onnx_files, scratch / "onnx")
        if ctx is not None:
            ctx.check_cancelled()
        with self.device(ctx):
            donor = self._refit_donor(plan, builder, onnx_dir, scratch)
            if donor is not None:  # a concept of the same base has engines: swap weights in, no build
                builder.refit_engines(donor, onnx_dir, out_dir,
                                      on_progress=_component_progress(ctx, "tensorrt refit", (0.5, 1.0)))
            else:
                builder.build_engines(onnx_dir, out_dir, fp16=plan.fp16,
                                      on_progress=_component_progress(ctx, "tensorrt", (0.5, 1.0)))

    def _refit_donor(self, plan: _ExportPlan, builder, onnx_dir: Path, scratch: Path) -> Path | None:
        """Refittable TensorRT engines of another of the tenant's concepts on the same base model and precision
        that can take this export's weights (`can_refit`), materialised under `scratch`; None: build instead (and
        always for a base model)."""
        if plan.concept is None:
            return None
        onnx_manifest = json.loads((onnx_dir / "manifest.json").read_text())
        role = concept_store.export_role("tensorrt", plan.fp16)
        for other in self.concepts.on_base_model(plan.concept.tenant_id, plan.concept.base_model_sha256):
            files = other.files_of(role)
            if other.concept_id == plan.concept.concept_id or not files or not all(
                    self.artifacts.exists(f.artifact_id) for f in files):
                continue
            manifest = next((f for f in files if f.path == "manifest.json"), None)
            if manifest is None:
                continue
            ok, _ = builder.can_refit(json.loads(self.artifacts.path_of(manifest.artifact_id).read_text()),
                                      onnx_manifest)
            if ok:
                return materialize(self.artifacts, files, scratch / "donor-engines")
        return None

    def _kohya_family(self, concept: Concept) -> tuple[str, str]:
        """kohya.py's family of the concept's base model and what its UNet predicts (from its scheduler)."""
        if concept.base_model_family == "tiny":
            return "tiny", "epsilon"
        prediction = resolve_base_model(concept.base_model, self.settings).prediction_type
        return family_for(concept.base_model_family, prediction), prediction

    def _export_device(self) -> str:
        return self.settings.device or ("cuda" if self.on_cuda() else "cpu")

    def _convert(self, concept: Concept, format_name: str, scratch: Path, out_dir: Path) -> None:
        weights_dir = materialize(self.artifacts, concept.files_of(concept_store.WEIGHTS), scratch / "weights")
        out_dir.mkdir(parents=True)
        if format_name != "diffusers" and format_name == EXPORT_NATIVE.get(concept.method) or (
                format_name == "diffusers" and concept.method in fusing.WHOLE_PIPELINE_METHODS):
            materialize(self.artifacts, concept.files_of(concept_store.WEIGHTS), out_dir)
        elif format_name == "kohya":
            source = weights_dir / fusing.LORA_WEIGHTS
            family, prediction = self._kohya_family(concept)
            export_kohya_lora(source, out_dir / f"{concept.token}_{concept.class_name.replace(' ', '_')}.safetensors",
                              base_model_family=family, prediction_type=prediction, resolution=concept.resolution,
                              base_model_name=concept.base_model, title=f"{concept.token} {concept.class_name}",
                              extra_metadata={"persona_base_model_sha256": concept.base_model_sha256})
        else:  # diffusers from an adapter: the base pipeline with the adapter merged in
            import torch
            from diffusers import StableDiffusionPipeline

            base = resolve_base_model(concept.base_model, self.settings)
            # fp32 whatever the base stores: the adapter merges at full precision, and exports are fp32.
            with loading_models():
                pipe = StableDiffusionPipeline.from_pretrained(base.path, dtype=torch.float32, safety_checker=None,
                                                               requires_safety_checker=False)
                fusing.fuse_into_pipeline(concept.method, pipe, weights_dir, concept.token)
            pipe.save_pretrained(out_dir, safe_serialization=True)

    # Folders ----------------------------------------------------------------------------------------------

    def _folder(self, files: list[ConceptFile], target: Path) -> Path:
        """Stored files copied out to the folder `target` once (reused while the same files are there);
        built beside it and renamed, so a reader never sees half of it."""
        with self._keyed_lock(f"folder:{target.resolve()}"):
            marker = target / ".complete"
            if marker.exists() and marker.read_text() == ",".join(f.artifact_id for f in files):
                return target
            partial = target.with_name(f".{target.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            materialize(self.artifacts, files, partial)
            (partial / ".complete").write_text(",".join(f.artifact_id for f in files))
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)  # whole folder or nothing
            return target

    def _keyed_lock(self, key: str) -> threading.Lock:
        with self._keyed_locks_guard:
            return self._keyed_locks.setdefault(key, threading.Lock())

    def _scratch(self) -> Path:
        path = self.work_dir / ".scratch"
        path.mkdir(parents=True, exist_ok=True)
        return path


def store_folder(artifacts: LocalArtifactStore, folder: Path, role: str) -> list[ConceptFile]:
    """Stores every file under `folder` (dot-files aside) as artifacts; returns them as `role` files."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest = artifacts.put_file(path)
        files.append(ConceptFile(role, path.relative_to(folder).as_posix(), digest, path.stat().st_size))
    return files


def materialize(artifacts: LocalArtifactStore, files: list[ConceptFile], folder: Path) -> Path:
    """Copies stored files back into a folder with their relative paths."""
    for file in files:
        target = folder / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifacts.path_of(file.artifact_id), target)
    return folder


def base_model_key(base: ResolvedBaseModel) -> str:
    """A base model's name in the export cache: a digest of its resolved folder."""
    return hashlib.sha256(str(Path(base.path).resolve()).encode()).hexdigest()[:16]


def _format_label(plan: _ExportPlan) -> str:
    """"onnx fp16", "tensorrt fp32", "lora"."""
    if plan.format in PRECISION_FORMATS:
        return f"{plan.format} {'fp16' if plan.fp16 else 'fp32'}"
    return plan.format


def _component_progress(ctx: JobContext | None, stage: str, share: tuple[float, float]):
    """An exporter's on_progress(done, total) as job PROGRESS events ("unet 2/3") within `share` of the job, and
    the job's cancellation point between components."""
    if ctx is None:
        return None

    def on_progress(done: int, total: int, *rest) -> None:
        # The component just finished: named by the builder when it says, else by position in COMPONENTS.
        component = rest[0] if rest and isinstance(rest[0], str) else (
            COMPONENTS[done - 1] if total == len(COMPONENTS) and 1 <= done <= total else "")
        label = " ".join(part for part in ("" if stage == "onnx" else stage, component, f"{done}/{total}") if part)
        fraction = share[0] + (share[1] - share[0]) * done / max(total, 1)
        ctx.progress(fraction, label, stage=stage, component=component, done=done, total=total)
        ctx.check_cancelled()
    return on_progress


def _tensorrt_builder():
    """The TensorRT engine builder, when this server can build engines; else FailedPrecondition saying why."""
    advice = ("export with format onnx instead (`persona-cli export CONCEPT --format onnx`): Triton's ONNX Runtime "
              "backend and onnxruntime run it on any machine")
    try:
        from . import tensorrt_build  # imported on use: it is the one export a server may lack
    except ImportError as error:
        raise FailedPrecondition(f"`format` tensorrt is not available: this server has no TensorRT engine builder "
                                 f"({error}); {advice}") from error
    ok, reason = tensorrt_build.tensorrt_available()
    if not ok:
        raise FailedPrecondition(f"`format` tensorrt needs the `tensorrt` package and a CUDA GPU on the server: "
                                 f"{reason}; {advice}")
    return tensorrt_build
