"""`persona-cli mask`: choose the subject in a photo with clicks (P3S) or by naming it, and look at the result."""
from __future__ import annotations

import io
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from persona.v1 import common_pb2, mask_pb2, subjects_pb2

from ..output import fail, message_dict, note, stderr_console, table
from .session import JsonOption, SubjectArgument, session


class TextMethod(str, Enum):
    grounded_sam = "grounded-sam"
    clipseg = "clipseg"


TEXT_METHODS = {TextMethod.grounded_sam: mask_pb2.TEXT_MASK_METHOD_GROUNDED_SAM,
                TextMethod.clipseg: mask_pb2.TEXT_MASK_METHOD_CLIPSEG}
OVERLAY_COLOUR = (255, 64, 64)


def parse_point(text: str, option: str) -> mask_pb2.Point:
    try:
        x, y = (int(part) for part in text.split(","))
    except ValueError:
        fail("INVALID_ARGUMENT", f"{option} {text!r} is not X,Y in pixels, e.g. {option} 320,240")
    return mask_pb2.Point(x=x, y=y)


def overlay_png(photo: bytes, mask_png: bytes, points: list[tuple[mask_pb2.Point, bool]]) -> bytes:
    """The photo with the mask tinted and the clicks drawn (green: subject, red: not), as PNG."""
    from PIL import Image, ImageDraw

    image = Image.open(io.BytesIO(photo)).convert("RGB")
    mask = Image.open(io.BytesIO(mask_png)).convert("L").resize(image.size)
    tint = Image.new("RGB", image.size, OVERLAY_COLOUR)
    shaded = Image.composite(Image.blend(image, tint, 0.5), image, mask)
    draw = ImageDraw.Draw(shaded)
    radius = max(4, min(image.size) // 80)
    for point, positive in points:
        box = (point.x - radius, point.y - radius, point.x + radius, point.y + radius)
        draw.ellipse(box, fill=(40, 200, 40) if positive else (220, 30, 30), outline=(255, 255, 255))
    buffer = io.BytesIO()
    shaded.save(buffer, format="PNG")
    return buffer.getvalue()


def mask(
    ctx: typer.Context,
    subject_id: SubjectArgument,
    image: Annotated[Optional[int], typer.Option(
        "--image", min=0, show_default="0 with --point; every image with --text",
        help="Which photo: its index in `persona-cli subjects show SUBJECT`.")] = None,
    point: Annotated[Optional[list[str]], typer.Option(
        "--point", metavar="X,Y", help="A click on the subject, in the photo's pixels; repeat for several.")] = None,
    negative: Annotated[Optional[list[str]], typer.Option(
        "--negative", metavar="X,Y",
        help="A click on what is NOT the subject (e.g. a second, similar object); repeat for several.")] = None,
    text: Annotated[Optional[str], typer.Option(
        "--text", help="Name the subject instead of clicking, e.g. --text dog (empty: the subject's class).")] = None,
    method: Annotated[TextMethod, typer.Option(
        case_sensitive=False, help="With --text: grounded-sam (GroundingDINO boxes + SAM, as SID's metrics) or "
                                   "clipseg (lighter, coarser).")] = TextMethod.grounded_sam,
    model: Annotated[str, typer.Option(
        metavar="ID|PATH", help="With --point: the CLIP vision model (default: the server's, CLIP ViT-L/14).")] = "",
    out: Annotated[Path, typer.Option(file_okay=False, help="Folder the mask and overlay PNGs are written to.")]
    = Path("."),
    as_json: JsonOption = False,
) -> None:
    """Make a subject photo's mask — which pixels are the subject — from clicks or a name, and store it.

    With --point (P3S point supervision): CLIP patch features similar to the clicked patches, minus those like
    the --negative clicks, smoothed, thresholded (Otsu) and cut to the region under the clicks. With --text:
    GroundingDINO + SAM (or CLIPSeg) find what the text names, in one photo or every photo. Training's masked
    loss and the evaluation metrics use the stored masks.

    Writes `<subject>-<index>-mask.png` (white = subject) and `<subject>-<index>-overlay.png` (the photo with the
    mask tinted and the clicks drawn) to --out. Examples: `persona-cli mask subj_… --image 2 --point 320,240
    --negative 500,260`, `persona-cli mask subj_… --text dog`.
    """
    if bool(point) == (text is not None):
        fail("INVALID_ARGUMENT", "give either --point X,Y (with optional --negative X,Y) or --text NAME")
    if negative and not point:
        fail("INVALID_ARGUMENT", "--negative needs at least one --point on the subject")
    s = session(ctx)
    client = s.client()
    subject = client.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=subject_id))
    by_index = {i.index: i for i in subject.images}
    if image is not None and image not in by_index:
        fail("INVALID_ARGUMENT", f"--image {image}: subject {subject_id} has images "
                                 f"{', '.join(str(i) for i in sorted(by_index))}")
    positive = [parse_point(p, "--point") for p in point or []]
    negatives = [parse_point(p, "--negative") for p in negative or []]
    with stderr_console().status("loading the mask models and segmenting…"):
        if point:
            chosen = by_index[image if image is not None else 0]
            masks = [client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
                subject_id=subject_id, image_id=chosen.image_id, positive=positive, negative=negatives, model=model))]
        else:
            chosen_id = by_index[image].image_id if image is not None else ""
            masks = list(client.masks.MaskFromText(mask_pb2.MaskFromTextRequest(
                subject_id=subject_id, image_id=chosen_id, text=text or "", method=TEXT_METHODS[method])).masks)
    out.mkdir(parents=True, exist_ok=True)
    index_of = {i.image_id: i.index for i in subject.images}
    written = []
    for one in masks:
        photo = client.subjects.GetSubjectImage(subjects_pb2.GetSubjectImageRequest(
            image=common_pb2.ImageRef(subject_id=subject_id, image_id=one.image_id))).data
        stem = out / f"{subject_id}-{index_of[one.image_id]}"
        mask_path, overlay_path = stem.with_name(stem.name + "-mask.png"), stem.with_name(stem.name + "-overlay.png")
        mask_path.write_bytes(one.png)
        clicks = [(p, True) for p in one.positive] + [(p, False) for p in one.negative]
        overlay_path.write_bytes(overlay_png(photo, one.png, clicks))
        written.append((one, mask_path, overlay_path))
        if one.coverage == 0:
            note(f"image {index_of[one.image_id]}: nothing was found; try other clicks or --method clipseg")
    data = [{**{k: v for k, v in message_dict(m).items() if k != "png"}, "mask_path": str(mp),
             "overlay_path": str(op)} for m, mp, op in written]
    s.output(as_json).emit(data, lambda: table(
        ["IMAGE", "METHOD", "SUBJECT %", "MASK", "OVERLAY"],
        [(index_of[m.image_id], m.method, f"{100 * m.coverage:.1f}", str(mp), str(op)) for m, mp, op in written]))
