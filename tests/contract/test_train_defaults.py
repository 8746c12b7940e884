"""What a user asked for is never silently dropped: regularisers add to the defaults (prior preservation stays on
until turned off explicitly), `captions: sid` says loudly which photos fall back to the Case 1 template, and style
subjects train on SID App. C.1's template and class prompt. Through the real server on the tiny model."""
from __future__ import annotations

import grpc
import pytest

from persona.services.train.request import regularizers_in_effect
from persona.v1 import caption_pb2, common_pb2, subjects_pb2, train_pb2


@pytest.mark.parametrize("method, requested, expected", [
    ("lora", [], ["prior"]),
    ("lora", ["mask"], ["prior", "mask"]),
    ("dreambooth", ["spl", "core"], ["prior", "spl", "core"]),
    ("svdiff", ["prior", "mask"], ["prior", "mask"]),
    ("lora", ["none"], []),
    ("lora", ["none", "mask"], ["mask"]),
    ("ti", ["spl"], ["spl"]),  # prior preservation does not apply to ti: nothing to add it to
])
def test_named_regularisers_add_to_the_defaults(method, requested, expected):
    assert regularizers_in_effect(requested, method) == expected


def test_none_with_prior_is_refused_naming_both():
    from persona.services.runtime.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="`regularizers` has both none and prior"):
        regularizers_in_effect(["none", "prior"], "lora")


def _subject(client, photos, class_name="dog"):
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name=class_name, images=[subjects_pb2.ImageUpload(data=d) for d in photos]))


def _start(client, subject_id, **fields):
    fields.setdefault("regularizers", ["none"])
    fields.setdefault("options", train_pb2.TrainingOptions(steps=1, resolution=32, checkpoint_every=0))
    return client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method="lora", **fields))


def _run(client, job) -> tuple[train_pb2.Concept, list[str]]:
    events = []
    final = client.wait_for_job(job.job_id, on_event=events.append, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=job.params["concept_id"]))
    return concept, [e.message for e in events if e.type == common_pb2.JOB_EVENT_TYPE_WARNING]


def test_mask_through_the_server_keeps_prior_preservation(client, dog_photos):
    from persona.v1 import mask_pb2

    subject = _subject(client, dog_photos[:2])
    client.masks.MaskFromText(mask_pb2.MaskFromTextRequest(subject_id=subject.subject_id))
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method="lora", regularizers=["mask"],
        options=train_pb2.TrainingOptions(steps=1, resolution=32, checkpoint_every=0, num_class_images=1,
                                          class_image_steps=1)))
    concept, _ = _run(client, job)
    assert list(concept.regularizers) == ["prior", "mask"]


def test_sid_captions_say_loudly_which_photos_train_on_the_template(client, dog_photos):
    subject = _subject(client, dog_photos[:3])
    _, warnings = _run(client, _start(client, subject.subject_id))  # never captioned, captions sid (the default)
    [warning] = [w for w in warnings if "captions sid" in w]
    assert "none of the photos has a stored caption" in warning and "'a photo of a sks dog'" in warning
    assert f"persona-cli caption {subject.subject_id}" in warning and "--captions class" in warning

    client.captions.SetCaption(caption_pb2.SetCaptionRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=subject.images[1].image_id),
        text="a photo of a sks dog on a red sofa"))
    _, warnings = _run(client, _start(client, subject.subject_id))
    assert [w for w in warnings if "captions sid" in w and "photo(s) 0, 2 of 3 have no" in w]

    _, warnings = _run(client, _start(client, subject.subject_id, captions="class"))  # the template, chosen
    assert not [w for w in warnings if "captions sid" in w]


