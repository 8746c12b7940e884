"""The ONNX export as a folder diffusers' `OnnxStableDiffusionPipeline.from_pretrained` loads, beside persona's own
graphs: `model_index.json`, and a text encoder taking the int32 `input_ids` that pipeline feeds.

persona.s graphs (onnx_export.py) take int64 `input_ids`, as Triton's configs and the sampler expect;
diffusers casts them to int32 (`pipeline_onnx_stable_diffusion._encode_prompt`) and ONNX Runtime refuses a graph
whose input type differs. So the export keeps persona's text encoder under `text_encoder_int64/` (the manifest's
component path says so, and every persona reader follows that path), and `text_encoder/` holds the same graph with
an int32 input cast to int64 in front: the same outputs for every token id (ids < 2^31), one text encoder more on
disk (≈ 0.5 GB for SD-1.5 in fp32, an eighth of the export). The UNet, VAE decoder, tokenizer and scheduler are
shared. The pipeline also needs a VAE encoder (image-to-image; persona serves none): `vae_encoder/model.onnx` is
the VAE's encoder and quant_conv returning the latent distribution's mean, fp32 (a fraction of the VAE's size).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .onnx_export import MANIFEST

MODEL_INDEX = "model_index.json"
# What diffusers loads (int32 input_ids) and where persona's own text encoder (int64) is kept.
DIFFUSERS_TEXT_ENCODER, PERSONA_TEXT_ENCODER = "text_encoder", "text_encoder_int64"
_CAST_OUTPUT = "input_ids_int64"


def add_diffusers_layout(export_dir: Path, model_dir: Path, opset: int = 17) -> None:
    """Turns a persona ONNX export folder into one diffusers also loads (see the module docstring); idempotent.
    `model_dir`: the diffusers folder the export was made from (its VAE gives the encoder)."""
    import diffusers

    manifest_path = export_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    component = manifest["components"]["text_encoder"]
    if Path(component["path"]).parent.name != PERSONA_TEXT_ENCODER:
        shutil.move(str(export_dir / Path(component["path"]).parent), str(export_dir / PERSONA_TEXT_ENCODER))
        component["path"] = f"{PERSONA_TEXT_ENCODER}/{Path(component['path']).name}"
    source = export_dir / component["path"]
    int32_text_encoder(source, export_dir / DIFFUSERS_TEXT_ENCODER / "model.onnx",
                       external_data=component.get("external_data"))

    if not (export_dir / "vae_encoder" / "model.onnx").exists():
        vae_encoder_graph(model_dir, export_dir / "vae_encoder" / "model.onnx", opset)
    scheduler = manifest.get("scheduler_config") or json.loads((export_dir / "scheduler" /
                                                                "scheduler_config.json").read_text())
    index = {
        "_class_name": "OnnxStableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae_encoder": ["diffusers", "OnnxRuntimeModel"],
        "vae_decoder": ["diffusers", "OnnxRuntimeModel"],
        "text_encoder": ["diffusers", "OnnxRuntimeModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "OnnxRuntimeModel"],
        "scheduler": ["diffusers", scheduler.get("_class_name", "DDIMScheduler")],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (export_dir / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    manifest["diffusers_layout"] = {
        "loads_with": "diffusers.OnnxStableDiffusionPipeline.from_pretrained(folder)",
        "model_index": MODEL_INDEX,
        "text_encoder": f"{DIFFUSERS_TEXT_ENCODER}/model.onnx (int32 input_ids, cast to int64 in the graph)",
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def int32_text_encoder(source: Path, target: Path, external_data: str | None = None) -> Path:
    """`source` (input_ids int64) rewritten with an int32 `input_ids` and a Cast to int64 before its first use."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(source))  # external data, if any, is read from beside it
    graph = model.graph
    [ids] = [i for i in graph.input if i.name == "input_ids"]
    ids.type.tensor_type.elem_type = TensorProto.INT32
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == "input_ids":
                node.input[k] = _CAST_OUTPUT
    graph.node.insert(0, helper.make_node("Cast", ["input_ids"], [_CAST_OUTPUT], to=TensorProto.INT64,
                                          name="persona_input_ids_int32_to_int64"))
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data)
    else:
        onnx.save_model(model, str(target))
    return target


def vae_encoder_graph(model_dir: Path, target: Path, opset: int = 17) -> Path:
    """The VAE encoder of `model_dir` as ONNX: `sample` [batch, 3, height, width] in [-1, 1] → `latent_sample`
    (the mean of the latent distribution, unscaled), as diffusers' ONNX image-to-image pipeline reads it."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, sample):
            return self.vae.encode(sample).latent_dist.mode()  # the mean: deterministic, no sampling op

    side = 8 * 2 ** (len(vae.config.block_out_channels) - 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Encoder(), (torch.zeros(1, vae.config.in_channels, side, side),), str(target),
                          input_names=["sample"], output_names=["latent_sample"], opset_version=opset,
                          dynamic_axes={"sample": {0: "batch", 2: "height", 3: "width"},
                                        "latent_sample": {0: "batch", 2: "latent_height", 3: "latent_width"}},
                          dynamo=False)
    return target
