"""Training methods beyond the first three through a real gRPC server on the tiny base model: each trains, exports in
its own format and as diffusers, and draws through the GenerateService."""
from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2

# 32 px keeps a step near 0.2 s on two CPU cores; 2 class images at 2 steps keep prior preservation cheap.
SMALL = dict(resolution=32, checkpoint_every=0, num_class_images=2, class_image_steps=2)


@pytest.fixture
def subject(client, dog_photos):
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d, filename=f"{i}.jpg")
                                  for i, d in enumerate(dog_photos)]))


def _train(client, subject_id: str, method: str, regularizers=(), **options) -> train_pb2.Concept:
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method=method, regularizers=list(regularizers),
        options=train_pb2.TrainingOptions(**{**SMALL, **options})))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    return client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=job.params["concept_id"]))


def _export(client, concept_id: str, fmt: int, folder: Path) -> tuple[train_pb2.ConceptExport, Path]:
    exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(concept_id=concept_id, format=fmt))
    for file in exported.files:
        client.read_concept_file(concept_id, file.artifact_id, folder / file.path)
    return exported, folder


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe) -> np.ndarray:
    return pipe("a sks dog", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_custom_diffusion_trains_exports_and_generates(app, client, subject, tmp_path):
    from persona.services.models.builders import tiny_base_model

    concept = _train(client, subject.subject_id, "custom_diffusion", steps=30, learning_rate=1e-2)
    assert concept.state == train_pb2.CONCEPT_STATE_READY and concept.steps_done == 30
    assert 0 < concept.final_loss < 2  # bounded over 30 steps (the tiny random model's loss is noisy)
    assert concept.method == "custom_diffusion" and list(concept.regularizers) == ["prior"]  # on by default
    weights = {"pytorch_custom_diffusion_weights.bin", "learned_embeds.safetensors"}
    assert {f.path for f in concept.files} == weights

    # Its own format: the saved files, which diffusers' Custom Diffusion loaders take into the base pipeline.
    native, native_dir = _export(client, concept.concept_id, train_pb2.EXPORT_FORMAT_CUSTOM_DIFFUSION,
                                 tmp_path / "custom_diffusion")
    assert native.format == train_pb2.EXPORT_FORMAT_CUSTOM_DIFFUSION and {f.path for f in native.files} == weights
    pipe = _pipe(tiny_base_model(app.train.settings.base_model_cache_dir))
    plain = _sample(pipe)
    # Exactly what `persona-cli export --help` tells users to run, OUT being the folder written.
    from persona.client.commands.export import CUSTOM_DIFFUSION_LOADING
    assert CUSTOM_DIFFUSION_LOADING in _export_format_help()
    exec(CUSTOM_DIFFUSION_LOADING, {"pipe": pipe, "OUT": native_dir})
    with_processors = _sample(pipe)
    assert np.abs(with_processors - plain).max() > 1e-4

    # diffusers: K/V fused into a plain UNet, the token added; it draws what the processors draw.
    _, fused_dir = _export(client, concept.concept_id, train_pb2.EXPORT_FORMAT_DIFFUSERS, tmp_path / "diffusers")
    assert (fused_dir / "model_index.json").exists()
    assert np.abs(_sample(_pipe(fused_dir)) - with_processors).max() < 1e-4

    # And the GenerateService draws it.
    (image,) = client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=concept.concept_id, prompts=["a sks dog"], steps=2))
    assert image.concept_id == concept.concept_id and image.steps == 2
    assert Image.open(io.BytesIO(image.png)).size == (concept.resolution, concept.resolution)  # 32: as trained

    # Formats of other methods are refused, naming the ones that work.
    with pytest.raises(grpc.RpcError) as wrong:
        client.train.ExportConcept(train_pb2.ExportConceptRequest(
            concept_id=concept.concept_id, format=train_pb2.EXPORT_FORMAT_LORA))
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "custom_diffusion" in wrong.value.details()


def test_custom_diffusion_refuses_train_text_encoder_and_its_format_other_methods(client, subject):
    with pytest.raises(grpc.RpcError) as both:
        client.train.StartTraining(train_pb2.StartTrainingRequest(
            subject_id=subject.subject_id, base_model="tiny", method="custom_diffusion", regularizers=["none"],
            options=train_pb2.TrainingOptions(steps=2, train_text_encoder=True, **SMALL)))
    assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "`train_text_encoder`" in both.value.details() and "`method`" in both.value.details()

    ti = _train(client, subject.subject_id, "ti", steps=1)
    with pytest.raises(grpc.RpcError) as wrong:
        client.train.ExportConcept(train_pb2.ExportConceptRequest(
            concept_id=ti.concept_id, format=train_pb2.EXPORT_FORMAT_CUSTOM_DIFFUSION))
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "custom_diffusion concept" in wrong.value.details()


