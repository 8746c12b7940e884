"""The Triton python-backend models of a persona model repository, as plain classes.

The `model.py` files of `model_repository/` (copied into every generated repository) are one-line adapters over
these classes, so what runs inside Triton is ordinary, importable, reviewable code:

- `OnnxRuntimeComponent` serves one ONNX graph of a Stable Diffusion model (text encoder, UNet or VAE decoder)
  with ONNX Runtime, for Triton builds without a native onnxruntime backend (the `tritonserver` bundled in
  nvidia-pytriton has the python backend only). Its inputs and outputs are the graph's own, so NVIDIA's image
  can serve the same folder with `platform: "onnxruntime_onnx"` (or a TensorRT plan) and nothing else changes.
- `TorchComponent` serves the same component from the diffusers weights with torch (fp16 on CUDA, optionally
  replayed from CUDA graphs), speaking exactly the ONNX graph's inputs and outputs: the GPU path where the server
  has only the python backend and the machine only a CPU onnxruntime (the nvidia-pytriton bundle).
  As `p3s_unet` it is a p3s concept's UNet with the concept's condition attached per request from the request's
  p3s parameters (triton_p3s.py), which the pipeline forwards on each BLS call. As `customcontrast_unet` it is a
  customcontrast concept's UNet, text encoder and token table, one denoising step per call (triton_customcontrast.py).
- `StableDiffusionPipelineModel` runs `sampling.sample_ids` — the same loop as the in-process engine — over
  the three component models, calling them through BLS (business logic scripting) requests.

Tensors cross the python backend by DLPack only (`from_triton`, `to_triton`), never through its numpy bridge
(`as_numpy()`, `pb_utils.Tensor(name, ndarray)`), and no model has a BYTES tensor. The stub of the Triton 2.51
bundled in nvidia-pytriton (and NVIDIA's images of that age) was built with pybind11 2.10, which predates numpy 2's
ABI: under numpy ≥ 2 its numpy views of Triton's buffers read a dtype's itemsize as 0, so an INT64 input [1, 2, 3]
arrives as [1, 1, 1], outputs come back empty, and a BYTES input, which the stub deserialises through numpy as
soon as the request arrives, kills the stub (`unpack_from requires a buffer of at least 168430094 bytes`: the
length prefix 0x0A read four times). python_backend#384 (pybind11 2.12) fixed it upstream; DLPack never went
through that code, so this path works with numpy 1 and 2 and with every Triton since 2.1x. What is text (the
concept, the scheduler) travels as request parameters (`request.parameters()`, JSON), prompts as token ids.

`triton_python_backend_utils` exists only inside Triton's stub process, so it is imported where it is used, and
heavy packages are imported in `initialize` (Triton imports model.py twice, once only to read it).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Callable

from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.settings import parse_flag

from ..models.p3s.condition import WEIGHT_NAME as CONDITION_FILE  # in a p3s UNet's version folder
from .triton_customcontrast import CUSTOMCONTRAST_COMPONENT, STEP_INPUTS, STEP_OUTPUTS, ConceptSteps, ConceptUnet
from .triton_p3s import P3S_COMPONENT, ConditionedUnet, bls_parameters, p3s_parameters, parsed, refuse_p3s_parameters

PIPELINE_MODEL = "sd_pipeline"
CONCEPTS_FOLDER = "concepts"  # sd_pipeline/concepts/<name>/<version>/: what each concept is made of
PIPELINE_FILE = "pipeline.json"  # in a concept's version folder: component model names, latent geometry

# Inputs and outputs of the pipeline model: one row per image, token ids from the concept's own tokenizer (the
# caller tokenises: no text tensor crosses the python backend, see the module docstring).
PIPELINE_INPUTS = (
    ("PROMPT_IDS", "INT64", [-1, -1]),  # [image, tokenizer.model_max_length]
    ("NEGATIVE_IDS", "INT64", [-1, -1]),
    ("SEEDS", "INT64", [-1]),
)
# Request parameters of the pipeline model (tritonclient `parameters=`), shared by every image of the request:
# name → type. `concept` names the concept folder (persona writes them; see triton_repository); guidance_scale is
# a double, so the scale drawn is exactly the scale reported.
PIPELINE_PARAMETERS = {"concept": str, "scheduler": str, "steps": int, "guidance_scale": float, "height": int,
                       "width": int}
PIPELINE_OUTPUTS = (("IMAGES", "UINT8", [-1, -1, -1, 3]),)  # [image, height, width, RGB]

# A torch component: its diffusers subfolder (under the model's version folder) and the input and output names of
# the ONNX graph it stands in for (triton_repository writes its config.pbtxt with the same names).
TORCH_COMPONENTS = {
    "text_encoder": ("text_encoder", ("input_ids",), ("last_hidden_state", "pooler_output")),
    "unet": ("unet", ("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    "vae_decoder": ("vae", ("latent_sample",), ("sample",)),
}
# A p3s concept's UNet: the same graph's names, the condition file beside the weights (triton_p3s).
TORCH_COMPONENTS[P3S_COMPONENT] = TORCH_COMPONENTS["unet"]
# A customcontrast concept's UNet: one step per call, with the draw's token ids and location mask (its module says).
TORCH_COMPONENTS[CUSTOMCONTRAST_COMPONENT] = ("unet", ("sample", "timestep", *(n for n, _, _ in STEP_INPUTS)),
                                              ("out_sample", *(n for n, _, _ in STEP_OUTPUTS)))
UNET_COMPONENTS = ("unet", P3S_COMPONENT, CUSTOMCONTRAST_COMPONENT)
MAX_CUDA_GRAPHS = 8  # input shapes captured per model; more run eager (each graph keeps its own activations)

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(double)": "float64"}


def _instance_device(args: dict) -> str:
    """'cuda:N' when Triton placed this instance on GPU N, else 'cpu'."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id') or 0)}"
    return "cpu"


