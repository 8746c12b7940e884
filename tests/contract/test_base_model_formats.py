"""Base models as users hold them, through a real gRPC server: a diffusers folder saved in fp16, a hub id whose cache
holds only the `fp16` variant, and single-file `.safetensors` / `.ckpt` checkpoints (A1111/ComfyUI layout) each train,
draw and export; an architecture persona does not train is refused, naming it."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from persona.services.train.settings import TrainSettings
from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_checkpoint import write_single_file  # noqa: E402

SMALL = dict(resolution=32, checkpoint_every=0, num_class_images=2, class_image_steps=2, steps=1)
HUB_ID = "persona-test/tiny-fp16"
REVISION = "1" * 40


def _fp16_pipeline(tiny_model: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, torch_dtype=torch.float16, safety_checker=None,
                                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def fp16_folder(tiny_model, tmp_path_factory) -> Path:
    """The tiny base saved in half precision, as most community folders (and the toy world's base) are."""
    folder = tmp_path_factory.mktemp("tiny-fp16")
    _fp16_pipeline(tiny_model).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def hub_cache(tiny_model, tmp_path_factory) -> Path:
    """A Hugging Face cache holding HUB_ID with only its `fp16` variant weights, laid out as huggingface_hub does."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    _fp16_pipeline(tiny_model).save_pretrained(repo / "snapshots" / REVISION, safe_serialization=True,
                                               variant="fp16")
    return cache


@pytest.fixture(scope="module")
def single_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny base as one original-layout checkpoint, once as .safetensors (fp16) and once as a pickled .ckpt."""
    root = tmp_path_factory.mktemp("single-files")
    fp16 = root / "fp16"
    _fp16_pipeline(tiny_model).save_pretrained(fp16, safe_serialization=True)
    return {"safetensors": write_single_file(fp16, root / "tiny-fp16.safetensors"),
            "ckpt": write_single_file(tiny_model, root / "tiny.ckpt")}


@pytest.fixture
def server(start_app, model_cache, tiny_model, tmp_path, hub_cache, monkeypatch):
    """A server whose single-file configs for SD-1.x are the tiny model's (the checkpoints above are tiny-shaped)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache))
    configs = tmp_path / "single-file-configs"
    configs.mkdir()
    (configs / "sd15").symlink_to(tiny_model)
    return start_app(train_settings=TrainSettings(base_model_cache_dir=model_cache, device="cpu",
                                                  single_file_configs=configs))


@pytest.fixture
def client(client_for, server):
    return client_for("acme", server)


@pytest.fixture
def subject(client, dog_photos):
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d, filename=f"{i}.jpg")
                                  for i, d in enumerate(dog_photos)]))


def _train(client, subject_id: str, base_model: str, method: str, regularizers=("none",)) -> common_pb2.Job:
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model=base_model, method=method, regularizers=list(regularizers),
        options=train_pb2.TrainingOptions(**SMALL)))
    return client.wait_for_job(job.job_id, timeout_s=600)


def _draw(client, **target) -> Image.Image:
    (image,) = client.generate.Generate(generate_pb2.GenerateRequest(prompts=["a sks dog"], steps=2, width=32,
                                                                     height=32, **target))
    return Image.open(io.BytesIO(image.png))


@pytest.mark.parametrize("method, regularizers", [
    ("dreambooth", ("prior",)), ("lora", ("prior",)), ("ti", ()), ("custom_diffusion", ("none",)),
    ("svdiff", ("none",))])
def test_every_method_trains_and_draws_a_base_stored_in_fp16(client, subject, fp16_folder, method, regularizers):
    from safetensors import safe_open

    with safe_open(str(fp16_folder / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # stored in half precision

    final = _train(client, subject.subject_id, str(fp16_folder), method, regularizers)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concept_id = final.params["concept_id"]
    assert _draw(client, concept_id=concept_id).size == (32, 32)


@pytest.mark.parametrize("kind", ["hub-variant", "safetensors", "ckpt"])
def test_base_models_as_users_hold_them_train_draw_and_export(client, subject, single_files, kind, tmp_path):
    from diffusers import StableDiffusionPipeline

    ref = HUB_ID if kind == "hub-variant" else str(single_files[kind])
    final = _train(client, subject.subject_id, ref, "lora")
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=final.params["concept_id"]))
    assert concept.base_model == ref and concept.base_model_family == "tiny"

    assert _draw(client, concept_id=concept.concept_id).size == (32, 32)
    assert _draw(client, base_model=ref).size == (32, 32)

    exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=concept.concept_id, format=train_pb2.EXPORT_FORMAT_DIFFUSERS))
    for file in exported.files:
        client.read_concept_file(concept.concept_id, file.artifact_id, tmp_path / "export" / file.path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32  # exports are full precision whatever the base stores
    image = pipe("a sks dog", height=32, width=32, num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(image).all()


def _sdxl_folder(tiny_model: Path, root: Path) -> Path:
    folder = root / "sdxl"
    shutil.copytree(tiny_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    return folder


def _single_file(root: Path, name: str, keys: list[str]) -> Path:
    from safetensors.torch import save_file

    path = root / name
    save_file({k: torch.zeros(1, 4, 1, 1) for k in keys}, str(path))
    return path


def test_an_architecture_persona_does_not_train_is_refused_naming_it(client, subject, tiny_model, tmp_path):
    cases = {
        str(_sdxl_folder(tiny_model, tmp_path)): "StableDiffusionXLPipeline",
        str(_single_file(tmp_path, "xl.safetensors", ["model.diffusion_model.input_blocks.0.0.weight",
                                                      "conditioner.embedders.0.transformer.x"])): "XL",
        str(_single_file(tmp_path, "lora.safetensors", ["lora_unet_down_blocks_0.lora_down.weight"])): "LoRA",
        str(_single_file(tmp_path, "flux.safetensors", ["double_blocks.0.img_attn.qkv.weight"])): "transformer",
        str(tmp_path / "notes.txt"): "not a single-file checkpoint",
    }
    (tmp_path / "notes.txt").write_text("hello")
    for ref, named in cases.items():
        with pytest.raises(grpc.RpcError) as refused:
            client.train.StartTraining(train_pb2.StartTrainingRequest(
                subject_id=subject.subject_id, base_model=ref, method="lora", regularizers=["none"]))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ref
        assert "`base_model`" in refused.value.details() and named in refused.value.details(), refused.value.details()
