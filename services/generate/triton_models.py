"""The Triton python-backend models of a persona model repository, as plain classes.

The `model.py` files of `model_repository/` (copied into every generated repository) are one-line adapters over
these classes, so what runs inside Triton is ordinary, importable, reviewable code:

- `OnnxRuntimeComponent` serves one ONNX graph of a Stable Diffusion model (text encoder, UNet or VAE decoder)
  with ONNX Runtime, for Triton builds without a native onnxruntime backend (the `tritonserver` bundled in
  nvidia-pytriton has the python backend only). Its inputs and outputs are the graph's own, so NVIDIA's image
  can serve the same folder with `platform: "onnxruntime_onnx"` (or a TensorRT plan) and nothing else changes.
- `StableDiffusionPipelineModel` runs `sampling.sample_batch` — the same loop as the in-process engine — over
  the three component models, calling them through BLS (business logic scripting) requests.

`triton_python_backend_utils` exists only inside Triton's stub process, so it is imported where it is used, and
heavy packages are imported in `initialize` (Triton imports model.py twice, once only to read it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PIPELINE_MODEL = "sd_pipeline"
CONCEPTS_FOLDER = "concepts"  # sd_pipeline/concepts/<name>/<version>/: what each concept is made of
PIPELINE_FILE = "pipeline.json"  # in a concept's version folder: component model names, latent geometry

# Inputs and outputs of the pipeline model: one row per image; the scalars apply to every image of the request.
PIPELINE_INPUTS = (
    ("CONCEPT", "BYTES", [1]),  # which concept folder (persona writes them; see triton_repository)
    ("PROMPTS", "BYTES", [-1]),
    ("NEGATIVE_PROMPTS", "BYTES", [-1]),
    ("SEEDS", "INT64", [-1]),
    ("STEPS", "INT32", [1]),
    ("GUIDANCE_SCALE", "FP64", [1]),  # FP64: the scale drawn is exactly the scale reported
    ("SCHEDULER", "BYTES", [1]),
    ("HEIGHT", "INT32", [1]),
    ("WIDTH", "INT32", [1]),
)
PIPELINE_OUTPUTS = (("IMAGES", "UINT8", [-1, -1, -1, 3]),)  # [image, height, width, RGB]

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(double)": "float64"}


def _instance_device(args: dict) -> str:
    """'cuda:N' when Triton placed this instance on GPU N, else 'cpu'."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id') or 0)}"
    return "cpu"


def _error_response(pb_utils, error: Exception):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{type(error).__name__}: {error}"))


class OnnxRuntimeComponent:
    """One ONNX graph (`<version>/model.onnx`, external data beside it) under ONNX Runtime."""

    def initialize(self, args: dict) -> None:
        import numpy as np
        import onnxruntime as ort

        folder = Path(args["model_repository"]) / args["model_version"]
        path = folder / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: regenerate the model repository (persona writes it)")
        device = _instance_device(args)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])}))
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.inputs = {i.name: np.dtype(_ORT_TYPES.get(i.type, "float32")) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:  # exactly one response per request, errors included
            try:
                feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(dtype, copy=False)
                         for name, dtype in self.inputs.items()}
                wanted = list(request.requested_output_names()) or self.outputs
                results = self.session.run(wanted, feeds)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, value) for name, value in zip(wanted, results)]))
            except Exception as error:  # a bad request must not take the model down
                responses.append(_error_response(pb_utils, error))
        return responses

    def finalize(self) -> None:
        self.session = None


