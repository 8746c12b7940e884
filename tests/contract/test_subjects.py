"""SubjectService through a real gRPC server: uploads, validation, tenancy, pagination."""
import io

import grpc
import pytest
from PIL import Image

from persona.v1 import common_pb2, subjects_pb2


def upload(client, photos, class_name="dog", **fields):
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name=class_name, images=[subjects_pb2.ImageUpload(data=p, filename=f"{i:02}.jpg") for i, p in enumerate(photos)],
        **fields))


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


def test_create_get_list_download_delete(client, dog_photos):
    subject = upload(client, dog_photos, token="zwx", display_name="Bruno")
    assert subject.subject_id.startswith("subj_")
    assert (subject.class_name, subject.token, subject.display_name) == ("dog", "zwx", "Bruno")
    assert [i.index for i in subject.images] == [0, 1, 2, 3]
    assert all(i.media_type == "image/jpeg" and i.width > 0 and len(i.sha256) == 64 for i in subject.images)

    assert client.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=subject.subject_id)) == subject
    listed = client.subjects.ListSubjects(subjects_pb2.ListSubjectsRequest())
    assert [s.subject_id for s in listed.subjects] == [subject.subject_id]

    image = subject.images[1]
    downloaded = client.subjects.GetSubjectImage(subjects_pb2.GetSubjectImageRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=image.image_id)))
    assert downloaded.data == dog_photos[1]  # no EXIF rotation needed: the upload is kept byte for byte
    assert downloaded.image == image

    client.subjects.DeleteSubject(subjects_pb2.DeleteSubjectRequest(subject_id=subject.subject_id))
    error = rpc_error(client.subjects.GetSubject, subjects_pb2.GetSubjectRequest(subject_id=subject.subject_id))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "`subject_id`" in error.details()


def test_default_token_is_sks_and_class_whitespace_is_normalised(client, dog_photos):
    subject = upload(client, dog_photos[:1], class_name="  stuffed   animal ")
    assert (subject.class_name, subject.token) == ("stuffed animal", "sks")


def test_exif_orientation_is_applied_and_png_webp_accepted(client):
    wide = Image.new("RGB", (120, 60), "red")
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated = encode(wide, "JPEG", exif=exif.tobytes())
    subject = upload(client, [rotated, encode(wide, "PNG"), encode(wide, "WEBP")], class_name="can")
    assert [(i.width, i.height, i.media_type) for i in subject.images] == [
        (60, 120, "image/jpeg"), (120, 60, "image/png"), (120, 60, "image/webp")]
    stored = client.subjects.GetSubjectImage(subjects_pb2.GetSubjectImageRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=subject.images[0].image_id)))
    assert Image.open(io.BytesIO(stored.data)).size == (60, 120)


def test_pagination_walks_every_subject_once(client, dog_photos):
    created = [upload(client, dog_photos[:1]).subject_id for _ in range(5)]
    seen, token = [], ""
    while True:
        page = client.subjects.ListSubjects(subjects_pb2.ListSubjectsRequest(
            page=common_pb2.PageRequest(page_size=2, page_token=token)))
        assert len(page.subjects) <= 2
        seen += [s.subject_id for s in page.subjects]
        token = page.page.next_page_token
        if not token:
            break
    assert seen == list(reversed(created))


def test_another_tenants_subject_is_not_found(client_for, dog_photos):
    acme, globex = client_for("acme"), client_for("globex")
    subject = upload(acme, dog_photos[:1])
    for call, request in [
        (globex.subjects.GetSubject, subjects_pb2.GetSubjectRequest(subject_id=subject.subject_id)),
        (globex.subjects.DeleteSubject, subjects_pb2.DeleteSubjectRequest(subject_id=subject.subject_id)),
        (globex.subjects.GetSubjectImage, subjects_pb2.GetSubjectImageRequest(image=common_pb2.ImageRef(
            subject_id=subject.subject_id, image_id=subject.images[0].image_id))),
    ]:
        assert rpc_error(call, request).code() == grpc.StatusCode.NOT_FOUND
    assert globex.subjects.ListSubjects(subjects_pb2.ListSubjectsRequest()).subjects == []
    assert acme.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=subject.subject_id)) == subject


