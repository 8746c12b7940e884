"""Export of a diffusers Stable Diffusion folder to three ONNX graphs, checked against torch.

The output folder is everything an ONNX runtime (Triton's python models, `sampling.sample` over ONNX Runtime
sessions) needs, and nothing else:

    out_dir/
      manifest.json              inputs/outputs/dtypes, opset, fp16, scaling_factor, parity, sha256 per file
      text_encoder/model.onnx    input_ids int64 [batch, sequence] → last_hidden_state float32 [batch, sequence, dim],
                                 pooler_output float32 [batch, dim]
      unet/model.onnx            sample float32 [batch, 4, height, width], timestep float32 [batch],
      unet/model.onnx.data         encoder_hidden_states float32 [batch, sequence, dim] → out_sample float32
                                 [batch, 4, height, width]
      vae_decoder/model.onnx     latent_sample float32 [batch, 4, height, width] → sample float32 [batch, 3, H, W]
      scheduler/scheduler_config.json, tokenizer/…   copied from the model folder

Choices:

- **Exporter.** torch's legacy TorchScript exporter (`dynamo=False`), opset 17 by default: dynamic batch,
  height, width and sequence from `dynamic_axes`, no onnxscript needed (the dynamo exporter needs opset ≥ 18
  and keeps height/width fixed unless given `dynamic_shapes`).
- **Timestep** is float32 of shape [batch], one value per row of `sample` (broadcast a scheduler's scalar
  with `np.full(batch, t, np.float32)`). float32 carries both the integer timesteps of DDIM/DPM-Solver and the
  fractional ones of Euler; a tensor per row also allows rows at different timesteps.
- **Any latent size.** The UNet is traced at a latent size that is *not* a multiple of its total upsampling
  factor, so diffusers takes its `forward_upsample_size` path and every upsampler resizes to its skip
  connection's (dynamic) size; a graph traced at a multiple would bake in `scale_factor=2` and fail on the odd
  sizes the torch UNet accepts (e.g. a 520-pixel side → 65 latent pixels on SD-1.5).
- **VAE scaling is not inside the graph.** `vae_decoder` is `vae.decode` (post_quant_conv + decoder) alone:
  the caller divides latents by `manifest["scaling_factor"]` first, exactly as `sampling.sample` does for torch.
- **External data.** The UNet is always saved with its weights in `unet/model.onnx.data` (SD-1.5's is 3.4 GB
  fp32 / 1.7 GB fp16, over or near protobuf's 2 GB limit; one layout whatever the size). The text encoder and
  VAE decoder are single files unless their weights pass 1.5 GB, then saved the same way. Sessions and
  `onnx.checker` are always given the file path, so the data file is found beside it.
- **fp16** uses onnxruntime's own `convert_float_to_float16(keep_io_types=True)`: inputs and outputs stay
  float32 (a caller feeds the same arrays either way); onnxconverter-common's output does not load in
  onnxruntime. The converter is given the fp32 file's path, so shape inference works past 2 GB.
- **Parity.** Each graph runs in onnxruntime (CUDAExecutionProvider first where onnxruntime has it, else CPU)
  on a fixed random input and is compared with the fp32 torch module on the same input: `max_abs_diff` per
  component (the largest over its outputs), in the manifest and the result. Export never fails on parity;
  `check_parity(export)` raises when a diff is over its tolerance (`DEFAULT_TOLERANCE`: 1e-3 for fp32 graphs,
  whose diffs are float rounding, ~1e-6 on the tiny model; 5e-2 for fp16 graphs, whose diffs are fp16's
  ~3 significant digits accumulated through the network, relative to outputs of order 1).

The folder is built in a hidden sibling of `out_dir` and renamed into place at the end, so a watcher (a Triton
model repository) never sees half an export.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from persona.services.runtime.artifacts import file_sha256
from persona.services.runtime import devices
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

from .onnx_graphs import VERIFY_SEED, GraphSpec, graph_specs, load_modules

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# Weights above this go to an external data file (protobuf refuses messages over 2 GB; leave room for the graph).
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
MIN_OPSET, MAX_OPSET = 14, 20  # 14: scaled_dot_product_attention; 20: the legacy exporter's newest
DEFAULT_TOLERANCE = {False: 1e-3, True: 5e-2}  # fp16 flag → max abs diff allowed by check_parity
INSTALL_HINT = "pip install 'onnx>=1.16,<2' 'onnxruntime>=1.18,<2'"


@dataclass(frozen=True)
class OnnxComponent:
    """One exported graph: where it is, how close it is to torch, what it cost."""

    name: str
    path: Path  # …/<name>/model.onnx (its external data file, if any, lies beside it)
    max_abs_diff: float  # onnxruntime vs the fp32 torch module on the fixed verification input
    seconds: float  # export (+ fp16 conversion) and save
    fp16: bool
    sha256: dict[str, str] = field(default_factory=dict)  # file name in the component folder → hex digest
    external_data: str | None = None  # file name of the external weights, or None
    verify_seconds: float = 0.0


@dataclass(frozen=True)
class OnnxExport:
    out_dir: Path
    manifest_path: Path
    opset: int
    fp16: bool
    scaling_factor: float
    providers: tuple[str, ...]  # onnxruntime providers the parity check ran on
    components: dict[str, OnnxComponent]

    def max_abs_diffs(self) -> dict[str, float]:
        return {name: c.max_abs_diff for name, c in self.components.items()}


def check_parity(export: OnnxExport, tolerance: float | None = None) -> None:
    """Raises FailedPrecondition naming every component whose max abs diff to torch exceeds `tolerance`
    (default: `DEFAULT_TOLERANCE` for the export's precision)."""
    limit = DEFAULT_TOLERANCE[export.fp16] if tolerance is None else tolerance
    bad = [f"{c.name} {c.max_abs_diff:.3g}" for c in export.components.values()
           if not c.max_abs_diff <= limit]  # `not <=` also catches NaN
    if bad:
        raise FailedPrecondition(
            f"ONNX export in {export.out_dir} differs from torch by more than {limit:g} "
            f"({'fp16' if export.fp16 else 'fp32'}): {', '.join(bad)}; re-export in fp32, or pass a larger tolerance")


def export_pipeline_to_onnx(model_dir: Path, out_dir: Path, *, fp16: bool = False, opset: int = 17,
                            device: str = "cpu", overwrite: bool = False,
                            on_progress: Callable[[int, int], None] | None = None) -> OnnxExport:
    """Exports text encoder, UNet and VAE decoder of the diffusers Stable Diffusion folder `model_dir` into
    `out_dir` (layout and choices in the module docstring), checks each graph with `onnx.checker` and against
    torch in onnxruntime, and writes `manifest.json`.

    `device` is where torch traces and computes the reference ("cpu", "cuda", "cuda:1"); `overwrite` replaces an
    existing non-empty `out_dir`; `on_progress(done, total)` is called after each component (total 3).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_arguments(model_dir, out_dir, opset, overwrite)
    onnx, ort = _import_onnx()
    torch_device = devices.torch_device(device)
    # out_dir is replaced only when empty or overwrite=True (checked above).
    with staged_folder(out_dir) as staging:
        modules = load_modules(model_dir, torch_device)
        providers = _providers(ort, torch_device)
        specs = graph_specs(modules, torch_device)
        components: dict[str, OnnxComponent] = {}
        io: dict[str, dict] = {}
        for index, spec in enumerate(specs):
            components[spec.name], io[spec.name] = _export_component(
                onnx, ort, spec, staging, opset=opset, fp16=fp16, providers=providers, final_dir=out_dir)
            if on_progress is not None:
                on_progress(index + 1, len(specs))

        shutil.copytree(model_dir / "scheduler", staging / "scheduler")
        shutil.copytree(model_dir / "tokenizer", staging / "tokenizer")
        scaling_factor = float(modules["vae"].config.scaling_factor)
        manifest = _manifest(model_dir, modules, components, io, opset=opset, fp16=fp16, providers=providers,
                             scaling_factor=scaling_factor)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


    return OnnxExport(out_dir=out_dir, manifest_path=out_dir / MANIFEST, opset=opset, fp16=fp16,
                      scaling_factor=scaling_factor, providers=tuple(providers), components=components)


# --- arguments and imports ---------------------------------------------------------------------------------


def _check_arguments(model_dir: Path, out_dir: Path, opset: int, overwrite: bool) -> None:
    if not model_dir.is_dir():
        raise InvalidArgument(f"`model_dir` {model_dir} is not a folder: pass a diffusers Stable Diffusion folder")
    missing = [p for p in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                           "scheduler/scheduler_config.json", "tokenizer") if not (model_dir / p).exists()]
    if missing:
        raise InvalidArgument(f"`model_dir` {model_dir} is not a diffusers Stable Diffusion folder: "
                              f"missing {', '.join(missing)}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidArgument(f"`opset` is {opset!r}: use {MIN_OPSET} to {MAX_OPSET} (17 is the tested default)")
    if out_dir.resolve() == model_dir.resolve() or model_dir.resolve() in out_dir.resolve().parents:
        raise InvalidArgument(f"`out_dir` {out_dir} lies inside `model_dir`: pass a folder outside the model")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgument(f"`out_dir` {out_dir} is a file: pass a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FailedPrecondition(f"`out_dir` {out_dir} is not empty: pass overwrite=True to replace it")


def _import_onnx():
    try:
        import onnx
        import onnxruntime as ort
        from onnxruntime.transformers import float16  # noqa: F401  (checked here, used for fp16)
    except ImportError as error:
        raise FailedPrecondition(f"onnx/onnxruntime not installed ({error.name or error}): {INSTALL_HINT}") from error
    return onnx, ort


@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling of `out_dir` to build an export in. When the block ends normally the folder gets the
    permissions a plain mkdir/open would give (mkdtemp makes 0700, onnx's data file 0600) and replaces `out_dir`
    by a rename, so a watcher (a Triton model repository) never sees half an export; otherwise it is removed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=_ensure_parent(out_dir)))
    try:
        yield staging
        _default_permissions(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ensure_parent(out_dir: Path) -> Path:
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _default_permissions(root: Path) -> None:
    """Modes as a plain mkdir/open would give under the current umask, so a server under another user can read."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(Path(folder) / name, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~umask)


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _providers(ort, torch_device) -> list[str]:
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if torch_device.type == "cuda" and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    return providers


# --- export, conversion, save, check, parity ---------------------------------------------------------------


def _export_component(onnx, ort, spec: GraphSpec, staging: Path, *, opset: int, fp16: bool, providers: list[str],
                      final_dir: Path) -> tuple[OnnxComponent, dict]:
    import torch

    start = time.perf_counter()
    raw_dir = staging / f".raw-{spec.name}"
    raw_dir.mkdir()
    raw_path = raw_dir / MODEL_FILE
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of the legacy exporter
        # The legacy exporter writes weights past 2 GB as external files beside raw_path by itself.
        torch.onnx.export(spec.module, spec.export_inputs, str(raw_path), dynamo=False, opset_version=opset,
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes, do_constant_folding=True)
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        from onnxruntime.transformers.onnx_model import OnnxModel

        # By path: shape inference then works on graphs over 2 GB too.
        model = convert_float_to_float16(str(raw_path), keep_io_types=True)
        # The converter appends the Casts of kept float32 inputs after their consumers; onnxruntime sorts
        # on load, but onnx.checker (and TensorRT's parser) want the nodes in topological order.
        OnnxModel.graph_topological_sort(model.graph)
    else:
        model = onnx.load(str(raw_path))  # loads external weights too

    component_dir = staging / spec.name
    component_dir.mkdir()
    path = component_dir / MODEL_FILE
    external = spec.always_external or _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(model, str(path))
    io = _graph_io(onnx, model)
    del model
    shutil.rmtree(raw_dir)
    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: reads external data
    except onnx.checker.ValidationError as error:
        raise FailedPrecondition(f"the exported {spec.name} graph fails onnx.checker: {error}") from error
    seconds = time.perf_counter() - start

    start = time.perf_counter()
    diff = _parity(ort, spec, path, providers)
    verify_seconds = time.perf_counter() - start
    sha = {f.name: file_sha256(f) for f in sorted(component_dir.iterdir())}
    component = OnnxComponent(name=spec.name, path=final_dir / spec.name / MODEL_FILE, max_abs_diff=diff,
                              seconds=seconds, fp16=fp16, sha256=sha,
                              external_data=EXTERNAL_DATA_FILE if external else None,
                              verify_seconds=verify_seconds)
    return component, io


def _weight_bytes(model) -> int:
    total = 0
    for tensor in model.graph.initializer:
        total += len(tensor.raw_data) if tensor.raw_data else 4 * max(len(tensor.float_data), len(tensor.int64_data))
    return total


def _graph_io(onnx, model) -> dict:
    def describe(value) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "dtype": dtype, "shape": dims}

    return {"inputs": [describe(v) for v in model.graph.input],
            "outputs": [describe(v) for v in model.graph.output]}


