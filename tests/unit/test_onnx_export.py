"""ONNX export of a Stable Diffusion folder: three graphs that pass onnx.checker, equal torch at other batch sizes,
latent sizes and text lengths than traced, fp16 that loads and stays close, a self-contained folder, clear errors."""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from persona.services.models.onnx_export import (  # noqa: E402
    COMPONENTS, EXTERNAL_DATA_FILE, check_parity, export_pipeline_to_onnx, session)
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument  # noqa: E402

FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fp32_export(tiny_model, tmp_path_factory):
    progress = []
    export = export_pipeline_to_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "fp32",
                                     on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    return export


@pytest.fixture(scope="module")
def torch_modules(tiny_model):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return dict(
        text_encoder=CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").eval(),
        unet=UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval(),
        vae=AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").eval(),
    )


def _max_diff(want: torch.Tensor, have: np.ndarray) -> float:
    assert list(want.shape) == list(have.shape)
    return float(np.max(np.abs(want.detach().numpy() - have)))


def test_fp32_export_writes_checked_graphs_close_to_torch(fp32_export, tiny_model):
    out = fp32_export.out_dir
    assert set(fp32_export.components) == set(COMPONENTS)
    for name, component in fp32_export.components.items():
        assert component.path == out / name / "model.onnx" and component.path.exists()
        onnx.checker.check_model(str(component.path), full_check=True)
        assert component.max_abs_diff < FP32_TOLERANCE, (name, component.max_abs_diff)
        assert not component.fp16 and component.seconds > 0
        for file_name, digest in component.sha256.items():
            assert hashlib.sha256((component.path.parent / file_name).read_bytes()).hexdigest() == digest
    # The UNet's weights always go to one external data file; the small graphs stay single files.
    assert fp32_export.components["unet"].external_data == EXTERNAL_DATA_FILE
    assert (out / "unet" / EXTERNAL_DATA_FILE).stat().st_size > 0
    assert fp32_export.components["text_encoder"].external_data is None
    check_parity(fp32_export)  # default fp32 tolerance
    # Nothing left behind beside the output (the export is built in a hidden sibling and renamed).
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_manifest_and_copies_make_the_folder_self_contained(fp32_export, tiny_model):
    manifest = json.loads(fp32_export.manifest_path.read_text())
    vae_config = json.loads((tiny_model / "vae" / "config.json").read_text())
    assert manifest["opset"] == 17 and manifest["fp16"] is False
    assert manifest["scaling_factor"] == vae_config["scaling_factor"] == fp32_export.scaling_factor
    assert manifest["vae_scale_factor"] == 2 and manifest["latent_channels"] == 4
    scheduler = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    assert manifest["scheduler_config"] == scheduler
    assert json.loads((fp32_export.out_dir / manifest["scheduler"]).read_text()) == scheduler
    tokenizer_dir = fp32_export.out_dir / manifest["tokenizer"]
    assert {p.name for p in (tiny_model / "tokenizer").iterdir()} <= {p.name for p in tokenizer_dir.iterdir()}
    unet = manifest["components"]["unet"]
    assert unet["path"] == "unet/model.onnx" and unet["external_data"] == EXTERNAL_DATA_FILE
    assert unet["inputs"] == [
        {"name": "sample", "dtype": "float32", "shape": ["batch", 4, "height", "width"]},
        {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", "sequence", 32]},
    ]
    assert unet["outputs"][0]["name"] == "out_sample"
    text = manifest["components"]["text_encoder"]
    assert text["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert [o["name"] for o in text["outputs"]] == ["last_hidden_state", "pooler_output"]
    assert manifest["components"]["vae_decoder"]["outputs"][0]["shape"] == ["batch", 3, "height", "width"]
    for name, component in fp32_export.components.items():
        assert manifest["components"][name]["max_abs_diff"] == component.max_abs_diff
    # The tokenizer as copied is the one a runtime loads.
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(tokenizer_dir)("a photo of sks dog", padding="max_length",
                                                       max_length=manifest["max_text_length"]).input_ids
    assert len(ids) == 77


def test_unet_has_dynamic_batch_and_latent_size(fp32_export, torch_modules):
    unet_session = session(fp32_export.components["unet"].path)
    generator = torch.Generator().manual_seed(1)
    # 8x8 (traced at 3x3), a non-square 16x8 at batch 2, and an odd 7x9 the torch UNet also accepts.
    for batch, height, width in [(1, 8, 8), (2, 16, 8), (1, 7, 9)]:
        sample = torch.randn(batch, 4, height, width, generator=generator)
        timestep = torch.linspace(900, 10, batch)
        states = torch.randn(batch, 77, 32, generator=generator)
        (got,) = unet_session.run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                         "encoder_hidden_states": states.numpy()})
        with torch.no_grad():
            want = torch_modules["unet"](sample, timestep, states).sample
        assert _max_diff(want, got) < FP32_TOLERANCE, (batch, height, width)


