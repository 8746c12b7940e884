"""TensorRT engines built from persona's ONNX export, and LoRA swaps by refitting their weights in place.

One serialized engine (`model.plan`, what Triton's TensorRT backend loads) per ONNX graph, each with one dynamic
optimization profile, plus a manifest; a concept that only changes weights (a LoRA fused into the same base
UNet) is swapped in by refitting instead of a rebuild (seconds instead of minutes). Written against TensorRT
10's Python API and used only where `tensorrt` imports and torch sees a CUDA GPU (`tensorrt_available`);
everything else here is pure and tested without it. Choices:

- **Profiles** (computed in tensorrt_profiles.py). Batch is dynamic from 1: classifier-free guidance doubles the UNet's rows, so the UNet (and the
  text encoder, which may encode prompts and negative prompts in one call) take up to `2 * max_batch` rows, the
  VAE decoder `max_batch`. `opt` is one image (2 UNet rows, 1 text-encoder row as the sampler encodes each half
  on its own, 1 VAE row) at the model's native resolution. The text sequence is fixed at the manifest's
  `max_text_length` (77): the tokenizer always pads to it. Latent sides are pixel sides / `vae_scale_factor`.
- **Precision.** `fp16` sets `BuilderFlag.FP16` (TensorRT 10's weakly typed networks; I/O stay as in the ONNX).
  TensorRT 11 removed that flag (networks are strongly typed), so there `fp16` needs an fp16 ONNX export.
- **Refit.** `refittable` builds every engine with `BuilderFlag.REFIT` (full weights kept in the plan, so Triton
  loads it as is). Not `REFIT_IDENTICAL`/`STRIP_PLAN`: those assume the refit weights equal the build weights
  (weight-stripped shipping), while a LoRA swap brings different ones. REFIT can cost some speed (fewer weight
  fusions); pass refittable=False for engines that never swap. (TensorRT 11.3 lists a known issue where REFIT
  drops a GEMM bias: compare images with the ONNX path after building there.)
- **Parsing** is `OnnxParser.parse_from_file`, which finds the UNet's external `model.onnx.data` beside it;
  refit is `OnnxParserRefitter.refit_from_file` on a `Refitter`, then `refit_cuda_engine`.

Engines are tied to the TensorRT version and GPU they were built on (both recorded in the manifest). The folder
is built in a hidden sibling of `out_dir` and renamed into place, as the ONNX export is; a refitted plan is
written to a temporary file and renamed over the old one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Same package: the ONNX layout's names, and the file helpers the export already has (hash, modes, parent).
from persona.services.models.onnx_export import (
    COMPONENTS, MANIFEST, staged_folder)
from persona.services.runtime.artifacts import file_sha256
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

from .tensorrt_profiles import Profile, engine_profiles, manifest_components, resolve_sides

PLAN_FILE = "model.plan"
FORMAT = "persona-tensorrt-stable-diffusion"
ONNX_FORMAT = "persona-onnx-stable-diffusion"
MIN_TENSORRT_MAJOR = 10  # OnnxParserRefitter and the explicit-batch-only network arrived in 10.0
# ONNX manifest keys a sampler needs, copied into the engines' manifest so the folder stands alone.
SAMPLER_KEYS = ("scaling_factor", "vae_scale_factor", "latent_channels", "native_resolution", "cross_attention_dim",
                "max_text_length",
                "timestep", "vae_decoder_input", "scheduler", "scheduler_config", "prediction_type", "tokenizer",
                "io_dtype")
# What makes two exports the same graph (beside each component's inputs and outputs).
ARCHITECTURE_KEYS = ("latent_channels", "cross_attention_dim", "max_text_length", "vae_scale_factor")
INSTALL_HINT = ("pip install tensorrt on a CUDA machine (TensorRT >= 10), or run in NVIDIA's Triton image "
                "(nvcr.io/nvidia/tritonserver:<yy.mm>-py3), which has it")
ONNX_FALLBACK = "export with `--format onnx` instead (Triton serves the ONNX graphs)"



@dataclass(frozen=True)
class EngineComponent:
    name: str
    path: Path  # …/<name>/model.plan
    seconds: float  # parse + build + write
    sha256: str
    profile: Profile


@dataclass(frozen=True)
class TensorRTBuild:
    out_dir: Path
    manifest_path: Path
    tensorrt_version: str
    device: str
    fp16: bool
    refittable: bool
    profiles: dict[str, Profile]
    components: dict[str, EngineComponent] = field(default_factory=dict)


@dataclass(frozen=True)
class RefitResult:
    plan_path: Path
    onnx_path: Path
    seconds: float  # deserialize + refit + serialize + write
    weights: int  # refittable weights the new ONNX supplied


# --- availability -------------------------------------------------------------------------------------------


def tensorrt_available() -> tuple[bool, str]:
    """(True, "TensorRT x.y on <GPU>") where engines can be built here, else (False, why and how to fix)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError, RuntimeError) as error:  # OSError/RuntimeError: a wheel without its CUDA libs
        return False, f"tensorrt is not importable ({error}): {INSTALL_HINT}"
    version = str(getattr(trt, "__version__", "unknown"))
    major = version.split(".")[0]
    if major.isdigit() and int(major) < MIN_TENSORRT_MAJOR:
        return False, (f"tensorrt {version} is older than {MIN_TENSORRT_MAJOR}: "
                       f"pip install 'tensorrt>={MIN_TENSORRT_MAJOR}'")
    try:
        import torch
    except ImportError:
        return False, f"TensorRT {version} is installed but torch is not, so no CUDA GPU can be found: install torch"
    if not torch.cuda.is_available():
        return False, (f"TensorRT {version} is installed but torch sees no CUDA GPU: build engines on the GPU "
                       "that will run them")
    return True, f"TensorRT {version} on {torch.cuda.get_device_name(0)}"


