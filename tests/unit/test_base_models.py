"""Base-model resolution and the built-in `tiny` model: builds, caches, loads offline, runs at 64 px."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.models.base_models import read_model_configs, resolve_base_model
from persona.services.models.builders import CLIP_TOKENIZER_DIR, TINY_ATTENTION_HEADS, tiny_base_model
from persona.services.train.settings import TrainSettings

SHARED_MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny(model_cache) -> Path:
    return tiny_base_model(model_cache)


@pytest.fixture
def settings(model_cache) -> TrainSettings:
    return TrainSettings(base_model_cache_dir=model_cache)


@pytest.fixture
def shared_models() -> Path:
    assert (SHARED_MODELS / "configs" / "sd15" / "unet" / "config.json").exists(), (
        f"real model configs not found at {SHARED_MODELS}: check out ../shared beside the repo")
    return SHARED_MODELS


def test_tiny_is_built_once_and_reused(tiny, model_cache):
    stamp = (tiny / "model_index.json").stat().st_mtime_ns
    assert tiny_base_model(model_cache) == tiny
    assert (tiny / "model_index.json").stat().st_mtime_ns == stamp
    # Built through a temporary sibling that is gone afterwards.
    assert [p.name for p in model_cache.iterdir()] == ["tiny-sd"]
    assert list((tiny / "unet").glob("*.safetensors"))


def test_a_tiny_built_with_eight_heads_is_rebuilt_in_place(tmp_path):
    import json

    tiny = tiny_base_model(tmp_path)
    config_path = tiny / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["attention_head_dim"] == TINY_ATTENTION_HEADS
    config_path.write_text(json.dumps({**config, "attention_head_dim": 8}))  # what older persona built

    assert tiny_base_model(tmp_path) == tiny
    assert json.loads(config_path.read_text())["attention_head_dim"] == TINY_ATTENTION_HEADS
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd"]  # the old copy and the build folder are gone


def test_tiny_loads_offline_and_draws_64px(tiny, monkeypatch):
    import torch
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    out = pipe("a photo of a sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert pipe.safety_checker is None


def test_tiny_weights_are_deterministic(tiny, tmp_path):
    from safetensors.torch import load_file

    again = tiny_base_model(tmp_path)
    a = load_file(tiny / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_tiny_tokenizer_is_the_real_clip_one(tiny, shared_models):
    from transformers import CLIPTokenizer

    prompt = "a photo of a sks dog"
    real = CLIPTokenizer.from_pretrained(shared_models / "clip-tokenizer")
    ids = CLIPTokenizer.from_pretrained(tiny / "tokenizer")(prompt).input_ids
    assert ids == real(prompt).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407  # <|startoftext|> ... <|endoftext|>
    # The shipped copy is byte-identical to the shared one.
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (CLIP_TOKENIZER_DIR / name).read_bytes() == (shared_models / "clip-tokenizer" / name).read_bytes()


def test_resolve_tiny(settings, tiny):
    model = resolve_base_model("tiny", settings)
    assert (model.path, model.native_resolution, model.family, model.prediction_type, model.source) == (
        tiny, 64, "tiny", "epsilon", "builtin")


def test_resolve_local_folder(settings, tiny, tmp_path):
    folder = shutil.copytree(tiny, tmp_path / "my-model")
    model = resolve_base_model(str(folder), settings)
    assert (model.path, model.native_resolution, model.family, model.source) == (folder, 64, "tiny", "folder")


@pytest.mark.parametrize("ref", ["", "   "])
def test_empty_ref_is_invalid(settings, ref):
    with pytest.raises(InvalidArgument, match="`base_model` is empty"):
        resolve_base_model(ref, settings)


def test_folder_without_model_index_is_invalid(settings, tiny, tmp_path):
    folder = shutil.copytree(tiny, tmp_path / "broken")
    (folder / "model_index.json").unlink()
    shutil.rmtree(folder / "vae")
    with pytest.raises(InvalidArgument, match=r"`base_model`.*missing model_index.json, vae") as e:
        resolve_base_model(str(folder), settings)
    assert "save_pretrained" in e.value.message


def test_missing_path_is_invalid(settings, tmp_path):
    with pytest.raises(InvalidArgument, match="`base_model`.*neither an existing folder nor a hub id"):
        resolve_base_model(str(tmp_path / "nowhere" / "model"), settings)


def test_uncached_hub_id_offline_says_how_to_get_it(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(FailedPrecondition, match="not in the local Hugging Face cache") as e:
        resolve_base_model("persona-tests/no-such-model", settings)
    assert "hf download persona-tests/no-such-model" in e.value.message
    assert "local diffusers folder" in e.value.message


def test_cached_hub_snapshot_resolves(settings, tiny, tmp_path, monkeypatch):
    # A snapshot laid out the way huggingface_hub caches one: refs/main names the snapshot folder.
    cache = tmp_path / "hf-cache"
    repo = cache / "models--persona-tests--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny, repo / "snapshots" / ("0" * 40))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    model = resolve_base_model("persona-tests/tiny-sd", settings)
    assert (model.path, model.native_resolution, model.source) == (repo / "snapshots" / ("0" * 40), 64, "hub")


@pytest.mark.parametrize("family, expected", [("sd15", "sd15"), ("sd21-base", "sd21")])
def test_real_configs_are_512px(shared_models, family, expected):
    configs = read_model_configs(shared_models / "configs" / family)
    assert (configs.native_resolution, configs.family, configs.prediction_type) == (512, expected, "epsilon")


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("PERSONA_MODEL_CACHE", raising=False)
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "home"))
    assert TrainSettings.from_env().base_model_cache_dir == tmp_path / "home" / "models"
    monkeypatch.setenv("PERSONA_MODEL_CACHE", str(tmp_path / "cache"))
    assert TrainSettings.from_env().base_model_cache_dir == tmp_path / "cache"
    assert TrainSettings.from_env().download_base_models is False
