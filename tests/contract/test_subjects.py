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
    "PPM": (lambda photos: dict(images=[encode(Image.new("RGB", (64, 64)), "PPM")]),
            "is a PPM image: send JPEG (MPO too), PNG, WebP, GIF, BMP, TIFF or HEIC"),
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


def download(client, subject, index: int) -> Image.Image:
    stored = client.subjects.GetSubjectImage(subjects_pb2.GetSubjectImageRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=subject.images[index].image_id)))
    return Image.open(io.BytesIO(stored.data))


def test_every_dreambench_subject_uploads(client, dreambench):
    """All of DreamBench, as phones and cameras wrote it: a quarter of its photos are MPO (multi-picture JPEG)."""
    import numpy as np

    folders = sorted(p for p in dreambench.iterdir() if p.is_dir())
    formats = set()
    for folder in folders:
        paths = sorted(folder.glob("*.jpg"))
        subject = upload(client, [p.read_bytes() for p in paths], class_name=folder.name.replace("_", " "))
        assert len(subject.images) == len(paths), folder.name
        for index, path in enumerate(paths):
            original = Image.open(path)
            formats.add(original.format)
            image = subject.images[index]
            assert (image.width, image.height, image.media_type) == (*original.size, "image/jpeg"), path
            if original.format == "MPO":  # the primary image, re-encoded at quality 95: the same pixels, nearly
                stored = np.asarray(download(client, subject, index).convert("RGB"), dtype=np.float32)
                assert np.abs(stored - np.asarray(original.convert("RGB"), dtype=np.float32)).mean() < 2.0, path
    assert len(folders) >= 25 and formats == {"JPEG", "MPO"}  # 25 subjects in ../shared, 31 of 132 photos MPO


def test_an_exif_rotated_photo_is_stored_upright(client, dreambench):
    """A real photo (a DreamBench dog, cropped to landscape) whose EXIF says "rotate 90° clockwise" is stored
    with its pixels turned, so captions, masks and training all see it upright."""
    import numpy as np

    photo = Image.open(dreambench / "dog" / "00.jpg").convert("RGB").crop((0, 100, 600, 400))  # 600×300
    exif = photo.getexif()
    exif[0x0112] = 6
    subject = upload(client, [encode(photo, "JPEG", quality=95, exif=exif.tobytes())])
    assert (subject.images[0].width, subject.images[0].height) == (300, 600)
    stored = np.asarray(download(client, subject, 0).convert("RGB"), dtype=np.float32)
    upright = np.asarray(photo.transpose(Image.Transpose.ROTATE_270), dtype=np.float32)
    assert stored.shape == upright.shape == (600, 300, 3)
    assert np.abs(stored - upright).mean() < 3.0  # two JPEG encodings apart, not a rotation apart
    assert np.abs(stored - np.asarray(photo.resize((300, 600)), dtype=np.float32)).mean() > 20


def _sixteen_bit_grey() -> bytes:
    import numpy as np

    return encode(Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)), "PNG")  # 32896 / 257 = 128


def _transparent_palette() -> bytes:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 20, 40))  # left half blue, right half index 0 = transparent
    return encode(image, "PNG", transparency=0)


def _two_frame_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _two_page_tiff() -> bytes:
    pages = [Image.new("RGB", (40, 48), (0, 0, 255)), Image.new("RGB", (40, 48), (255, 255, 0))]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


# name -> (upload, stored media type, size, pixel at (5, 5), pixel at (35, 5))
CONVERTED = {
    "CMYK JPEG": (lambda: encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=100),
                  "image/jpeg", (40, 40), (255, 0, 0), (255, 0, 0)),
    "16-bit grey PNG": (_sixteen_bit_grey, "image/png", (40, 40), (128, 128, 128), (128, 128, 128)),
    "paletted PNG with transparency": (_transparent_palette, "image/png", (40, 40), (0, 0, 255), (255, 255, 255)),
    "RGBA PNG": (lambda: encode(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), "PNG"), "image/png", (40, 40),
                 (255, 255, 255), (255, 255, 255)),
    "animated GIF": (_two_frame_gif, "image/png", (40, 40), (255, 0, 0), (255, 0, 0)),
    "BMP": (lambda: encode(Image.new("RGB", (40, 40), (10, 20, 30)), "BMP"), "image/png", (40, 40), (10, 20, 30),
            (10, 20, 30)),
    "two-page TIFF": (_two_page_tiff, "image/png", (40, 48), (0, 0, 255), (0, 0, 255)),
}


@pytest.mark.parametrize("case", sorted(CONVERTED))
def test_other_formats_and_modes_are_stored_as_rgb(case, client):
    make, media_type, size, left, right = CONVERTED[case]
    subject = upload(client, [make()])
    assert (subject.images[0].media_type, (subject.images[0].width, subject.images[0].height)) == (media_type, size)
    stored = download(client, subject, 0)
    assert stored.mode == "RGB" and stored.size == size
    for (x, y), expected in (((5, 5), left), ((35, 5), right)):
        assert all(abs(a - b) <= 2 for a, b in zip(stored.getpixel((x, y)), expected)), (case, stored.getpixel((x, y)))


def test_heic_without_the_extra_is_refused_naming_it(client, monkeypatch):
    from persona.services.subjects import images

    monkeypatch.setattr(images, "heif_opener_registered", lambda: False)
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64  # the `ftyp` box an iPhone photo opens with
    error = rpc_error(upload, client, [heic])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "`images[0].data` is a HEIC/HEIF photo" in error.details() and "persona[heic]" in error.details()