def _error_response(pb_utils, error: Exception):
    """A request's error: INVALID_ARG with the message alone for a bad request (it names the field), else the
    exception's type and message (INTERNAL)."""
    if isinstance(error, InvalidArgument):
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error), code)
                                          if code is not None else pb_utils.TritonError(str(error)))
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
        import torch
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:  # exactly one response per request, errors included
            try:
                # torch's numpy bridge, not the stub's (see the module docstring).
                feeds = {name: from_triton(_input_tensor(pb_utils, request, name), "cpu").numpy().astype(
                    dtype, copy=False) for name, dtype in self.inputs.items()}
                wanted = list(request.requested_output_names()) or self.outputs
                results = self.session.run(wanted, feeds)
                responses.append(pb_utils.InferenceResponse(
                    [to_triton(pb_utils, name, torch.from_numpy(value)) for name, value in zip(wanted, results)]))
            except Exception as error:  # a bad request must not take the model down
                responses.append(_error_response(pb_utils, error))
        return responses

    def finalize(self) -> None:
        self.session = None


class TorchComponent:
    """One component of a diffusers folder (`<version>/<subfolder>/`: config + safetensors) under torch, on the
    instance's device: fp16 on CUDA, fp32 on CPU, float32 inputs and outputs either way (the ONNX graph's)."""

    def initialize(self, args: dict) -> None:
        import torch

        parameters = _parameters(args)
        folder = Path(args["model_repository"]) / args["model_version"]
        component = parameters.get("component") or str(args.get("model_name", "")).rsplit("_", 1)[0]
        if component not in TORCH_COMPONENTS:
            raise ValueError(f"model {args.get('model_name')!r} has component {component!r}; set config.pbtxt "
                             f"parameter `component` to one of {', '.join(TORCH_COMPONENTS)} (persona writes it)")
        subfolder, self.inputs, self.outputs = TORCH_COMPONENTS[component]
        if not (folder / subfolder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / subfolder / 'config.json'} is missing: regenerate the model "
                                    "repository (persona writes it)")
        self.device = torch.device(_instance_device(args))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.module = _load_torch_component(component, folder / subfolder, dtype)
        self.module.to(self.device).eval().requires_grad_(False)
        self.forward: Callable = ConceptUnet(self.module, folder, dtype) if component == CUSTOMCONTRAST_COMPONENT \
            else _torch_forward(component, self.module, dtype)
        # A p3s UNet: the condition attached per request (its per-step features are no graph's: no capture).
        self.conditioned = ConditionedUnet(self.module, folder / CONDITION_FILE) if component == P3S_COMPONENT \
            else None
        graphs = parse_flag(parameters.get("cuda_graphs"), "cuda_graphs")  # config.pbtxt; unset: the UNet only
        graphs = component == "unet" if graphs is None else graphs
        if graphs and self.device.type == "cuda":
            self.forward = CudaGraphs(self.forward, self.device)

    def execute(self, requests: list) -> list:
        import torch
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:  # exactly one response per request, errors included
            try:
                inputs = [self._input(pb_utils, request, name) for name in self.inputs]
                if self.conditioned is not None:
                    self.conditioned.attach(request.parameters())
                wanted = list(request.requested_output_names()) or list(self.outputs)
                unknown = [name for name in wanted if name not in self.outputs]
                if unknown:
                    raise ValueError(f"no output {', '.join(unknown)}: this model has {', '.join(self.outputs)}")
                with torch.inference_mode():
                    results = dict(zip(self.outputs, self.forward(*inputs)))
                responses.append(pb_utils.InferenceResponse([to_triton(pb_utils, name, results[name])
                                                             for name in wanted]))
            except Exception as error:  # a bad request must not take the model down
                responses.append(_error_response(pb_utils, error))
        return responses

    def _input(self, pb_utils, request, name: str):
        return from_triton(_input_tensor(pb_utils, request, name), self.device)

    def finalize(self) -> None:
        if self.conditioned is not None:
            self.conditioned.detach()
        if isinstance(self.forward, ConceptUnet):
            self.forward.remove()
        self.module = self.forward = self.conditioned = None


