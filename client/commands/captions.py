"""`persona-cli caption` and `persona-cli captions show|set`: SID training descriptions of a subject's photos."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from persona.v1 import caption_pb2, common_pb2, subjects_pb2

from ..output import fail, message_dict, note, table
from ..sdk import PersonaClient
from .jobs import follow_job, raise_unless_succeeded
from .session import JsonOption, SubjectArgument, session

app = typer.Typer(help="Show and edit the captions (training descriptions) of a subject's photos.",
                  no_args_is_help=True, rich_markup_mode="markdown")


class Case(str, Enum):
    """The description cases of SID Tab. 1."""

    class_only = "1"
    with_objects = "2"
    sid = "3"
    with_subject = "4"


class Mode(str, Enum):
    object = "object"
    style = "style"
    expression = "expression"


CASES = {Case.class_only: caption_pb2.DESCRIPTION_CASE_1, Case.with_objects: caption_pb2.DESCRIPTION_CASE_2,
         Case.sid: caption_pb2.DESCRIPTION_CASE_3, Case.with_subject: caption_pb2.DESCRIPTION_CASE_4}
MODES = {Mode.object: caption_pb2.CAPTION_MODE_OBJECT, Mode.style: caption_pb2.CAPTION_MODE_STYLE,
         Mode.expression: caption_pb2.CAPTION_MODE_EXPRESSION}



def get_subject(client: PersonaClient, subject_id: str) -> subjects_pb2.Subject:
    return client.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=subject_id))


def resolve_image(subject: subjects_pb2.Subject, image: str) -> str:
    """An image id, given the id itself or the image's index in the subject (as `subjects show` lists)."""
    if image.isdigit():
        index = int(image)
        if index >= len(subject.images):
            fail("INVALID_ARGUMENT", f"image index {index} is out of range: {subject.subject_id} has "
                                     f"{len(subject.images)} photos (indexes 0–{len(subject.images) - 1})")
        return subject.images[index].image_id
    return image


def caption_rows(subject: subjects_pb2.Subject, captions: list[caption_pb2.Caption], only: set[str] | None = None):
    """One row per photo of the subject (index order): its caption, its failure, or nothing yet."""
    by_image = {c.image.image_id: c for c in captions}
    rows = []
    for image in subject.images:
        if only is not None and image.image_id not in only:
            continue
        caption = by_image.get(image.image_id)
        if caption is None:
            rows.append((image.index, image.image_id, "", "(no caption yet)"))
        else:
            source = caption_pb2.CaptionSource.Name(caption.source).removeprefix("CAPTION_SOURCE_").lower()
            text = caption.text if not caption.failure else f"FAILED: {caption.failure}"
            rows.append((image.index, image.image_id, source, text))
    return rows


def render_captions(rows):
    return lambda: table(["INDEX", "IMAGE_ID", "SOURCE", "CAPTION"], rows)


def list_captions(client: PersonaClient, subject_id: str) -> list[caption_pb2.Caption]:
    return list(client.captions.ListCaptions(caption_pb2.ListCaptionsRequest(subject_id=subject_id)).captions)


def caption(
    ctx: typer.Context,
    subject_id: SubjectArgument,
    case: Annotated[Case, typer.Option(
        "--case", help="SID description case: 1 class only (no VLM needed), 2 + other objects' names, "
                       "3 + their details (SID), 4 + the subject's details (ablations).")] = Case.sid,
    mode: Annotated[Mode, typer.Option(
        help="object; style for an art style (describes content, never style); expression for faces.")] = Mode.object,
    images: Annotated[Optional[list[str]], typer.Option(
        "--image", help="Caption only this image (id or index); repeat for several. Default: all photos.",
        show_default=False)] = None,
    overwrite_user: Annotated[bool, typer.Option(
        "--overwrite-user", help="Also replace captions written with `captions set`.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Caption a subject's photos with SID descriptions, following the job on stderr, then print them.

    Cases 2–4 call the vision-language model set by PERSONA_VLM_BASE_URL, PERSONA_VLM_MODEL and
    PERSONA_VLM_API_KEY on the server (in-process without --server).

    Example: `persona-cli caption subj_51d2… --case 3 --image 0 --image 2`
    """
    s = session(ctx)
    client = s.client()
    subject = get_subject(client, subject_id)
    image_ids = [resolve_image(subject, image) for image in images or []]
    job = client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(
        subject_id=subject.subject_id, case=CASES[case], mode=MODES[mode], image_ids=image_ids,
        overwrite_user_captions=overwrite_user))
    count = len(image_ids) or len(subject.images)
    note(f"captioning {count} photo{'s' if count != 1 else ''} of {subject.subject_id} "
         f"(case {case.value}, {mode.value}): job {job.job_id}")
    job = follow_job(client, job, f"case {case.value}", embedded=s.embedded)
    raise_unless_succeeded(job, s.error_log)
    captions = list_captions(client, subject.subject_id)
    only = set(image_ids) if image_ids else None
    shown = [c for c in captions if only is None or c.image.image_id in only]
    s.output(as_json).emit({"job": message_dict(job), "captions": [message_dict(c) for c in shown]},
                           render_captions(caption_rows(subject, captions, only)))


@app.command("show")
def show(ctx: typer.Context, subject_id: SubjectArgument, as_json: JsonOption = False) -> None:
    """Show the caption of each of a subject's photos, in index order.

    Example: `persona-cli captions show subj_51d2…`
    """
    s = session(ctx)
    client = s.client()
    subject = get_subject(client, subject_id)
    captions = list_captions(client, subject.subject_id)
    s.output(as_json).emit({"captions": [message_dict(c) for c in captions]},
                           render_captions(caption_rows(subject, captions)))


@app.command("set")
def set_(
    ctx: typer.Context,
    subject_id: SubjectArgument,
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="Image id, or its index as `subjects show` lists it.",
                                         show_default=False)],
    text: Annotated[str, typer.Argument(help="The caption; it must contain the subject's token (e.g. sks).",
                                        show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Write one photo's caption yourself (it is kept by later `caption` runs unless --overwrite-user).

    Example: `persona-cli captions set subj_51d2… 0 "a photo of a sks dog on a red sofa"`
    """
    s = session(ctx)
    client = s.client()
    subject = get_subject(client, subject_id)
    image_id = resolve_image(subject, image)
    written = client.captions.SetCaption(caption_pb2.SetCaptionRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=image_id), text=text))
    s.output(as_json).emit(message_dict(written), render_captions(caption_rows(subject, [written], {image_id})))