def _require_tensorrt(what: str):
    ok, reason = tensorrt_available()
    if not ok:
        raise FailedPrecondition(f"cannot {what}: {reason}; or {ONNX_FALLBACK}")
    import tensorrt as trt

    return trt


# --- refit compatibility (pure) -----------------------------------------------------------------------------


def can_refit(old_manifest: dict, new_onnx_manifest: dict) -> tuple[bool, str]:
    """Whether the engines described by `old_manifest` (the manifest.json `build_engines` wrote) can take the
    weights of the ONNX export described by `new_onnx_manifest` by refit: the engines are refittable and the new
    export is the same graph (same architecture, precision, opset, and every component's inputs and outputs with
    their dtypes and shapes), as a LoRA or DreamBooth concept of the same base model is. (False, reason) else.
    A graph that differs only inside (a distilled UNet with the same I/O) passes here and fails in
    `refit_engine`, which names the weights the new ONNX lacks."""
    if not isinstance(old_manifest, dict) or old_manifest.get("format") != FORMAT:
        return False, f"the old manifest is not a {FORMAT} manifest: pass the manifest.json build_engines wrote"
    if not isinstance(new_onnx_manifest, dict) or new_onnx_manifest.get("format") != ONNX_FORMAT:
        return False, f"the new manifest is not a {ONNX_FORMAT} manifest: pass the manifest.json of an ONNX export"
    if not old_manifest.get("refittable"):
        return False, "the engines were built without refit: rebuild them with refittable=True"
    source = old_manifest.get("source_onnx", {})
    for key in ARCHITECTURE_KEYS:
        old, new = old_manifest.get(key), new_onnx_manifest.get(key)
        if old != new:
            return False, (f"{key} differs ({old!r} in the engines, {new!r} in the new export): a different base "
                           "model, so build new engines")
    for key in ("fp16", "opset"):
        old, new = source.get(key), new_onnx_manifest.get(key)
        if old != new:
            return False, (f"the ONNX {key} differs ({old!r} in the engines' source, {new!r} in the new export): "
                           f"re-export with {key}={old!r}, or build new engines")
    old_components = old_manifest.get("components", {})
    new_components = new_onnx_manifest.get("components", {})
    for name in COMPONENTS:
        if name not in old_components or name not in new_components:
            where = "the engines" if name not in old_components else "the new export"
            return False, f"{name} is missing from {where}: build new engines"
        for kind in ("inputs", "outputs"):
            old_io = _io(old_components[name].get(kind))
            new_io = _io(new_components[name].get(kind))
            if old_io != new_io:
                return False, (f"{name} {kind} differ ({_describe(old_io)} in the engines, {_describe(new_io)} in "
                               "the new export): a different base model or graph, so build new engines")
    old_sha = source.get("sha256", {})
    same = [n for n in COMPONENTS if old_sha.get(n) and old_sha[n] == new_components[n].get("sha256")]
    note = f"; {', '.join(same)} unchanged" if same else ""
    return True, (f"same graph as the engines' source (I/O, shapes, fp16={source.get('fp16')}, "
                  f"opset {source.get('opset')}){note}")