def test_style_subjects_train_on_sid_app_c1_template_and_class_prompt(client, dog_photos):
    subject = _subject(client, dog_photos[:2], class_name="painting")
    first = subject.images[0].image_id
    captioned = client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(
        subject_id=subject.subject_id, case=caption_pb2.DESCRIPTION_CASE_1, mode=caption_pb2.CAPTION_MODE_STYLE,
        image_ids=[first]))
    assert client.wait_for_job(captioned.job_id, timeout_s=60).state == common_pb2.JOB_STATE_SUCCEEDED

    # The mode comes from the stored captions: the uncaptioned photo falls back to the style template too.
    concept, _ = _run(client, _start(client, subject.subject_id))
    assert {c.text for c in concept.training_captions} == {"A painting in the style of sks art"}
    assert concept.options.class_prompt == "A painting in the style of art"
    assert concept.options.validation_prompts == ["A painting of a lighthouse by the sea in the style of sks art"]

    # Asked for explicitly, with the class template and prior preservation, on a subject never captioned.
    fresh = _subject(client, dog_photos[:1], class_name="cartoon")
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=fresh.subject_id, base_model="tiny", method="lora", captions="class", mode="style",
        options=train_pb2.TrainingOptions(steps=1, resolution=32, checkpoint_every=0)))
    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=job.params["concept_id"]))
    assert [c.text for c in concept.training_captions] == ["A cartoon in the style of sks art"]
    assert concept.options.class_prompt == "A cartoon in the style of art" and list(concept.regularizers) == ["prior"]
    client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))

    with pytest.raises(grpc.RpcError) as error:
        _start(client, fresh.subject_id, mode="painting")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "`mode`" in error.value.details()


def test_sid_captions_train_with_prior_preservation_and_say_so_when_it_is_turned_off(client, dog_photos):
    subject = _subject(client, dog_photos[:2])
    for image in subject.images:
        client.captions.SetCaption(caption_pb2.SetCaptionRequest(
            image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=image.image_id),
            text="a photo of a sks dog on a red sofa next to a small blue cup"))
    # No regulariser named: SID captions (the default source) train with prior preservation, unwarned.
    quick_prior = train_pb2.TrainingOptions(steps=1, resolution=32, checkpoint_every=0, num_class_images=1,
                                            class_image_steps=1)
    concept, warnings = _run(client, _start(client, subject.subject_id, regularizers=[], options=quick_prior))
    assert list(concept.regularizers) == ["prior"] and concept.captions == "sid"
    assert not [w for w in warnings if "without prior preservation" in w]
    # Turned off explicitly: it trains, and says what that costs.
    concept, warnings = _run(client, _start(client, subject.subject_id))
    assert list(concept.regularizers) == []
    [warning] = [w for w in warnings if "without prior preservation" in w]
    assert warning.startswith("captions sid without prior preservation") and "--reg none" in warning
    # Class-only captions without it: nothing to warn about.
    _, warnings = _run(client, _start(client, subject.subject_id, captions="class"))
    assert not [w for w in warnings if "without prior preservation" in w]


def test_tiny_draws_class_images_in_fewer_steps_unless_asked(client, dog_photos):
    from persona.services.train.options import DEFAULT_OPTIONS, TINY_CLASS_IMAGE_STEPS

    subject = _subject(client, dog_photos[:2])
    concept, _ = _run(client, _start(client, subject.subject_id))
    assert concept.options.class_image_steps == TINY_CLASS_IMAGE_STEPS < DEFAULT_OPTIONS["class_image_steps"]
    asked = train_pb2.TrainingOptions(steps=1, resolution=32, checkpoint_every=0, class_image_steps=30)
    concept, _ = _run(client, client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method="lora", regularizers=["none"], options=asked)))
    assert concept.options.class_image_steps == 30  # what a user asks for is kept


def test_class_images_are_drawn_with_the_guidance_asked_for(app, client, dog_photos):
    subject = _subject(client, dog_photos[:2])
    for guidance in (None, 6.0):
        options = train_pb2.TrainingOptions(steps=1, resolution=32, checkpoint_every=0, num_class_images=1,
                                            class_image_steps=1)
        if guidance is not None:
            options.class_image_guidance = guidance
        concept, _ = _run(client, _start(client, subject.subject_id, regularizers=[], options=options))
        assert concept.options.class_image_guidance == (guidance or 7.5)
    drawn = sorted(row["guidance_scale"] for row in app.db.query("SELECT guidance_scale FROM prior_images"))
    assert drawn == [6.0, 7.5]  # one class-image set per guidance: the key keeps them apart