def _parameters(args: dict) -> dict[str, str]:
    """The string parameters of a model's config.pbtxt, as Triton hands them to `initialize`."""
    config = json.loads(args.get("model_config") or "{}")
    return {key: str(value.get("string_value", "")) for key, value in (config.get("parameters") or {}).items()}


def _load_torch_component(component: str, folder: Path, dtype):
    if component == "text_encoder":
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(folder, dtype=dtype)
    if component in UNET_COMPONENTS:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype)
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)


def _torch_forward(component: str, module, dtype) -> Callable:
    """The ONNX graph of `component` as a torch function: device tensors in, a tuple of float32 outputs out."""
    if component == "text_encoder":
        def forward(input_ids):
            out = module(input_ids=input_ids.long(), return_dict=True)
            return out.last_hidden_state.float(), out.pooler_output.float()
    elif component in ("unet", P3S_COMPONENT):
        def forward(sample, timestep, encoder_hidden_states):
            # float32 timesteps (Euler's are fractional); diffusers embeds them in float32, then casts.
            out = module(sample.to(dtype), timestep.float(), encoder_hidden_states.to(dtype), return_dict=False)[0]
            return (out.float(),)
    else:
        def forward(latent_sample):  # vae.decode alone: the caller divides by scaling_factor
            return (module.decode(latent_sample.to(dtype), return_dict=False)[0].float(),)
    return forward


def _input_tensor(pb_utils, request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"input {name} is missing")
    return tensor


def from_triton(tensor, device=None):
    """A python-backend tensor as a torch tensor (on `device` when given), by DLPack: no host copy of GPU tensors,
    and none of the stub's numpy bridge (see the module docstring)."""
    import torch

    value = torch.from_dlpack(tensor.to_dlpack())
    return value if device is None else value.to(device)


def to_triton(pb_utils, name: str, value):
    """A torch tensor as a python-backend tensor, by DLPack (stays on its device)."""
    import torch

    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))


def _warn(message: str) -> None:
    """A warning in Triton's log where pb_utils.Logger exists (python backend ≥ 23.04), else Python logging."""
    try:
        import triton_python_backend_utils as pb_utils

        pb_utils.Logger.log_warn(message)
    except (ImportError, AttributeError):
        logging.getLogger("persona.generate.triton").warning(message)