def _io(tensors) -> list[tuple]:
    return [(t.get("name"), t.get("dtype"), tuple(t.get("shape") or ())) for t in tensors or []]


def _describe(io: list[tuple]) -> str:
    return ", ".join(f"{name} {dtype} {list(shape)}" for name, dtype, shape in io) or "none"


# --- build ----------------------------------------------------------------------------------------------------


def build_engines(onnx_dir: Path, out_dir: Path, *, fp16: bool, max_batch: int = 8, min_side: int = 256,
                  max_side: int = 1024, opt_side: int | None = None, workspace_gb: float = 8,
                  refittable: bool = True, overwrite: bool = False,
                  on_progress: Callable[[int, int], None] | None = None) -> TensorRTBuild:
    """Builds `out_dir/<component>/model.plan` for text_encoder, unet and vae_decoder of the persona ONNX export
    in `onnx_dir`, with the profiles of `engine_profiles`, and writes `out_dir/manifest.json` (profiles, fp16,
    refittable, TensorRT version, GPU, source ONNX sha256) beside copies of scheduler/ and tokenizer/.

    `workspace_gb` caps TensorRT's scratch memory per layer; `overwrite` replaces a non-empty `out_dir`;
    `on_progress(done, total)` is called after each component (total 3). Raises FailedPrecondition where
    TensorRT or a CUDA GPU is missing (suggesting `--format onnx`) or a build fails, InvalidArgument on bad input.
    """
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    onnx_manifest = _read_onnx_manifest(onnx_dir)
    _check_out_dir(onnx_dir, out_dir, overwrite)
    if not isinstance(fp16, bool):
        raise InvalidArgument(f"`fp16` is {fp16!r}: pass True or False")
    if isinstance(workspace_gb, bool) or not isinstance(workspace_gb, (int, float)) or not 0 < workspace_gb < 1024:
        raise InvalidArgument(f"`workspace_gb` is {workspace_gb!r}: pass a size in GiB above 0, e.g. 8")
    profiles = engine_profiles(onnx_manifest, max_batch=max_batch, min_side=min_side, max_side=max_side,
                               opt_side=opt_side)
    resolved_opt_side = resolve_sides(onnx_manifest, min_side, max_side, opt_side)[1]
    trt = _require_tensorrt("build TensorRT engines")
    if fp16 and not hasattr(trt.BuilderFlag, "FP16") and not onnx_manifest.get("fp16"):
        raise FailedPrecondition(
            f"`fp16` is True but TensorRT {trt.__version__} has no BuilderFlag.FP16 (its networks are strongly "
            f"typed) and {onnx_dir} is an fp32 export: export the ONNX with fp16, or pass fp16=False")
    import torch

    device = torch.cuda.get_device_name(0)
    capability = ".".join(str(v) for v in torch.cuda.get_device_capability(0))
    logger = trt.Logger(trt.Logger.WARNING)
    with staged_folder(out_dir) as staging:  # out_dir replaced only when empty or overwrite (checked above)
        components: dict[str, EngineComponent] = {}
        for index, name in enumerate(COMPONENTS):
            onnx_path = _onnx_path(onnx_dir, onnx_manifest, name)
            components[name] = _build_component(
                trt, logger, name, onnx_path, staging, out_dir, profiles[name], fp16=fp16, refittable=refittable,
                workspace_bytes=int(workspace_gb * (1 << 30)))
            if on_progress is not None:
                on_progress(index + 1, len(COMPONENTS))
        for folder in ("scheduler", "tokenizer"):
            shutil.copytree(onnx_dir / folder, staging / folder)
        manifest = _engines_manifest(
            onnx_dir, onnx_manifest, components, trt_version=str(trt.__version__), device=device,
            capability=capability, fp16=fp16, refittable=refittable, max_batch=max_batch, min_side=min_side,
            max_side=max_side, opt_side=resolved_opt_side,
            workspace_gb=workspace_gb)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return TensorRTBuild(out_dir=out_dir, manifest_path=out_dir / MANIFEST, tensorrt_version=str(trt.__version__),
                         device=device, fp16=fp16, refittable=refittable, profiles=profiles, components=components)


