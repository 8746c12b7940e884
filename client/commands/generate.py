"""`persona-cli generate`: draw images of a concept (or a base model) and write them as PNG files."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from persona.v1 import generate_pb2

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from persona.services.generate.options import SETTINGS

from ..declared_options import with_declared_options
from ..output import message_dict, note, stderr_console, table
from .session import JsonOption, session




def file_name(image: generate_pb2.GeneratedImage) -> str:
    """`<prompt words>-<seed>.png`, readable in a file browser and unique within one request."""
    words = re.sub(r"[^a-z0-9]+", "-", image.prompt.lower()).strip("-")[:60] or "image"
    return f"{words}-{image.seed}.png"


SCHEDULER_LABELS = {generate_pb2.SCHEDULER_DPMPP: "DPM++ 2M", generate_pb2.SCHEDULER_DDIM: "DDIM",
                    generate_pb2.SCHEDULER_EULER: "Euler"}


def with_settings(image: generate_pb2.GeneratedImage) -> bytes:
    """The image's PNG with its settings as text chunks: `prompt`, `seed`, … and `parameters` in the A1111 form
    that A1111, ComfyUI and image browsers read ("PROMPT\nNegative prompt: …\nSteps: 25, Sampler: …")."""
    parameters = image.prompt + (f"\nNegative prompt: {image.negative_prompt}" if image.negative_prompt else "")
    parameters += (f"\nSteps: {image.steps}, Sampler: {SCHEDULER_LABELS.get(image.scheduler, 'unknown')}, "
                   f"CFG scale: {image.guidance_scale:g}, Seed: {image.seed}, Size: {image.width}x{image.height}, "
                   f"Model: {image.concept_id or image.base_model}")
    texts = {"parameters": parameters, "prompt": image.prompt, "negative_prompt": image.negative_prompt,
             "seed": str(image.seed), "steps": str(image.steps), "guidance_scale": f"{image.guidance_scale:g}",
             "scheduler": SCHEDULER_LABELS.get(image.scheduler, ""), "model": image.concept_id or image.base_model,
             "software": "persona"}
    return png_with_text(image.png, texts)


def png_with_text(png: bytes, texts: dict[str, str]) -> bytes:
    """`png` with an iTXt chunk (UTF-8 text) per entry, inserted after IHDR; the pixels are not re-encoded."""
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, then IHDR: length, type, 13 bytes of data, CRC
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        return png
    chunks = b""
    for key, value in texts.items():
        data = key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")  # no compression, no language
        chunks += struct.pack(">I", len(data)) + b"iTXt" + data + struct.pack(">I", zlib.crc32(b"iTXt" + data))
    return png[:ihdr_end] + chunks + png[ihdr_end:]


class DrawingProgress:
    """The images of one request as they arrive: a progress bar on stderr on a terminal, else (a log, a pipe, CI) a
    plain line per image, as `train` prints its steps."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        console = stderr_console()
        self.tty = console.is_terminal
        self.progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
                                 disable=not self.tty)
        self.task = self.progress.add_task("loading and drawing…", total=total)

    def __enter__(self) -> "DrawingProgress":
        self.progress.__enter__()
        if not self.tty:
            note(f"loading the model and drawing {self.total} image{'s' if self.total != 1 else ''}…")
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, image: generate_pb2.GeneratedImage, path: Path) -> None:
        self.done += 1
        self.progress.update(self.task, advance=1, description=f"drawing (last image {image.seconds:.1f} s)")
        if not self.tty:
            note(f"image {self.done}/{self.total} ({image.seconds:.1f} s): {path}")


@with_declared_options(SETTINGS, before="out")
def generate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(
        metavar="CONCEPT", show_default=False,
        help="Concept id (cpt_…) from `persona-cli concepts list`; with --base-model, omit it.")] = "",
    prompts: Annotated[Optional[list[str]], typer.Argument(
        metavar="PROMPT…", show_default=False,
        help="One or more prompts, with the concept's identifier and class: \"a sks dog on the beach\".")] = None,
    base_model: Annotated[str, typer.Option(
        metavar="ID|PATH|tiny", help="Draw with a base model instead of a concept.")] = "",
    out: Annotated[Path, typer.Option(file_okay=False, help="Folder the PNG files are written to (created).")]
    = Path("."),
    as_json: JsonOption = False,
    options: Optional[dict] = None,
) -> None:
    """Draw images of a concept and write them as PNGs, each as soon as the server finishes it.

    Every file is named after its prompt and seed, and carries its settings as PNG text (A1111's `parameters`
    too, so image browsers and ComfyUI show them); `--json` lists each image's full settings (enough to draw
    it again). Examples: `persona-cli generate cpt_5b0e… "a sks dog on the beach" -n 4 --out shots/`,
    `persona-cli generate --base-model tiny "a dog"`.
    """
    if base_model and model and not prompts:  # `generate --base-model tiny "a dog"`: the one argument is a prompt
        model, prompts = "", [model]
    request = generate_pb2.GenerateRequest(concept_id=model, base_model=base_model, prompts=prompts or [])
    for name, value in (options or {}).items():
        if value is not None:  # unset: the server's default
            setattr(request, name, generate_pb2.Scheduler.Value(f"SCHEDULER_{value.upper()}")
                    if name == "scheduler" else value)
    s = session(ctx)
    client = s.client()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with DrawingProgress(len(request.prompts) * (request.images_per_prompt or 1)) as progress:
        for image in client.generate.Generate(request):
            path = out / file_name(image)
            path.write_bytes(with_settings(image))
            written.append((image, path))
            progress.advance(image, path)
    data = [{**{k: v for k, v in message_dict(image).items() if k != "png"}, "path": str(path)}
            for image, path in written]
    s.output(as_json).emit(data, lambda: table(
        ["PATH", "SEED", "STEPS", "SECONDS"], [(str(p), i.seed, i.steps, f"{i.seconds:.1f}") for i, p in written]))
    note(f"wrote {len(written)} image{'s' if len(written) != 1 else ''} to {out}")
