"""Regularisers through the real server on the tiny model: masked loss on the mask service's masks, SPL and CoRe
on a method that trains the token, each term reported in the job's events and bounded, the concept exporting
and drawing; SID's caption-case ablation; and every combination that cannot work refused before a job starts."""
from __future__ import annotations

import math

import grpc
import pytest

from persona.v1 import common_pb2, generate_pb2, mask_pb2, subjects_pb2, train_pb2


@pytest.fixture
def subject(client, dog_photos) -> subjects_pb2.Subject:
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))


def _start(client, subject_id: str, method: str, regularizers: list[str], steps: int = 30, **options):
    return client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method=method, regularizers=regularizers, captions="class",
        options=train_pb2.TrainingOptions(steps=steps, resolution=32, checkpoint_every=0, **options)))


def _finished(client, job) -> tuple[common_pb2.Job, list[dict]]:
    events = []
    final = client.wait_for_job(job.job_id, on_event=events.append, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    steps = [dict(e.data.items()) for e in events if e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS
             and e.HasField("data") and dict(e.data.items()).get("stage") == "train"]
    return final, steps


def _draws(client, concept_id: str) -> None:
    [image] = client.generate.Generate(generate_pb2.GenerateRequest(concept_id=concept_id, prompts=["a sks dog"],
                                                                    steps=2))
    assert image.png.startswith(b"\x89PNG")


def test_masked_loss_trains_on_the_mask_services_masks(client, subject):
    client.masks.MaskFromText(mask_pb2.MaskFromTextRequest(subject_id=subject.subject_id))
    final, steps = _finished(client, _start(client, subject.subject_id, "lora", ["prior", "mask"],
                                            learning_rate=1e-2, num_class_images=2, class_image_steps=2,
                                            unmasked_weight=0.2))
    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=final.params["concept_id"]))
    assert list(concept.regularizers) == ["prior", "mask"] and concept.options.unmasked_weight == 0.2
    assert all(math.isfinite(s["loss"]) and "prior" in s for s in steps)
    _draws(client, concept.concept_id)


def test_spl_and_core_report_their_terms_and_stay_bounded(client, subject):
    final, steps = _finished(client, _start(client, subject.subject_id, "ti", ["spl", "core"], learning_rate=5e-3))
    assert steps and all({"spl", "core_emb", "core_attn"} <= set(s) for s in steps)
    # The token starts as the class word's embedding: both phrases and contexts start close and stay close.
    assert all(0 <= s["spl"] < 0.5 and 0 <= s["core_emb"] < 0.5 for s in steps)
    exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=final.params["concept_id"], format=train_pb2.EXPORT_FORMAT_TI))
    assert exported.files
    _draws(client, final.params["concept_id"])


def test_a_caption_case_trains_only_on_captions_of_that_case(client, subject):
    refused = _error(lambda: client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", captions="case3",
        options=train_pb2.TrainingOptions(steps=2))))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and "--case 3" in refused.details()
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", captions="case1", regularizers=["none"],
        options=train_pb2.TrainingOptions(steps=2, resolution=32, checkpoint_every=0)))
    final, _ = _finished(client, job)
    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=final.params["concept_id"]))
    assert concept.captions == "class" and {c.text for c in concept.training_captions} == {"a photo of a sks dog"}


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("method, regularizers, options, code, words", [
    ("lora", ["spl"], {}, "INVALID_ARGUMENT", ["`regularizers`", "spl", "`method`", "`train_text_encoder`"]),
    ("dreambooth", ["core"], {}, "INVALID_ARGUMENT", ["core", "`train_text_encoder`"]),
    ("ti", ["prior"], {}, "INVALID_ARGUMENT", ["`regularizers`", "prior", "`method`"]),
    ("lora", ["mask"], {}, "FAILED_PRECONDITION", ["mask", "persona-cli mask"]),
    ("lora", ["none", "mask"], {}, "INVALID_ARGUMENT", ["`regularizers`"]),
    ("lora", ["sharpen"], {}, "INVALID_ARGUMENT", ["`regularizers`", "sharpen"]),
    ("ti", ["spl"], {"spl_weight": -1}, "INVALID_ARGUMENT", ["`spl_weight`"]),
    ("lora", ["prior"], {"unmasked_weight": 2}, "INVALID_ARGUMENT", ["`unmasked_weight`"]),
])
def test_combinations_that_cannot_work_are_refused_before_a_job(app, client, subject, method, regularizers, options,
                                                                 code, words):
    error = _error(lambda: _start(client, subject.subject_id, method, regularizers, steps=2, **options))
    assert error.code().name == code, error.details()
    for word in words:
        assert word in error.details(), error.details()
    assert not app.db.query("SELECT * FROM jobs WHERE kind = 'train'")
    assert not app.db.query("SELECT * FROM concepts")
