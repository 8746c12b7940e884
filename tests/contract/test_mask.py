"""MaskService through a real gRPC server (tiny random mask models): masks from clicks and from text are stored
with the subject image and read back, survive a restart, go with the subject, and bad input names the field.
The tiny models' weights are random, so what is asserted is what the algorithm guarantees (the clicked pixel is
in the mask, shapes, storage), not how good the segmentation is; P3S itself is checked in tests/unit/test_p3s.py."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from persona.v1 import mask_pb2, subjects_pb2


@pytest.fixture
def subject(client, dog_photos) -> subjects_pb2.Subject:
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))


def _pixels(mask: mask_pb2.Mask) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(mask.png))) > 127


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_a_click_makes_the_image_mask_and_it_is_stored(client, subject, start_app, tmp_path):
    image = subject.images[0]
    x, y = image.width // 2, image.height // 2
    made = client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
        subject_id=subject.subject_id, image_id=image.image_id, positive=[mask_pb2.Point(x=x, y=y)],
        negative=[mask_pb2.Point(x=5, y=5)]))
    pixels = _pixels(made)
    assert pixels.shape == (image.height, image.width) and (made.width, made.height) == (image.width, image.height)
    assert pixels[y, x]  # the clicked pixel is subject, whatever the features
    assert made.method == "p3s-points" and [(p.x, p.y) for p in made.positive] == [(x, y)]
    assert 0 < made.coverage <= 1 and made.coverage == pytest.approx(pixels.mean())
    assert len(made.models) == 1

    read = client.masks.GetMask(mask_pb2.GetMaskRequest(subject_id=subject.subject_id, image_id=image.image_id))
    assert read.artifact_id == made.artifact_id and read.png == made.png

    # The image without a mask is NOT_FOUND, saying how to make one.
    other = _error(lambda: client.masks.GetMask(mask_pb2.GetMaskRequest(
        subject_id=subject.subject_id, image_id=subject.images[1].image_id)))
    assert other.code() == grpc.StatusCode.NOT_FOUND and "persona-cli mask" in other.details()


def test_text_masks_every_image_with_either_method(client, subject):
    both = client.masks.MaskFromText(mask_pb2.MaskFromTextRequest(subject_id=subject.subject_id))
    assert [m.image_id for m in both.masks] == [i.image_id for i in subject.images]
    assert {m.method for m in both.masks} == {"grounded-sam"} and {m.text for m in both.masks} == {"dog"}
    assert all(_pixels(m).shape == (i.height, i.width) for m, i in zip(both.masks, subject.images))
    one = client.masks.MaskFromText(mask_pb2.MaskFromTextRequest(
        subject_id=subject.subject_id, image_id=subject.images[1].image_id, text="a dog",
        method=mask_pb2.TEXT_MASK_METHOD_CLIPSEG))
    assert [m.method for m in one.masks] == ["clipseg"] and one.masks[0].text == "a dog"
    # The newest mask of an image replaces the older one.
    read = client.masks.GetMask(mask_pb2.GetMaskRequest(subject_id=subject.subject_id,
                                                        image_id=subject.images[1].image_id))
    assert read.method == "clipseg"


def test_another_tenant_cannot_mask_or_read(client, client_for, subject):
    image = subject.images[0]
    client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
        subject_id=subject.subject_id, image_id=image.image_id, positive=[mask_pb2.Point(x=10, y=10)]))
    other = client_for("globex")
    for call in (lambda: other.masks.GetMask(mask_pb2.GetMaskRequest(subject_id=subject.subject_id,
                                                                      image_id=image.image_id)),
                 lambda: other.masks.MaskFromText(mask_pb2.MaskFromTextRequest(subject_id=subject.subject_id))):
        assert _error(call).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("changes, code, words", [
    (dict(positive=[mask_pb2.Point(x=100000, y=5)]), "INVALID_ARGUMENT", ["`positive[0]`", "outside"]),
    (dict(positive=[mask_pb2.Point(x=5, y=5)], negative=[mask_pb2.Point(x=-1, y=5)]), "INVALID_ARGUMENT",
     ["`negative[0]`"]),
    (dict(positive=[]), "INVALID_ARGUMENT", ["`positive`"]),
    (dict(image_id="img_nope"), "NOT_FOUND", ["img_nope"]),
    (dict(image_id=""), "INVALID_ARGUMENT", ["`image_id`"]),
    (dict(subject_id="subj_nope"), "NOT_FOUND", ["subj_nope"]),
    (dict(model="/no/such/clip"), "INVALID_ARGUMENT", ["/no/such/clip"]),
])
def test_bad_clicks_name_the_field(client, subject, changes, code, words):
    fields = dict(subject_id=subject.subject_id, image_id=subject.images[0].image_id,
                  positive=[mask_pb2.Point(x=5, y=5)])
    fields.update(changes)
    error = _error(lambda: client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(**fields)))
    assert error.code().name == code, error.details()
    for word in words:
        assert word in error.details()


def test_bad_text_requests_name_the_field(client, subject):
    long = _error(lambda: client.masks.MaskFromText(mask_pb2.MaskFromTextRequest(
        subject_id=subject.subject_id, text="dog " * 100)))
    assert long.code() == grpc.StatusCode.INVALID_ARGUMENT and "`text`" in long.details()
    method = _error(lambda: client.masks.MaskFromText(mask_pb2.MaskFromTextRequest(
        subject_id=subject.subject_id, method=7)))
    assert method.code() == grpc.StatusCode.INVALID_ARGUMENT and "`method`" in method.details()
    image = _error(lambda: client.masks.MaskFromText(mask_pb2.MaskFromTextRequest(
        subject_id=subject.subject_id, image_id="img_nope")))
    assert image.code() == grpc.StatusCode.NOT_FOUND and "img_nope" in image.details()


def test_masks_survive_a_restart_and_go_with_the_subject(start_app, tmp_path, dog_photos):
    from persona.client.sdk import PersonaClient

    data_dir = tmp_path / "restart"
    app = start_app(data_dir=data_dir, auth="none")
    client = PersonaClient.connect(app.address, None)
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=dog_photos[0])]))
    made = client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
        subject_id=subject.subject_id, image_id=subject.images[0].image_id, positive=[mask_pb2.Point(x=50, y=50)]))
    client.close()
    app.stop(0)

    app = start_app(data_dir=data_dir, auth="none")
    client = PersonaClient.connect(app.address, None)
    read = client.masks.GetMask(mask_pb2.GetMaskRequest(subject_id=subject.subject_id,
                                                        image_id=subject.images[0].image_id))
    assert read.png == made.png
    assert app.masks.mask_array("local", subject.subject_id, subject.images[0].image_id).shape == (
        subject.images[0].height, subject.images[0].width)
    client.subjects.DeleteSubject(subjects_pb2.DeleteSubjectRequest(subject_id=subject.subject_id))
    assert not app.db.query("SELECT * FROM masks WHERE subject_id = :s", {"s": subject.subject_id})
    client.close()
