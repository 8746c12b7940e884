"""GenerateService through a real gRPC server (embedded engine, tiny models): images stream one by one, equal
diffusers' pipeline on the concept's exported folder, concepts load and unload, bad input names the field."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2


@pytest.fixture
def concept(client, dog_photos) -> train_pb2.Concept:
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method="lora", regularizers=["none"],
        options=train_pb2.TrainingOptions(steps=3, learning_rate=1e-2, checkpoint_every=0)))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    return client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=job.params["concept_id"]))


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_images_stream_with_their_settings_and_equal_diffusers(app, client, concept, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    request = generate_pb2.GenerateRequest(
        concept_id=concept.concept_id, prompts=["a sks dog on the beach", "a sks dog in the snow"], seed=5, steps=3,
        images_per_prompt=2, scheduler=generate_pb2.SCHEDULER_DDIM)
    images = list(client.generate.Generate(request))
    assert [(i.prompt_index, i.image_index, i.seed) for i in images] == [(0, 0, 5), (0, 1, 6), (1, 0, 7), (1, 1, 8)]
    first = images[0]
    assert (first.width, first.height) == (64, 64)  # the concept's native resolution (tiny: 64)
    assert first.steps == 3 and first.guidance_scale == 7.5 and first.engine == "embedded"
    assert first.scheduler == generate_pb2.SCHEDULER_DDIM and first.concept_id == concept.concept_id

    # The same image from plain diffusers on the concept's diffusers export.
    exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=concept.concept_id, format=train_pb2.EXPORT_FORMAT_DIFFUSERS))
    folder = tmp_path / "export"
    for file in exported.files:
        client.read_concept_file(concept.concept_id, file.artifact_id, folder / file.path)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a sks dog on the beach", num_inference_steps=3, generator=torch.Generator().manual_seed(5)).images[0]
    ours = np.asarray(Image.open(io.BytesIO(first.png)), dtype=np.int16)
    assert np.abs(ours - np.asarray(expected, dtype=np.int16)).max() <= 1

    loaded = client.generate.ListLoadedConcepts(generate_pb2.ListLoadedConceptsRequest()).concepts
    assert [c.concept_id for c in loaded] == [concept.concept_id]


def test_load_and_unload_without_restart(client, concept, client_for):
    loaded = client.generate.LoadConcept(generate_pb2.LoadConceptRequest(concept_id=concept.concept_id))
    assert loaded.resolution == 64 and loaded.load_seconds > 0
    again = client.generate.LoadConcept(generate_pb2.LoadConceptRequest(concept_id=concept.concept_id))
    assert again.load_seconds == 0
    other = client_for("globex")
    assert not other.generate.ListLoadedConcepts(generate_pb2.ListLoadedConceptsRequest()).concepts
    hidden = _error(lambda: list(other.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=concept.concept_id, prompts=["a sks dog"]))))
    assert hidden.code() == grpc.StatusCode.NOT_FOUND
    client.generate.UnloadConcept(generate_pb2.UnloadConceptRequest(concept_id=concept.concept_id))
    assert not client.generate.ListLoadedConcepts(generate_pb2.ListLoadedConceptsRequest()).concepts
    twice = _error(lambda: client.generate.UnloadConcept(generate_pb2.UnloadConceptRequest(
        concept_id=concept.concept_id)))
    assert twice.code() == grpc.StatusCode.NOT_FOUND


def test_base_model_draws_without_a_concept(client):
    (image,) = client.generate.Generate(generate_pb2.GenerateRequest(
        base_model="tiny", prompts=["a dog"], steps=2, width=32, height=48))
    assert Image.open(io.BytesIO(image.png)).size == (32, 48) and image.base_model == "tiny"


@pytest.mark.parametrize("changes, code, words", [
    (dict(prompts=[]), "INVALID_ARGUMENT", ["`prompts`"]),
    (dict(prompts=["a sks dog", "  "]), "INVALID_ARGUMENT", ["`prompts`", "empty"]),
    (dict(steps=0), "INVALID_ARGUMENT", ["`steps`"]),
    (dict(steps=10**6), "INVALID_ARGUMENT", ["`steps`", "500"]),
    (dict(width=30), "INVALID_ARGUMENT", ["`width`", "multiple of 8"]),
    (dict(height=4096), "INVALID_ARGUMENT", ["`height`", "2048"]),
    (dict(seed=-1), "INVALID_ARGUMENT", ["`seed`"]),
    (dict(prompts=["a sks dog"] * 5, images_per_prompt=16), "INVALID_ARGUMENT",
     ["`images_per_prompt`", "PERSONA_GENERATE_MAX_IMAGES"]),
    (dict(images_per_prompt=17), "INVALID_ARGUMENT", ["`images_per_prompt`"]),
    (dict(guidance_scale=-1), "INVALID_ARGUMENT", ["`guidance_scale`"]),
    (dict(base_model="tiny"), "INVALID_ARGUMENT", ["`concept_id`", "`base_model`"]),
    (dict(concept_id="cpt_nope"), "NOT_FOUND", ["cpt_nope"]),
    (dict(scheduler=9), "INVALID_ARGUMENT", ["`scheduler`"]),
])
def test_bad_requests_name_the_field(client, concept, changes, code, words):
    fields = dict(concept_id=concept.concept_id, prompts=["a sks dog"], steps=2)
    fields.update(changes)
    error = _error(lambda: list(client.generate.Generate(generate_pb2.GenerateRequest(**fields))))
    assert error.code().name == code, error.details()
    for word in words:
        assert word in error.details()