def _read_onnx_manifest(onnx_dir: Path) -> dict:
    path = onnx_dir / MANIFEST
    if not path.is_file():
        raise InvalidArgument(f"`onnx_dir` {onnx_dir} has no {MANIFEST}: pass a folder written by the ONNX export "
                              "(persona-cli export CONCEPT --format onnx)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"`onnx_dir` {onnx_dir}: {MANIFEST} is not readable JSON ({error}): "
                              "re-export it") from error
    if not isinstance(manifest, dict) or manifest.get("format") != ONNX_FORMAT:
        raise InvalidArgument(f"`onnx_dir` {onnx_dir} is not a persona ONNX export ({MANIFEST} format is not "
                              f"{ONNX_FORMAT}): re-export it with --format onnx")
    components = manifest_components(manifest)
    missing = []
    for name in COMPONENTS:
        model = _onnx_path(onnx_dir, manifest, name)
        files = [model] + ([model.parent / components[name]["external_data"]]
                           if components[name].get("external_data") else [])
        missing += [str(f.relative_to(onnx_dir)) for f in files if not f.is_file()]
    missing += [folder for folder in ("scheduler", "tokenizer") if not (onnx_dir / folder).is_dir()]
    if missing:
        raise InvalidArgument(f"`onnx_dir` {onnx_dir} is incomplete: missing {', '.join(missing)}; re-export it")
    return manifest


def _onnx_path(onnx_dir: Path, manifest: dict, name: str) -> Path:
    return onnx_dir / manifest["components"][name].get("path", f"{name}/model.onnx")


