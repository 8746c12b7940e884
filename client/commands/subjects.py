"""`persona-cli subjects add|list|show|rm`: upload a subject's photos once, then refer to it by id."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import grpc
import typer

from persona.v1 import subjects_pb2

from ..output import fail, fields, message_dict, note, stderr_console, table
from ..sdk import PersonaClientError
from .session import JsonOption, SubjectArgument, session

app = typer.Typer(
    help="Upload, list, inspect and delete subjects (the 3–7 photos of one dog, backpack, face or style).",
    no_args_is_help=True, rich_markup_mode="markdown")

# What a folder given to `subjects add` contributes; a file named on its own is always sent (the
# server decides whether it is an image).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".mpo", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif")


def when(timestamp) -> str:
    """A proto Timestamp in local time, to the minute."""
    if not timestamp.seconds and not timestamp.nanos:
        return ""
    return timestamp.ToDatetime().astimezone().strftime("%Y-%m-%d %H:%M")


def photo_paths(paths: list[Path]) -> list[Path]:
    """The files named, and the images inside the folders named (sorted by name), in argument order."""
    photos: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                fail("INVALID_ARGUMENT", f"folder {path} has no {', '.join(IMAGE_SUFFIXES)} images")
            photos.extend(found)
        elif path.is_file():
            photos.append(path)
        elif path.exists():
            fail("INVALID_ARGUMENT", f"{path} is neither a file nor a folder of images")
        else:
            fail("INVALID_ARGUMENT", f"{path} does not exist: pass image files or folders of images")
    return photos


def read_uploads(photos: list[Path]) -> list[subjects_pb2.ImageUpload]:
    uploads = []
    for photo in photos:
        try:
            data = photo.read_bytes()
        except OSError as e:
            fail("INVALID_ARGUMENT", f"cannot read {photo}: {e.strerror or e}")
        uploads.append(subjects_pb2.ImageUpload(data=data, filename=photo.name))
    return uploads


def name_the_file(error: PersonaClientError, photos: list[Path]) -> PersonaClientError:
    """The server names a rejected photo by position (`images[2]`); add the file it came from."""
    match = re.search(r"`images\[(\d+)\]", error.message)
    if match and int(match.group(1)) < len(photos):
        return PersonaClientError(error.code, f"{error.message} ({photos[int(match.group(1))]})")
    return error


def render_subject(subject: subjects_pb2.Subject):
    def render() -> str:
        about = fields([
            ("subject", subject.subject_id), ("class", subject.class_name), ("token", subject.token),
            ("name", subject.display_name), ("created", when(subject.created_at)),
            ("prompt", f"a {subject.token} {subject.class_name}"),
        ])
        images = table(
            ["INDEX", "IMAGE_ID", "FILE", "SIZE", "TYPE"],
            [(i.index, i.image_id, i.filename, f"{i.width}x{i.height}", i.media_type) for i in subject.images],
        )
        return f"{about}\n\n{images}"
    return render


@app.command("add")
def add(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(
        metavar="PHOTOS", show_default=False,
        help="Image files, or folders whose photos (.jpg/.jpeg/.mpo, .png, .webp, .gif, .bmp, .tif/.tiff, "
             ".heic/.heif) are taken sorted by name. Multi-frame files give their first frame; EXIF orientation is "
             "applied; CMYK, 16-bit, paletted and transparent images become RGB (transparency on white). HEIC "
             "needs the server's optional extra: pip install 'persona[heic]'.")],
    class_name: Annotated[str, typer.Option(
        "--class", help="Class noun of the subject as prompts name it: dog, backpack, stuffed animal; "
                        "painting or cartoon for a style.", show_default=False)],
    token: Annotated[str, typer.Option(
        help="Identifier the concept learns, the [v] of the papers: one word of letters and digits.")] = "sks",
    name: Annotated[Optional[str], typer.Option(help="Display name for people, e.g. \"Bruno on holiday\".")] = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a subject's photos (3–7 work best) and print the subject they make.

    Every photo is checked before anything is stored; nothing is stored if one is rejected.

    Example: `persona-cli subjects add photos/bruno/ --class dog --token sks --name Bruno`
    """
    s = session(ctx)
    photos = photo_paths(paths)
    uploads = read_uploads(photos)
    request = subjects_pb2.CreateSubjectRequest(class_name=class_name, token=token, display_name=name or "",
                                                images=uploads)
    size_mb = sum(len(u.data) for u in uploads) / 1e6
    with stderr_console().status(f"uploading {len(uploads)} photos ({size_mb:.1f} MB)…"):
        try:
            subject = s.client().subjects.CreateSubject(request)
        except grpc.RpcError as e:
            raise name_the_file(PersonaClientError.from_rpc_error(e), photos) from None
    s.output(as_json).emit(message_dict(subject), render_subject(subject))
    photos_word = "photo" if len(subject.images) == 1 else "photos"
    note(f"created {subject.subject_id} with {len(subject.images)} {photos_word}; "
         f"caption them with `persona-cli caption {subject.subject_id}`")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List your subjects, newest first.

    Example: `persona-cli subjects list --json`
    """
    s = session(ctx)
    subjects = list(s.client().all_subjects())

    def render() -> str:
        return table(
            ["SUBJECT_ID", "CLASS", "TOKEN", "IMAGES", "NAME", "CREATED"],
            [(x.subject_id, x.class_name, x.token, len(x.images), x.display_name, when(x.created_at))
             for x in subjects],
        )

    s.output(as_json).emit({"subjects": [message_dict(x) for x in subjects]}, render)
    if not subjects:
        note("no subjects yet: add one with `persona-cli subjects add PHOTOS… --class dog`")


@app.command("show")
def show(
    ctx: typer.Context,
    subject_id: SubjectArgument,
    as_json: JsonOption = False,
) -> None:
    """Show a subject and its photos (index, id, file, size).

    Example: `persona-cli subjects show subj_51d2…`
    """
    s = session(ctx)
    subject = s.client().subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=subject_id))
    s.output(as_json).emit(message_dict(subject), render_subject(subject))


@app.command("rm")
def rm(
    ctx: typer.Context,
    subject_id: Annotated[str, typer.Argument(metavar="SUBJECT", help="Subject id to delete.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Delete a subject with its photos' records and captions; prints the deleted id.

    Example: `persona-cli subjects rm subj_51d2…`
    """
    s = session(ctx)
    deleted = s.client().subjects.DeleteSubject(subjects_pb2.DeleteSubjectRequest(subject_id=subject_id))
    s.output(as_json).emit(message_dict(deleted), lambda: deleted.subject_id)
