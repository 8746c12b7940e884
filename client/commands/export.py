"""`persona-cli export`: a concept's weights in the format another tool loads (diffusers, the LoRA of
diffusers/peft, kohya/A1111/ComfyUI, a Textual Inversion embedding, ONNX, TensorRT engines), downloaded to a
local path."""
from __future__ import annotations

from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Annotated, Optional

import typer

from persona.v1 import train_pb2

from ..jobwatch import JobProgress, follow_or_cancel
from ..output import fail, message_dict, note, stderr_console, table
from .concepts import ConceptArgument, human_size
from .jobs import raise_unless_succeeded
from .session import JsonOption, session


class Format(str, Enum):
    diffusers = "diffusers"
    lora = "lora"
    kohya = "kohya"
    ti = "ti"
    onnx = "onnx"
    tensorrt = "tensorrt"
    custom_diffusion = "custom_diffusion"
    svdiff = "svdiff"


FORMATS = {Format.diffusers: train_pb2.EXPORT_FORMAT_DIFFUSERS, Format.lora: train_pb2.EXPORT_FORMAT_LORA,
           Format.kohya: train_pb2.EXPORT_FORMAT_KOHYA, Format.ti: train_pb2.EXPORT_FORMAT_TI,
           Format.onnx: train_pb2.EXPORT_FORMAT_ONNX, Format.tensorrt: train_pb2.EXPORT_FORMAT_TENSORRT,
           Format.custom_diffusion: train_pb2.EXPORT_FORMAT_CUSTOM_DIFFUSION,
           Format.svdiff: train_pb2.EXPORT_FORMAT_SVDIFF}
# Exported as a folder of files; the others are one .safetensors file.
# How to load these exports in diffusers 0.42, printed by --help; tests run exactly these lines (OUT: --out).
CUSTOM_DIFFUSION_LOADING = (
    'pipe.unet.load_attn_procs(OUT, weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe); '
    'pipe.load_textual_inversion(OUT, weight_name="learned_embeds.safetensors")')
ONNX_LOADING = 'OnnxStableDiffusionPipeline.from_pretrained(OUT, provider="CPUExecutionProvider")'
FOLDER_FORMATS = (Format.diffusers, Format.onnx, Format.tensorrt, Format.custom_diffusion)
# Converted by a job with progress (minutes on real models); the others in one call.
JOB_FORMATS = (Format.onnx, Format.tensorrt)
SINGLE_FILE_SUFFIX = ".safetensors"


def safe_relative(path: str) -> Path:
    """A server-given file path as a relative path that stays inside the output folder."""
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or any(p in ("..", "") for p in parts):
        fail("DATA_LOSS", f"the server returned an unsafe file path {path!r}")
    return Path(*parts)


def destinations(export: train_pb2.ConceptExport, fmt: Format, out: Path) -> list[tuple[train_pb2.ConceptFile, Path]]:
    """Where each exported file goes: inside the folder `out`, or at `out` itself for a single-file format
    when `out` names a .safetensors file."""
    files = list(export.files)
    if not files:
        fail("DATA_LOSS", f"the {fmt.value} export of {export.concept_id} has no files")
    if fmt not in FOLDER_FORMATS and out.suffix == SINGLE_FILE_SUFFIX:
        if len(files) != 1:
            fail("INVALID_ARGUMENT", f"the {fmt.value} export has {len(files)} files: give --out a folder")
        if out.is_dir():
            fail("INVALID_ARGUMENT", f"--out {out} is a folder; name a new .safetensors file or a folder")
        return [(files[0], out)]
    if out.exists() and not out.is_dir():
        what = "a folder" if fmt in FOLDER_FORMATS else f"a folder or a {SINGLE_FILE_SUFFIX} file name"
        fail("INVALID_ARGUMENT", f"--out {out} exists and is not a folder: give {what}")
    return [(f, out / safe_relative(f.path)) for f in files]