class CudaGraphs:
    """`forward` replayed from one CUDA graph per input shape (kernel launches are what bounds a UNet step on a
    fast GPU: DESIGN measured 50 steps at 1.88 s eager, 0.53 s captured). Inputs are copied into the graph's
    static buffers, outputs cloned out (the next replay overwrites them). A capture that fails turns capture off
    for good and runs eager; so do shapes past `MAX_CUDA_GRAPHS`. Calls must come one at a time (Triton runs an
    instance's `execute` so)."""

    def __init__(self, forward: Callable, device, max_graphs: int = MAX_CUDA_GRAPHS):
        self.forward = forward
        self.device = device
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}  # input shapes and dtypes → (static inputs, static outputs, graph)
        self.enabled = True

    def __call__(self, *inputs):
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        captured = self.graphs.get(key)
        if captured is None:
            if not self.enabled or len(self.graphs) >= self.max_graphs:
                return self.forward(*inputs)
            captured = self._capture(inputs)
            if captured is None:
                return self.forward(*inputs)
            self.graphs[key] = captured
        static_inputs, static_outputs, graph = captured
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return tuple(out.clone() for out in static_outputs)

    def _capture(self, inputs) -> tuple | None:
        import torch

        try:
            with torch.cuda.device(self.device):  # torch.cuda.graph captures on the current device
                static_inputs = [t.to(self.device).clone() for t in inputs]
                # Warm-up on a side stream (PyTorch's recipe): lazy initialisation and cuDNN/cuBLAS choices
                # happen outside the capture.
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self.forward(*static_inputs)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads of the stub process may use CUDA meanwhile.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    static_outputs = tuple(self.forward(*static_inputs))
            return static_inputs, static_outputs, graph
        except Exception as error:  # eager still gives the same images, only slower
            self.enabled = False
            self.graphs.clear()
            _warn(f"CUDA graph capture failed for inputs {[tuple(t.shape) for t in inputs]} "
                  f"({type(error).__name__}: {error}); running eager from now on")
            return None


class BlsModels:
    """`sampling.SamplerModels` whose three parts are other Triton models, called through BLS requests."""

    def __init__(self, pipeline: dict, device: Any):
        self.device = device
        self.latent_channels = int(pipeline["latent_channels"])
        self.vae_scale_factor = int(pipeline["vae_scale_factor"])
        self.scaling_factor = float(pipeline["scaling_factor"])
        self.models = pipeline["models"]  # component → Triton model name
        self.p3s_photos = int((pipeline.get("p3s") or {}).get("photos", 0))  # a p3s concept's photos, else 0
        self.customcontrast = bool(pipeline.get("customcontrast"))  # its UNet takes one step's ids and mask
        self.unet_parameters: dict = {}  # sent with each UNet call (a p3s draw's settings)

    def drawing(self, given: dict, concept: str) -> "BlsModels":
        """These models for one request with parameters `given`: a p3s concept's checked settings forwarded to its
        UNet on every call (triton_p3s); p3s settings for any other concept refused by name."""
        if not self.p3s_photos:
            refuse_p3s_parameters(given, concept)
            return self
        drawing = copy.copy(self)
        drawing.unet_parameters = bls_parameters(p3s_parameters(given, self.p3s_photos))
        return drawing

    def call(self, component: str, inputs: dict, output: str | tuple[str, ...]):
        """Output `output` (or each of a tuple) of `component`'s model for `inputs`, on this model's device."""
        import triton_python_backend_utils as pb_utils

        tensors = [to_triton(pb_utils, name, value) for name, value in inputs.items()]  # GPU tensors stay there
        extra = {"parameters": self.unet_parameters} if component == "unet" and self.unet_parameters else {}
        names = [output] if isinstance(output, str) else list(output)
        request = pb_utils.InferenceRequest(model_name=self.models[component], requested_output_names=names,
                                            inputs=tensors, **extra)
        response = request.exec()
        if response.has_error():
            if response.error().code() == getattr(pb_utils.TritonError, "INVALID_ARG", None):
                raise InvalidArgument(response.error().message())
            raise RuntimeError(f"{component} model {self.models[component]}: {response.error().message()}")
        found = [from_triton(pb_utils.get_output_tensor_by_name(response, name), self.device) for name in names]
        return found[0] if isinstance(output, str) else tuple(found)

    def encode_text(self, input_ids):
        return self.call("text_encoder", {"input_ids": input_ids.long()}, "last_hidden_state")

    def predict_noise(self, latents, timestep, text_embeddings):
        import torch

        # The graph takes one timestep per row (float32, so Euler's fractional timesteps fit too).
        timesteps = torch.full((latents.shape[0],), float(timestep), dtype=torch.float32, device=latents.device)
        return self.call("unet", {"sample": latents.float(), "timestep": timesteps,
                                   "encoder_hidden_states": text_embeddings.float()}, "out_sample")

    def decode(self, latents):
        return self.call("vae_decoder", {"latent_sample": latents.float()}, "sample")