def zero_by_zero_png() -> bytes:
    """A PNG whose header claims 0×0 pixels (valid chunks, CRCs included)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


BAD_UPLOADS = {
    "empty upload": (lambda photos: dict(images=[b""]), "`images[0].data` is empty"),
    "non-image bytes": (lambda photos: dict(images=[photos[0], b"hello, not an image" * 10]), "`images[1].data`"),
    "truncated JPEG": (lambda photos: dict(images=[photos[0][: len(photos[0]) // 2]]), "truncated"),
    "0x0 image": (lambda photos: dict(images=[zero_by_zero_png()]), "`images[0]"),
    "tiny image": (lambda photos: dict(images=[encode(Image.new("RGB", (8, 8)), "PNG")]), "at least 32 pixels"),
    "GIF": (lambda photos: dict(images=[encode(Image.new("RGB", (64, 64)), "GIF")]), "JPEG, PNG or WebP"),
    "over the size limit": (lambda photos: dict(images=[photos[0] + b"\0" * (3 * 1024 * 1024)]), "the limit is"),
    "no images": (lambda photos: dict(images=[]), "`images` is empty"),
    "too many images": (lambda photos: dict(images=[photos[0]] * 21), "at most 20"),
    "empty class": (lambda photos: dict(images=photos[:1], class_name=" "), "`class_name` is empty"),
    "overlong class": (lambda photos: dict(images=photos[:1], class_name="dog" * 30), "`class_name` is 90 characters"),
    "odd class": (lambda photos: dict(images=photos[:1], class_name="dog; DROP TABLE"), "`class_name`"),
    "bad token": (lambda photos: dict(images=photos[:1], token="two words"), "`token`"),
    "long display name": (lambda photos: dict(images=photos[:1], display_name="x" * 201), "`display_name`"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_invalid_argument_and_store_nothing(case, start_app, client_for, dog_photos, monkeypatch):
    monkeypatch.setenv("PERSONA_MAX_IMAGE_BYTES", str(2 * 1024 * 1024))
    app = start_app()
    client = client_for("acme", app)
    kept = upload(client, dog_photos[:2])
    artifacts_before = sorted(p for p in (app.settings.data_dir / "artifacts").rglob("*") if p.is_file())

    make, expected = BAD_UPLOADS[case]
    fields = {"class_name": "dog", **make(dog_photos)}
    images = [subjects_pb2.ImageUpload(data=d, filename=f"{i}.jpg") for i, d in enumerate(fields.pop("images"))]
    error = rpc_error(client.subjects.CreateSubject, subjects_pb2.CreateSubjectRequest(images=images, **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert expected in error.details()
    assert "Traceback" not in error.details()

    listed = client.subjects.ListSubjects(subjects_pb2.ListSubjectsRequest()).subjects
    assert [s.subject_id for s in listed] == [kept.subject_id]
    assert client.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=kept.subject_id)) == kept
    assert sorted(p for p in (app.settings.data_dir / "artifacts").rglob("*") if p.is_file()) == artifacts_before


def test_unknown_ids_name_the_field(client, dog_photos):
    subject = upload(client, dog_photos[:1])
    error = rpc_error(client.subjects.GetSubject, subjects_pb2.GetSubjectRequest(subject_id="subj_nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "`subject_id` 'subj_nope'" in error.details()
    error = rpc_error(client.subjects.GetSubject, subjects_pb2.GetSubjectRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`subject_id` is empty" in error.details()
    error = rpc_error(client.subjects.GetSubjectImage, subjects_pb2.GetSubjectImageRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id="img_nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "`image_id`" in error.details()