def session(path: Path, providers: list[str] | None = None):
    """An onnxruntime InferenceSession on an exported graph (by path, so external data is found)."""
    _, ort = _import_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: not the "some nodes were not assigned" notes
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=providers or ["CPUExecutionProvider"])


def _parity(ort, spec: GraphSpec, path: Path, providers: list[str]) -> float:
    import numpy as np
    import torch

    with torch.no_grad():
        expected = spec.module(*spec.verify_inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    feeds = {name: tensor.detach().cpu().numpy() for name, tensor in zip(spec.input_names, spec.verify_inputs)}
    got = session(path, providers).run(spec.output_names, feeds)
    diff = 0.0
    for want, have in zip(expected, got):
        want = want.detach().float().cpu().numpy()
        if want.shape != have.shape:
            raise FailedPrecondition(f"the exported {spec.name} graph returns shape {list(have.shape)} where torch "
                                     f"returns {list(want.shape)}")
        delta = float(np.max(np.abs(want - have.astype(np.float32))))
        diff = delta if not np.isfinite(delta) else max(diff, delta)
        if not np.isfinite(diff):
            break
    return diff


def _manifest(model_dir: Path, modules: dict, components: dict[str, OnnxComponent], io: dict, *, opset: int,
              fp16: bool, providers: list[str], scaling_factor: float) -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch

    unet, vae, text_encoder = modules["unet"], modules["vae"], modules["text_encoder"]
    scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    return {
        "format": "persona-onnx-stable-diffusion",
        "version": 1,
        "source_model": str(model_dir),
        "opset": opset,
        "fp16": fp16,
        "io_dtype": "float32 (int64 input_ids); fp16 graphs cast at their edges",
        "scaling_factor": scaling_factor,
        "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        # What the model was trained at (UNet sample size × VAE factor): the default image size.
        "native_resolution": _first(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1),
        "latent_channels": unet.config.in_channels,
        "cross_attention_dim": unet.config.cross_attention_dim,
        "max_text_length": text_encoder.config.max_position_embeddings,
        "timestep": "float32 [batch]: one timestep per row of sample; broadcast a scheduler's scalar to the batch",
        "vae_decoder_input": "latents divided by scaling_factor (the graph does not scale)",
        "scheduler": "scheduler/scheduler_config.json",
        "scheduler_config": scheduler_config,
        "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
        "tokenizer": "tokenizer",
        "parity": {"providers": providers, "reference": "torch fp32", "seed": VERIFY_SEED},
        "exported_with": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                          "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                          "exporter": "torch.onnx legacy (dynamo=False)"},
        "components": {
            name: {
                "path": f"{name}/{MODEL_FILE}",
                "external_data": c.external_data,
                **io[name],
                "max_abs_diff": c.max_abs_diff,
                "export_seconds": round(c.seconds, 3),
                "sha256": c.sha256,
            }
            for name, c in components.items()
        },
    }


def _first(size) -> int:
    """sample_size is an int, or (height, width) in some configs."""
    return int(size[0] if isinstance(size, (list, tuple)) else size)
