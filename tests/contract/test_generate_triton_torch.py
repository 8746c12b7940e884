"""GenerateService on the Triton engine with torch components (`triton_component_backend="torch"`: torch inside
python-backend models, the GPU path of the tritonserver bundled in nvidia-pytriton), through a real gRPC server
and the real `tritonserver`, on CPU: a LoRA concept loads from its diffusers folder — weights hard-linked into the
repository, not copied — and draws what diffusers' StableDiffusionPipeline draws on the same folder."""
from __future__ import annotations

import numpy as np
import pytest

from test_generate_triton import _diffusers_image, _pixels, _train

from persona.services.generate.settings import GenerateSettings
from persona.services.generate.triton_repository import model_name
from persona.v1 import generate_pb2


@pytest.fixture
def triton_app(start_app):
    """A persona server drawing on a tritonserver it starts itself, components served by torch (CPU here)."""
    return start_app(generate_settings=GenerateSettings(engine="triton", triton_gpu=False,
                                                        triton_component_backend="torch"))


def test_torch_components_draw_what_diffusers_draws(triton_app, client_for, dog_photos, tmp_path):
    client = client_for("acme", triton_app)
    lora = _train(client, dog_photos, "lora")
    engine = triton_app.generate.engine
    assert engine.repository.component_backend == "torch" and engine.model_format == "diffusers"

    [image] = client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=lora, prompts=["a sks dog on the beach"], negative_prompt="blurry", seed=11, steps=4,
        scheduler=generate_pb2.SCHEDULER_DDIM))
    assert image.engine == "triton" and (image.width, image.height) == (64, 64) and image.seed == 11
    # fp32 torch on CPU in Triton vs the same in diffusers: equal up to a rounding step of 8-bit pixels.
    expected = _diffusers_image(client, lora, tmp_path / "lora", "a sks dog on the beach", "ddim", 11, 4)
    assert np.abs(_pixels(image.png) - np.asarray(expected, dtype=np.int16)).max() <= 2

    # The repository's component models are the concept's diffusers subfolders, hard-linked (not copied) from
    # the folder the generate service exported, with the torch adapter beside them and no ONNX anywhere.
    entry = engine.repository.entry(model_name(lora))
    source = triton_app.settings.data_dir / "generate" / lora
    for component, subfolder in (("text_encoder", "text_encoder"), ("unet", "unet"), ("vae_decoder", "vae")):
        version = engine.repository.root / entry.components[component] / "1"
        assert "TorchComponent" in (version / "model.py").read_text()
        weights = sorted((source / subfolder).glob("*.safetensors"))
        assert weights, f"no weights in {source / subfolder}"
        for file in weights:
            assert (version / subfolder / file.name).stat().st_ino == file.stat().st_ino, file
    assert not list(engine.repository.root.rglob("*.onnx"))

    # A second request reuses what is loaded: the same image.
    [again] = client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=lora, prompts=["a sks dog on the beach"], negative_prompt="blurry", seed=11, steps=4,
        scheduler=generate_pb2.SCHEDULER_DDIM))
    assert (_pixels(again.png) == _pixels(image.png)).all()
