"""`persona-cli export`: a concept's weights in the format another tool loads (diffusers, the LoRA of
diffusers/peft, kohya/A1111/ComfyUI, a Textual Inversion embedding), downloaded to a local path."""
from __future__ import annotations

from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer

from persona.v1 import train_pb2

from ..output import fail, message_dict, note, stderr_console, table
from .concepts import ConceptArgument, human_size
from .session import JsonOption, session


class Format(str, Enum):
    diffusers = "diffusers"
    lora = "lora"
    kohya = "kohya"
    ti = "ti"


FORMATS = {Format.diffusers: train_pb2.EXPORT_FORMAT_DIFFUSERS, Format.lora: train_pb2.EXPORT_FORMAT_LORA,
           Format.kohya: train_pb2.EXPORT_FORMAT_KOHYA, Format.ti: train_pb2.EXPORT_FORMAT_TI}
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
    if fmt is not Format.diffusers and out.suffix == SINGLE_FILE_SUFFIX:
        if len(files) != 1:
            fail("INVALID_ARGUMENT", f"the {fmt.value} export has {len(files)} files: give --out a folder")
        if out.is_dir():
            fail("INVALID_ARGUMENT", f"--out {out} is a folder; name a new .safetensors file or a folder")
        return [(files[0], out)]
    if out.exists() and not out.is_dir():
        what = "a folder" if fmt is Format.diffusers else f"a folder or a {SINGLE_FILE_SUFFIX} file name"
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
             "(`pipe.load_textual_inversion`), ti concepts only.")],
    out: Annotated[Path, typer.Option(
        "--out", show_default=False,
        help="Where to write. diffusers: a folder (created). lora, kohya, ti: a file name ending in "
             ".safetensors, or a folder that receives the file under its own name.")],
    as_json: JsonOption = False,
) -> None:
    """Export a READY concept to a format other tools load, download its files to --out and list them.

    Exports are cached on the server: exporting again returns the same files at once.

    Examples: `persona-cli export cpt_5b0e… --format kohya --out bruno.safetensors`,
    `persona-cli export cpt_5b0e… --format diffusers --out models/bruno/`
    """
    s = session(ctx)
    client = s.client()
    with stderr_console().status(f"exporting {concept_id} to {fmt.value}…"):
        exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(concept_id=concept_id,
                                                                             format=FORMATS[fmt]))
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