def _check_out_dir(onnx_dir: Path, out_dir: Path, overwrite: bool) -> None:
    source, target = onnx_dir.resolve(), out_dir.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise InvalidArgument(f"`out_dir` {out_dir} overlaps `onnx_dir` {onnx_dir}: pass a separate folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgument(f"`out_dir` {out_dir} is a file: pass a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FailedPrecondition(f"`out_dir` {out_dir} is not empty: pass overwrite=True to replace it")


def _build_component(trt, logger, name: str, onnx_path: Path, staging: Path, final_dir: Path, profile: Profile,
                     *, fp16: bool, refittable: bool, workspace_bytes: int) -> EngineComponent:
    start = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit batch: no creation flags
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path: the UNet's external data is read from beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no parser detail"
        raise FailedPrecondition(f"TensorRT cannot parse the {name} graph {onnx_path}: {errors}; "
                                 f"re-export the ONNX, or {ONNX_FALLBACK}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(profile):
        raise FailedPrecondition(f"the {name} graph's inputs {sorted(inputs)} differ from its manifest's "
                                 f"{sorted(profile)}: re-export the ONNX folder")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):  # absent in TensorRT 11: the fp16 ONNX graph carries it
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    optimization_profile = builder.create_optimization_profile()
    for tensor, (smallest, opt, largest) in profile.items():
        optimization_profile.set_shape(tensor, smallest, opt, largest)
    config.add_optimization_profile(optimization_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FailedPrecondition(f"TensorRT could not build the {name} engine (its log above says why): try a "
                                 f"smaller max_batch or max_side, a larger workspace_gb, or {ONNX_FALLBACK}")
    component_dir = staging / name
    component_dir.mkdir()
    with open(component_dir / PLAN_FILE, "wb") as f:
        f.write(serialized)
    del serialized, builder, network, parser  # the UNet's plan and network hold GBs of host memory
    return EngineComponent(name=name, path=final_dir / name / PLAN_FILE, seconds=time.perf_counter() - start,
                           sha256=file_sha256(component_dir / PLAN_FILE), profile=profile)


def _engines_manifest(onnx_dir: Path, onnx_manifest: dict, components: dict[str, EngineComponent], *,
                      trt_version: str, device: str, capability: str, fp16: bool, refittable: bool, max_batch: int,
                      min_side: int, max_side: int, opt_side: int, workspace_gb: float) -> dict:
    def shapes(profile: Profile) -> dict:
        return {tensor: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                for tensor, (lo, opt, hi) in profile.items()}

    onnx_components = onnx_manifest["components"]
    return {
        "format": FORMAT,
        "version": 1,
        "tensorrt": trt_version,
        "device": device,
        "compute_capability": capability,  # a plan runs only on this GPU architecture and TensorRT version
        "fp16": fp16,
        "refittable": refittable,
        "max_batch": max_batch,  # images; the UNet takes up to 2 * max_batch rows (CFG)
        "min_side": min_side,
        "max_side": max_side,
        "opt_side": opt_side,
        "workspace_gb": workspace_gb,
        "source_onnx": {
            "path": str(onnx_dir),
            "fp16": onnx_manifest.get("fp16"),
            "opset": onnx_manifest.get("opset"),
            "sha256": {name: onnx_components[name].get("sha256", {}) for name in COMPONENTS},
        },
        **{key: onnx_manifest[key] for key in SAMPLER_KEYS if key in onnx_manifest},
        "components": {
            name: {
                "path": f"{name}/{PLAN_FILE}",
                "inputs": onnx_components[name]["inputs"],
                "outputs": onnx_components[name].get("outputs", []),
                "profile": shapes(c.profile),
                "build_seconds": round(c.seconds, 3),
                "sha256": {PLAN_FILE: c.sha256},
            }
            for name, c in components.items()
        },
    }


# --- refit ----------------------------------------------------------------------------------------------------


def refit_engine(plan_path: Path, onnx_path: Path) -> RefitResult:
    """Replaces the weights of the refittable engine `plan_path` with those of `onnx_path` (the same graph with
    other weights: a concept fused into the engine's base model; check with `can_refit`), and rewrites the plan
    atomically; a server holding the old plan picks the new one up when it loads the model again. Raises
    FailedPrecondition when TensorRT is missing, the engine was not built refittable, or the ONNX does not supply
    every weight (naming the missing ones)."""
    plan_path, onnx_path = Path(plan_path), Path(onnx_path)
    if not plan_path.is_file():
        raise InvalidArgument(f"`plan_path` {plan_path} is not a file: pass a model.plan that build_engines wrote")
    if not onnx_path.is_file():
        raise InvalidArgument(f"`onnx_path` {onnx_path} is not a file: pass the model.onnx of the new export")
    trt = _require_tensorrt("refit a TensorRT engine")
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise FailedPrecondition(f"`plan_path` {plan_path} does not load in TensorRT {trt.__version__} on this GPU "
                                 "(plans are tied to both): build the engines again here")
    if not engine.refittable:
        raise FailedPrecondition(f"`plan_path` {plan_path} was built without refit: rebuild it with refittable=True")

    refitter = trt.Refitter(engine, logger)
    onnx_refitter = trt.OnnxParserRefitter(refitter, logger)
    refitted = onnx_refitter.refit_from_file(str(onnx_path))  # by path: external data is read from beside it
    missing = sorted(refitter.get_missing_weights())
    if not refitted or missing:
        errors = "; ".join(str(onnx_refitter.get_error(i)) for i in range(onnx_refitter.num_errors))
        detail = (f"{len(missing)} weights missing ({', '.join(missing[:8])}{', …' if len(missing) > 8 else ''})"
                  if missing else "")
        why = "; ".join(part for part in (errors, detail) if part) or "refit failed"
        raise FailedPrecondition(
            f"`onnx_path` {onnx_path} cannot refit {plan_path}: {why}; it must be the same graph as the engine's "
            "source (can_refit says), else build new engines")
    if not refitter.refit_cuda_engine():
        raise FailedPrecondition(f"TensorRT refused to refit {plan_path} from {onnx_path} (its log above says why): "
                                 "build new engines instead")
    weights = len(refitter.get_all_weights())
    _write_atomically(plan_path, _serialize_refittable(trt, engine))
    return RefitResult(plan_path=plan_path, onnx_path=onnx_path, seconds=time.perf_counter() - start, weights=weights)


def _serialize_refittable(trt, engine):
    """The engine's plan, still refittable for the next swap: newer TensorRT asks for that with INCLUDE_REFIT."""
    flag = getattr(getattr(trt, "SerializationFlag", None), "INCLUDE_REFIT", None)
    if flag is not None and hasattr(engine, "serialize_with_config"):
        config = engine.create_serialization_config()
        config.set_flag(flag)
        return engine.serialize_with_config(config)
    return engine.serialize()


def _write_atomically(path: Path, data) -> None:
    """Temp file beside `path`, fsync, rename over it: a reader (Triton) sees the old plan or the new, never half."""
    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide the plan from a server under another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refit_engines(engine_dir: Path, onnx_dir: Path, out_dir: Path, *, on_progress=None) -> list[str]:
    """Engines for the ONNX export `onnx_dir` made from another concept's refittable engines of the same base
    (`engine_dir`, a build_engines folder) instead of a build: copies them into `out_dir`, refits each component
    whose ONNX weights differ from the engine's source (a LoRA concept: the UNet; a TI concept: the text
    encoder), and records the new source in the manifest. Returns the refitted components. Raises
    FailedPrecondition when `can_refit` says no (the caller then builds)."""
    engine_dir, onnx_dir, out_dir = Path(engine_dir), Path(onnx_dir), Path(out_dir)
    old = json.loads((engine_dir / MANIFEST).read_text())
    new = json.loads((onnx_dir / MANIFEST).read_text())
    ok, reason = can_refit(old, new)
    if not ok:
        raise FailedPrecondition(f"the engines in {engine_dir} cannot take {onnx_dir}'s weights: {reason}")
    with staged_folder(out_dir) as staging:
        shutil.copytree(engine_dir, staging, dirs_exist_ok=True)
        for folder in ("scheduler", "tokenizer"):  # a TI concept's tokenizer has its token
            shutil.rmtree(staging / folder, ignore_errors=True)
            shutil.copytree(onnx_dir / folder, staging / folder)
        changed = [name for name in COMPONENTS
                   if old["source_onnx"]["sha256"].get(name) != new["components"][name].get("sha256", {})]
        for index, name in enumerate(changed):
            refit_engine(staging / name / PLAN_FILE, _onnx_path(onnx_dir, new, name))
            old["components"][name]["sha256"] = {PLAN_FILE: file_sha256(staging / name / PLAN_FILE)}
            if on_progress is not None:
                on_progress(index + 1, len(changed))
        old["source_onnx"] = {**old["source_onnx"], "path": str(onnx_dir),
                              "sha256": {name: new["components"][name].get("sha256", {}) for name in COMPONENTS}}
        old["refitted"] = changed
        (staging / MANIFEST).write_text(json.dumps(old, indent=2) + "\n")
    return changed