def export(
    ctx: typer.Context,
    concept_id: ConceptArgument,
    fmt: Annotated[Format, typer.Option(
        "--format", show_default=False, case_sensitive=False,
        help="diffusers: a full model folder (`StableDiffusionPipeline.from_pretrained(OUT)`), any method, "
             "adapters fused in. lora: LoRA safetensors in the diffusers/peft layout (`pipe.load_lora_weights`), "
             "lora concepts only. kohya: the same LoRA with kohya sd-scripts keys, for A1111, ComfyUI and "
             "sd-scripts; lora concepts only. ti: a Textual Inversion embedding "
             "(`pipe.load_textual_inversion`), ti concepts only. onnx: text encoder, UNet and VAE decoder as "
             "ONNX graphs plus manifest.json, scheduler and tokenizer, for Triton's ONNX Runtime backend or "
             "onnxruntime on any machine; any method (LoRA fused, TI token added), checked against torch; the "
             f"folder also loads in diffusers: `{ONNX_LOADING}` (model_index.json, a VAE encoder, and "
             "text_encoder/ taking diffusers' int32 input_ids; persona's int64 graph is text_encoder_int64/). "
             "tensorrt: TensorRT engines built from that ONNX, for NVIDIA GPUs; needs TensorRT and a CUDA GPU "
             "on the server, and the engines run only on that GPU model and TensorRT version. custom_diffusion: "
             "pytorch_custom_diffusion_weights.bin and the token's learned_embeds.safetensors; load them into "
             f"the base model's StableDiffusionPipeline `pipe` with `{CUSTOM_DIFFUSION_LOADING}` (diffusers "
             "0.42 installs the processors only when given `_pipeline=pipe`; without it nothing changes, "
             "silently); custom_diffusion concepts only. "
             "svdiff: spectral_shifts.safetensors, SVDiff's singular-value shifts of every UNet weight and the "
             "token's embedding (about 1 MB for SD-1.5); svdiff concepts only. p3s concepts have no export: "
             "their condition branch runs beside the UNet at every step, which stock diffusers, kohya tools, "
             "ONNX and TensorRT cannot load; `persona-cli generate` draws them in-process.")],
    out: Annotated[Path, typer.Option(
        "--out", show_default=False,
        help="Where to write. diffusers, onnx, tensorrt, custom_diffusion: a folder (created). lora, kohya, ti, "
             "svdiff: a file name ending in .safetensors, or a folder that receives the file under its own name.")],
    fp16: Annotated[Optional[bool], typer.Option(
        "--fp16/--fp32", show_default="the server decides: fp16 when it exports on a CUDA GPU, else fp32",
        help="onnx and tensorrt only: fp16 graphs/engines (half the size, faster on GPUs; slow to make on a "
             "CPU-only server) or fp32. Each precision is exported and cached on its own.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Export a READY concept to a format other tools load, download its files to --out and list them.

    Exports are cached on the server: exporting again returns the same files at once. onnx and tensorrt run
    as an export job with a progress bar per component; Ctrl-C cancels it.

    Examples: `persona-cli export cpt_5b0e… --format kohya --out bruno.safetensors`,
    `persona-cli export cpt_5b0e… --format diffusers --out models/bruno/`,
    `persona-cli export cpt_5b0e… --format onnx --fp16 --out models/bruno-onnx/`
    """
    if fp16 is not None and fmt not in JOB_FORMATS:
        fail("INVALID_ARGUMENT", f"--fp16/--fp32 choose the precision of onnx and tensorrt exports; {fmt.value} "
                                 f"has none: drop the option, or pass --format onnx or tensorrt")
    s = session(ctx)
    client = s.client()
    request = train_pb2.ExportConceptRequest(concept_id=concept_id, format=FORMATS[fmt], fp16=fp16)
    if fmt in JOB_FORMATS:
        job = client.train.StartExport(request)
        note(f"exporting {concept_id} to {fmt.value} ({'fp16' if job.params['fp16'] else 'fp32'}): job {job.job_id}")
        job = follow_or_cancel(client, job, JobProgress(), f"cancelling {job.job_id}: it stops after the "
                                                           "component in progress…")
        raise_unless_succeeded(job, s.error_log)
        request.fp16 = job.params["fp16"]  # the precision the server chose: its export is cached now
    with stderr_console().status(f"exporting {concept_id} to {fmt.value}…"):
        exported = client.train.ExportConcept(request)
    plan = destinations(exported, fmt, out)
    written = []
    with stderr_console().status("downloading…") as status:
        for i, (file, path) in enumerate(plan, 1):
            status.update(f"downloading {file.path} ({human_size(file.size_bytes)}, {i}/{len(plan)})…")
            size = client.read_concept_file(exported.concept_id or concept_id, file.artifact_id, path)
            written.append((file, path, size))

    data = {"export": message_dict(exported),
            "written": [{"path": str(path), "file": file.path, "artifact_id": file.artifact_id, "size_bytes": size}
                        for file, path, size in written]}
    s.output(as_json).emit(data, lambda: table(["PATH", "SIZE"],
                                               [(str(path), human_size(size)) for _, path, size in written]))
    total = sum(size for _, _, size in written)
    note(f"wrote {len(written)} file{'s' if len(written) != 1 else ''} ({human_size(total)}) of the "
         f"{fmt.value} export of {concept_id} to {out}")