def test_text_encoder_and_vae_have_dynamic_axes(fp32_export, torch_modules):
    ids = torch.randint(0, 49406, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[:, -1] = 49407  # eos: the pooled output is taken there
    hidden, pooled = session(fp32_export.components["text_encoder"].path).run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        want = torch_modules["text_encoder"](ids)
    assert _max_diff(want.last_hidden_state, hidden) < FP32_TOLERANCE
    assert _max_diff(want.pooler_output, pooled) < FP32_TOLERANCE

    latents = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(3))
    (image,) = session(fp32_export.components["vae_decoder"].path).run(None, {"latent_sample": latents.numpy()})
    with torch.no_grad():
        want = torch_modules["vae"].decode(latents).sample  # no scaling inside: latents are pre-divided
    assert image.shape == (2, 3, 32, 16)
    assert _max_diff(want, image) < FP32_TOLERANCE


def test_fp16_export_loads_keeps_float32_io_and_stays_close(tiny_model, tmp_path):
    export = export_pipeline_to_onnx(tiny_model, tmp_path / "fp16", fp16=True)
    assert export.fp16 and all(c.fp16 for c in export.components.values())
    for name, component in export.components.items():
        onnx.checker.check_model(str(component.path), full_check=True)
        assert np.isfinite(component.max_abs_diff) and component.max_abs_diff < 5e-2, (name, component.max_abs_diff)
        graph = onnx.load(str(component.path), load_external_data=False).graph
        # keep_io_types: callers feed float32 either way; the weights inside are float16.
        assert {i.type.tensor_type.elem_type for i in graph.input} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
        assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT}
    unet_graph = onnx.load(str(export.components["unet"].path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in unet_graph.graph.initializer)
    (out,) = session(export.components["unet"].path).run(None, {
        "sample": np.zeros((2, 4, 8, 16), np.float32), "timestep": np.array([500, 500], np.float32),
        "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)})
    assert out.dtype == np.float32 and out.shape == (2, 4, 8, 16) and np.isfinite(out).all()
    check_parity(export)  # default fp16 tolerance
    with pytest.raises(FailedPrecondition, match=r"differs from torch by more than 1e-09 \(fp16\): text_encoder"):
        check_parity(export, tolerance=1e-9)


def test_clear_errors(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(InvalidArgument, match="not a diffusers Stable Diffusion folder: missing unet/config.json"):
        export_pipeline_to_onnx(tmp_path, tmp_path / "out")
    with pytest.raises(InvalidArgument, match="`model_dir` .* is not a folder"):
        export_pipeline_to_onnx(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(InvalidArgument, match="`opset` is 11"):
        export_pipeline_to_onnx(tiny_model, tmp_path / "out", opset=11)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(FailedPrecondition, match="not empty: pass overwrite=True"):
        export_pipeline_to_onnx(tiny_model, taken)
    assert (taken / "keep.txt").exists()
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="no CUDA GPU"):
            export_pipeline_to_onnx(tiny_model, tmp_path / "out", device="cuda")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(FailedPrecondition, match="onnx/onnxruntime not installed .*pip install"):
        export_pipeline_to_onnx(tiny_model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