class StableDiffusionPipelineModel:
    """Token ids → images for any concept of the repository: reads the concept's folder (component model names,
    scheduler), runs the shared sampling loop over BLS components, returns uint8 images. The caller tokenises with
    the concept's tokenizer (its folder keeps one for that)."""

    def initialize(self, args: dict) -> None:
        import torch

        self.concepts_dir = Path(args["model_repository"]) / CONCEPTS_FOLDER
        self.device = torch.device(_instance_device(args))
        self._concepts: dict[str, tuple] = {}  # name → (version, models, scheduler config)

    def concept(self, name: str) -> tuple:
        """(models, scheduler config) of the newest version of concept `name`, cached per version."""
        from persona.services.generate import sampling

        folder = self.concepts_dir / name
        versions = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
        if "/" in name or not versions:
            raise KeyError(f"concept {name!r} is not in the model repository: load it through persona first")
        cached = self._concepts.get(name)
        if cached is None or cached[0] != versions[-1]:
            version_dir = folder / str(versions[-1])
            pipeline = json.loads((version_dir / PIPELINE_FILE).read_text())
            cached = (versions[-1], BlsModels(pipeline, self.device), sampling.scheduler_config(version_dir))
            self._concepts[name] = cached
        return cached[1:]

    def execute(self, requests: list) -> list:
        import torch
        import triton_python_backend_utils as pb_utils

        from persona.services.generate import sampling

        responses = []
        for request in requests:
            try:
                given = parsed(request.parameters())
                parameters = request_parameters(given)
                concept = parameters.pop("concept")
                models, scheduler_config = self.concept(concept)
                models = models.drawing(given, concept)
                loop = sampling.LoopSettings(**parameters)
                tensor = lambda name: from_triton(_input_tensor(pb_utils, request, name), "cpu")  # noqa: E731
                prompt_ids, negative_ids, seeds = tensor("PROMPT_IDS"), tensor("NEGATIVE_IDS"), tensor("SEEDS")
                if not prompt_ids.ndim == negative_ids.ndim == 2 or not (
                        len(prompt_ids) == len(negative_ids) == len(seeds) > 0):
                    raise ValueError("PROMPT_IDS and NEGATIVE_IDS ([image, token]) and SEEDS ([image]) need one row "
                                     f"per image (got {list(prompt_ids.shape)}, {list(negative_ids.shape)}, "
                                     f"{list(seeds.shape)})")
                if models.customcontrast:  # the plain loop: each step's mask comes from the one before
                    models = ConceptSteps(models, prompt_ids.to(self.device), negative_ids.to(self.device))
                pixels = torch.from_numpy(sampling.sample_ids(models, scheduler_config, loop, prompt_ids, negative_ids,
                                                              [int(s) for s in seeds.tolist()],
                                                              static=not isinstance(models, ConceptSteps)))
                responses.append(pb_utils.InferenceResponse([to_triton(pb_utils, "IMAGES", pixels)]))
            except Exception as error:
                responses.append(_error_response(pb_utils, error))
        return responses


def request_parameters(raw: str | dict) -> dict:
    """The `PIPELINE_PARAMETERS` of a pipeline request (`request.parameters()`: a JSON object), typed and checked;
    a missing or mistyped one is an error naming it."""
    given = json.loads(raw or "{}") if isinstance(raw, str) else dict(raw)
    values = {}
    for name, kind in PIPELINE_PARAMETERS.items():
        value = given.get(name)
        what = {str: "a string", int: "an integer", float: "a number"}[kind]
        if value is None:
            raise ValueError(f"request parameter `{name}` is missing: send {what} (persona's TritonEngine does)")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ValueError(f"request parameter `{name}` is {value!r}: send {what}")
        values[name] = value
    return values