class BlsModels:
    """`sampling.SamplerModels` whose three parts are other Triton models, called through BLS requests."""

    def __init__(self, pipeline: dict, device: Any):
        self.device = device
        self.latent_channels = int(pipeline["latent_channels"])
        self.vae_scale_factor = int(pipeline["vae_scale_factor"])
        self.scaling_factor = float(pipeline["scaling_factor"])
        self.models = pipeline["models"]  # component → Triton model name

    def _call(self, component: str, inputs: dict, output: str):
        import torch
        import triton_python_backend_utils as pb_utils

        tensors = []
        for name, value in inputs.items():
            value = value.contiguous()
            if value.is_cuda:  # stays on the GPU: handed over by DLPack, no host copy
                tensors.append(pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value)))
            else:
                tensors.append(pb_utils.Tensor(name, value.numpy()))
        request = pb_utils.InferenceRequest(model_name=self.models[component], requested_output_names=[output],
                                            inputs=tensors)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{component} model {self.models[component]}: {response.error().message()}")
        result = pb_utils.get_output_tensor_by_name(response, output)
        if result.is_cpu():
            return torch.from_numpy(result.as_numpy()).to(self.device)
        return torch.from_dlpack(result.to_dlpack()).to(self.device)

    def encode_text(self, input_ids):
        return self._call("text_encoder", {"input_ids": input_ids.long()}, "last_hidden_state")

    def predict_noise(self, latents, timestep, text_embeddings):
        import torch

        # The graph takes one timestep per row (float32, so Euler's fractional timesteps fit too).
        timesteps = torch.full((latents.shape[0],), float(timestep), dtype=torch.float32, device=latents.device)
        return self._call("unet", {"sample": latents.float(), "timestep": timesteps,
                                   "encoder_hidden_states": text_embeddings.float()}, "out_sample")

    def decode(self, latents):
        return self._call("vae_decoder", {"latent_sample": latents.float()}, "sample")


class StableDiffusionPipelineModel:
    """Text → images for any concept of the repository: reads the concept's folder (component model names,
    tokenizer, scheduler), runs the shared sampling loop over BLS components, returns uint8 images."""

    def initialize(self, args: dict) -> None:
        import torch

        self.concepts_dir = Path(args["model_repository"]) / CONCEPTS_FOLDER
        self.device = torch.device(_instance_device(args))
        self._concepts: dict[str, tuple] = {}  # name → (version, models, tokenizer, scheduler config)

    def concept(self, name: str) -> tuple:
        """(models, tokenizer, scheduler config) of the newest version of concept `name`, cached per version."""
        from transformers import CLIPTokenizer

        folder = self.concepts_dir / name
        versions = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
        if "/" in name or not versions:
            raise KeyError(f"concept {name!r} is not in the model repository: load it through persona first")
        cached = self._concepts.get(name)
        if cached is None or cached[0] != versions[-1]:
            version_dir = folder / str(versions[-1])
            pipeline = json.loads((version_dir / PIPELINE_FILE).read_text())
            scheduler_config = json.loads((version_dir / "scheduler" / "scheduler_config.json").read_text())
            tokenizer = CLIPTokenizer.from_pretrained(version_dir / "tokenizer")
            cached = (versions[-1], BlsModels(pipeline, self.device), tokenizer, scheduler_config)
            self._concepts[name] = cached
        return cached[1:]

    def execute(self, requests: list) -> list:
        import numpy as np
        import triton_python_backend_utils as pb_utils

        from persona.services.generate import sampling

        responses = []
        for request in requests:
            try:
                get = lambda name: pb_utils.get_input_tensor_by_name(request, name)  # noqa: E731
                models, tokenizer, scheduler_config = self.concept(_column(get, "CONCEPT")[0])
                images = sampling.sample_batch(models, tokenizer, scheduler_config, settings_from_request(get))
                pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("IMAGES", pixels)]))
            except Exception as error:
                responses.append(_error_response(pb_utils, error))
        return responses


def _column(get_tensor, name: str) -> list:
    tensor = get_tensor(name)
    if tensor is None:
        raise ValueError(f"input {name} is missing")
    values = tensor.as_numpy().reshape(-1).tolist()
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]


def settings_from_request(get_tensor) -> list:
    """The batch of `SamplingSettings` a pipeline request asks for (`get_tensor(name)` → a Triton tensor)."""
    from persona.services.generate.sampling import SamplingSettings

    def column(name: str) -> list:
        return _column(get_tensor, name)

    prompts, negatives, seeds = column("PROMPTS"), column("NEGATIVE_PROMPTS"), column("SEEDS")
    if not len(prompts) == len(negatives) == len(seeds) or not prompts:
        raise ValueError(f"PROMPTS, NEGATIVE_PROMPTS and SEEDS need one row per image (got {len(prompts)}, "
                         f"{len(negatives)}, {len(seeds)})")
    shared = dict(steps=int(column("STEPS")[0]), guidance_scale=float(column("GUIDANCE_SCALE")[0]),
                  scheduler=str(column("SCHEDULER")[0]), height=int(column("HEIGHT")[0]),
                  width=int(column("WIDTH")[0]))
    return [SamplingSettings(prompt=p, negative_prompt=n, seed=int(s), **shared)
            for p, n, s in zip(prompts, negatives, seeds)]