def test_svdiff_trains_exports_and_generates(app, client, subject, tmp_path):
    from persona.services.models.builders import tiny_base_model
    from persona.services.models.fusing import fuse_into_pipeline

    # 1e-2 (not the default 1e-3) so that the steps visibly move the output.
    concept = _train(client, subject.subject_id, "svdiff", steps=30, learning_rate=1e-2)
    assert concept.state == train_pb2.CONCEPT_STATE_READY and concept.steps_done == 30
    assert 0 < concept.final_loss < 2  # bounded over 30 steps
    assert concept.method == "svdiff" and list(concept.regularizers) == ["prior"]  # on by default, as the paper
    assert [f.path for f in concept.files] == ["spectral_shifts.safetensors"]

    # Its own format: the saved file as it is, a few KB for the tiny model.
    native, native_dir = _export(client, concept.concept_id, train_pb2.EXPORT_FORMAT_SVDIFF, tmp_path / "svdiff")
    assert native.format == train_pb2.EXPORT_FORMAT_SVDIFF
    assert [(f.path, f.artifact_id) for f in native.files] == [(f.path, f.artifact_id) for f in concept.files]
    assert native.files[0].size_bytes < 40_000
    pipe = _pipe(tiny_base_model(app.train.settings.base_model_cache_dir))
    plain = _sample(pipe)
    fuse_into_pipeline("svdiff", pipe, native_dir, "sks")
    shifted = _sample(pipe)
    assert np.abs(shifted - plain).max() > 1e-4

    # diffusers: the shifted weights in a plain UNet, the token added; it draws what the file fused by hand draws.
    _, fused_dir = _export(client, concept.concept_id, train_pb2.EXPORT_FORMAT_DIFFUSERS, tmp_path / "diffusers")
    assert (fused_dir / "model_index.json").exists()
    assert np.abs(_sample(_pipe(fused_dir)) - shifted).max() < 1e-4

    # And the GenerateService draws it.
    (image,) = client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=concept.concept_id, prompts=["a sks dog"], steps=2))
    assert image.concept_id == concept.concept_id and image.steps == 2
    assert Image.open(io.BytesIO(image.png)).size == (concept.resolution, concept.resolution)

    # Formats of other methods are refused, naming the ones that work.
    with pytest.raises(grpc.RpcError) as wrong:
        client.train.ExportConcept(train_pb2.ExportConceptRequest(
            concept_id=concept.concept_id, format=train_pb2.EXPORT_FORMAT_LORA))
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "svdiff" in wrong.value.details()


def test_svdiff_defaults_refuse_train_text_encoder_and_its_format_other_methods(client, subject):
    with pytest.raises(grpc.RpcError) as both:
        client.train.StartTraining(train_pb2.StartTrainingRequest(
            subject_id=subject.subject_id, base_model="tiny", method="svdiff", regularizers=["none"],
            options=train_pb2.TrainingOptions(steps=2, train_text_encoder=True, **SMALL)))
    assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "`train_text_encoder`" in both.value.details() and "`method`" in both.value.details()

    concept = _train(client, subject.subject_id, "svdiff", regularizers=["none"], steps=1)
    assert concept.options.learning_rate == pytest.approx(1e-3)  # svdiff-pytorch's rate for spectral shifts
    assert list(concept.regularizers) == []

    ti = _train(client, subject.subject_id, "ti", steps=1)
    with pytest.raises(grpc.RpcError) as wrong:
        client.train.ExportConcept(train_pb2.ExportConceptRequest(
            concept_id=ti.concept_id, format=train_pb2.EXPORT_FORMAT_SVDIFF))
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "svdiff concept" in wrong.value.details()


def _export_format_help() -> str:
    """The help of `persona-cli export --format`, as --help prints it (unwrapped)."""
    import typer

    from persona.client.cli import app

    command = typer.main.get_command(app).commands["export"]
    return next(p.help for p in command.params if p.name == "fmt")
