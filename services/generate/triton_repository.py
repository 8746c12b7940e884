"""A Triton model repository of persona models, written from their ONNX exports or diffusers folders.

Layout under `root` (what `tritonserver --model-repository` serves):

    text_encoder_<digest>/config.pbtxt, 1/model.onnx             one Triton model per component graph, named by
    unet_<digest>/config.pbtxt, 1/model.onnx, 1/model.onnx.data   the content of its files: concepts trained on
    vae_decoder_<digest>/config.pbtxt, 1/model.onnx              one base share its text encoder and VAE (a LoRA
                                                                 concept adds only its UNet); re-exports reuse them
    sd_pipeline/config.pbtxt, 1/model.py                         the one pipeline model: prompts → images for any
    sd_pipeline/concepts/<name>/<version>/                       concept, whose folder names its component models
        pipeline.json, tokenizer/, scheduler/                    (a changed concept gets a new version folder)

Why one pipeline model rather than one per concept: a python model costs a process that imports torch and
transformers (seconds); with one shared pipeline, hot-loading a LoRA concept is loading its UNet graph and
nothing else. Triton reads only the numbered folder of `sd_pipeline`, so `concepts/` beside it is persona's.

A component is served (`component_backend`) by the python backend running ONNX Runtime (`<version>/model.py`
beside the graph; "python"), natively by the `onnxruntime_onnx` platform where the server has it ("onnxruntime",
NVIDIA's image), or by the python backend running torch on the diffusers weights ("torch": the way to use a GPU
with the `tritonserver` bundled in nvidia-pytriton, whose machines may have only a CPU onnxruntime). A torch
component takes the concept's diffusers folder instead of its ONNX export:

    unet_<digest>/config.pbtxt, 1/model.py, 1/unet/config.json, 1/unet/diffusion_pytorch_model.safetensors
    (text_encoder_<digest>/1/text_encoder/…, vae_decoder_<digest>/1/vae/…)

and speaks exactly the ONNX graphs' inputs and outputs, so the pipeline model is the same for every backend. The
pipeline is a python model running the shared sampling loop; it calls the components through BLS.

A p3s concept (torch components only) has its base model's components but for the UNet, which is
`p3s_unet_<digest>`: the base UNet's files plus the concept's `p3s_condition.safetensors`, served by the same torch
adapter with the condition attached per request (triton_p3s.py); its pipeline.json says how many photos it has.
A customcontrast concept (torch components only) likewise has `customcontrast_unet_<digest>` for its UNet: the base
UNet's and text encoder's files, the tokenizer and the concept's two files, one denoising step per call
(triton_customcontrast.py); its pipeline.json names the identifier and N_t.

Graphs and weights are hard-linked from the export where the filesystem allows (GBs are not copied), and every
model or version folder is written beside the repository and renamed into place, so Triton never reads half a
model.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from persona.services.runtime.artifacts import file_sha256
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

from .triton_config import TensorSpec, model_config
from ..models.customcontrast.concept import TOKENS_FILE, VISUAL_KV_FILE, read_prompt_slots
from ..models.p3s.condition import WEIGHT_NAME as CONDITION_FILE, read_summary
from .triton_customcontrast import CUSTOMCONTRAST_COMPONENT, STEP_INPUTS, STEP_OUTPUTS, TOKENIZER_FOLDER
from .triton_models import (CONCEPTS_FOLDER, PIPELINE_FILE, PIPELINE_INPUTS, PIPELINE_MODEL, PIPELINE_OUTPUTS,
                            TORCH_COMPONENTS)
from .triton_p3s import P3S_COMPONENT

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
# How components are served: python = ONNX Runtime inside a python-backend model; onnxruntime = Triton's
# native onnxruntime backend (NVIDIA's image); torch = torch on the diffusers weights inside a python-backend model;
# tensorrt = TensorRT engines (tensorrt_build.py) on Triton's native tensorrt backend (NVIDIA's image).
COMPONENT_BACKENDS = ("python", "onnxruntime", "torch", "tensorrt")
# Native platforms: Triton runs these components itself, no model.py.
NATIVE_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
TEMPLATES = {"pipeline": "sd_pipeline", "python": "onnxruntime_component", "torch": "torch_component"}
_DTYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class RepositoryEntry:
    """A pipeline in the repository: its Triton model name, newest version and component model names."""

    name: str
    version: int
    components: dict[str, str]
    native_resolution: int
    p3s_photos: int = 0  # a p3s concept's photos (its UNet takes the p3s request parameters), else 0


@dataclass(frozen=True)
class _Component:
    """One component model to write, whatever the source layout: its content digest (the model name's suffix),
    the files it is made of (source → path under the version folder) and its inputs and outputs."""

    component: str
    digest: str
    files: tuple[tuple[Path, str], ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class _Source:
    """What `TritonRepository.add` reads from an ONNX export or a diffusers folder: the three components and the
    latent geometry the pipeline needs (latent_channels, vae_scale_factor, scaling_factor, native_resolution)."""

    components: dict[str, _Component]
    geometry: dict


def model_name(key: str) -> str:
    """A Triton model name for an engine key (concept ids pass through; anything else is made safe)."""
    safe = _UNSAFE.sub("_", key).strip("._-")
    if safe == key and safe:
        return safe
    return f"{safe[:40] or 'model'}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def template(name: str) -> str:
    """The text of a checked-in model.py adapter (model_repository/<name>/model.py)."""
    return (resources.files("persona.model_repository") / name / "model.py").read_text(encoding="utf-8")


class TritonRepository:
    """Writes and prunes the persona part of one model repository folder."""

    def __init__(self, root: Path, *, component_backend: str = "python", instance_kind: str = "KIND_CPU",
                 pipeline_instances: int = 1):
        if component_backend not in COMPONENT_BACKENDS:
            raise InvalidArgument(f"`component_backend` is {component_backend!r}: use one of "
                                  f"{', '.join(COMPONENT_BACKENDS)}")
        self.root = Path(root)
        self.component_backend = component_backend
        self.instance_kind = instance_kind
        self.pipeline_instances = pipeline_instances
        self.root.mkdir(parents=True, exist_ok=True)
        self._concepts = self.root / PIPELINE_MODEL / CONCEPTS_FOLDER

    # -- writing

    def add(self, name: str, export_dir: Path, condition: Path | None = None) -> RepositoryEntry:
        """Puts concept `name` in the repository — from its ONNX export `export_dir` (onnx_export's layout), or
        with the torch backend from its diffusers folder — writing only the component models that are not there
        yet and a new concept version only when something changed. `condition`: a p3s concept's condition file or
        a customcontrast concept's tokens file (its K'/V' file beside it), `export_dir` then being its base model's
        diffusers folder (torch components only). Returns the entry whose component models (and `sd_pipeline`) must
        be loaded."""
        export_dir = Path(export_dir)
        customcontrast = condition is not None and Path(condition).name == TOKENS_FILE
        if condition is not None and self.component_backend != "torch":
            what = ("a customcontrast concept, whose tokens feed the UNet's cross-attention at every step"
                    if customcontrast else "a p3s concept, whose condition branch runs beside the UNet at every step")
            raise FailedPrecondition(
                f"concept {name} is {what}: only torch components hold it, and this repository's are "
                f"{self.component_backend}; set PERSONA_TRITON_COMPONENT_BACKEND=torch (or draw it with "
                "PERSONA_GENERATE_ENGINE=embedded)")
        photos, extra = 0, {}
        if self.component_backend == "torch":
            source = _diffusers_source(export_dir)
            if customcontrast:
                identifier, count = read_prompt_slots(condition)
                extra["customcontrast"] = {"identifier": identifier, "num_text_tokens": count}
                source.components["unet"] = _customcontrast_unet(source, export_dir, Path(condition))
            elif condition is not None:
                photos = read_summary(condition)[0]
                source.components["unet"] = _p3s_unet(source.components["unet"], Path(condition))
        elif self.component_backend == "tensorrt":
            source = _tensorrt_source(export_dir)
        else:
            source = _onnx_source(export_dir)
        components = {c: self._add_component(source.components[c]) for c in COMPONENTS}
        pipeline = {
            "models": components,
            **source.geometry,
            "tokenizer_and_scheduler": _digest_tree(export_dir, ("tokenizer", "scheduler")),
            **extra,
        }
        if photos:
            pipeline["p3s"] = {"photos": photos}
        current = self.entry(name)
        if current is not None and _read_json(self._concepts / name / str(current.version) / PIPELINE_FILE) == pipeline:
            return current
        version = 1 if current is None else current.version + 1
        self._write_pipeline(name, version, export_dir, pipeline)
        return RepositoryEntry(name, version, components, int(pipeline["native_resolution"]), photos)

    def _add_component(self, spec: _Component) -> str:
        name = f"{spec.component}_{spec.digest}"
        if (self.root / name / "config.pbtxt").is_file():
            return name

        def write(staging: Path) -> None:
            version = staging / "1"
            version.mkdir(parents=True)
            for source, relative in spec.files:  # the graph and its external data, or a diffusers subfolder
                (version / relative).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(source, version / relative)
            if self.component_backend not in NATIVE_PLATFORMS:
                (version / "model.py").write_text(template(TEMPLATES[self.component_backend]))
            (staging / "config.pbtxt").write_text(model_config(
                name, list(spec.inputs), list(spec.outputs),
                platform=NATIVE_PLATFORMS.get(self.component_backend),
                instance_kind=self.instance_kind, parameters=self._parameters(spec.component)))

        self._publish(self.root / name, write)
        return name

    def _parameters(self, component: str) -> dict[str, str] | None:
        """config.pbtxt parameters of a component model (read by triton_models.TorchComponent)."""
        if self.component_backend != "torch":
            return None
        parameters = {"component": component}
        if component in ("unet", P3S_COMPONENT, CUSTOMCONTRAST_COMPONENT):
            # Ignored on CPU instances; "0" turns capture off, as a p3s or customcontrast UNet needs (per-step state).
            parameters["cuda_graphs"] = "1" if component == "unet" else "0"
        if self.instance_kind == "KIND_GPU":
            # The python backend copies inputs to the host unless told otherwise; torch wants them where they are.
            parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
        return parameters

    def _write_pipeline(self, name: str, version: int, export_dir: Path, pipeline: dict) -> None:
        self.ensure_pipeline_model()

        def write_version(staging: Path) -> None:
            staging.mkdir(parents=True)
            (staging / PIPELINE_FILE).write_text(json.dumps(pipeline, indent=2, sort_keys=True) + "\n")
            shutil.copytree(export_dir / "tokenizer", staging / "tokenizer")
            shutil.copytree(export_dir / "scheduler", staging / "scheduler")

        folder = self._concepts / name
        folder.mkdir(parents=True, exist_ok=True)
        self._publish(folder / str(version), write_version)
        for old in _versions(folder):
            if old != version:
                shutil.rmtree(folder / str(old), ignore_errors=True)

    def ensure_pipeline_model(self) -> None:
        """Writes the shared `sd_pipeline` model (config + model.py) unless it is there and current."""
        config = model_config(PIPELINE_MODEL, [TensorSpec(*t) for t in PIPELINE_INPUTS],
                              [TensorSpec(*t) for t in PIPELINE_OUTPUTS], instance_kind=self.instance_kind,
                              instance_count=self.pipeline_instances)
        code = template(TEMPLATES["pipeline"])
        folder = self.root / PIPELINE_MODEL
        if (folder / "config.pbtxt").is_file() and (folder / "config.pbtxt").read_text() == config and \
                (folder / "1" / "model.py").is_file() and (folder / "1" / "model.py").read_text() == code:
            return
        (folder / "1").mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "1" / "model.py", code)
        _atomic_write(folder / "config.pbtxt", config)

    def _publish(self, target: Path, write) -> None:
        """Runs `write(staging)` in a temporary folder beside the repository, then renames it to `target`."""
        scratch = Path(tempfile.mkdtemp(prefix=".persona-staging-", dir=self.root.parent))
        try:
            staging = scratch / target.name
            write(staging)
            if target.exists():  # a half-written leftover of a crash (complete ones are skipped by the callers)
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- reading and pruning

    def entry(self, name: str) -> RepositoryEntry | None:
        """The newest version of concept `name`, or None when the repository has none."""
        versions = _versions(self._concepts / name)
        if not versions:
            return None
        pipeline = _read_json(self._concepts / name / str(versions[-1]) / PIPELINE_FILE)
        if pipeline is None:
            return None
        return RepositoryEntry(name, versions[-1], dict(pipeline["models"]), int(pipeline["native_resolution"]),
                               int((pipeline.get("p3s") or {}).get("photos", 0)))

    def entries(self) -> list[RepositoryEntry]:
        if not self._concepts.is_dir():
            return []
        found = (self.entry(p.name) for p in sorted(self._concepts.iterdir()) if p.is_dir())
        return [e for e in found if e is not None]

    def remove(self, name: str) -> list[str]:
        """Deletes concept `name` and returns the component models no other concept uses (deleted too): unload
        them from Triton first, or with them."""
        entry = self.entry(name)
        shutil.rmtree(self._concepts / name, ignore_errors=True)
        if entry is None:
            return []
        in_use = {m for e in self.entries() for m in e.components.values()}
        orphans = [m for m in entry.components.values() if m not in in_use]
        for model in orphans:
            shutil.rmtree(self.root / model, ignore_errors=True)
        return orphans


def _tensor(spec: dict) -> TensorSpec:
    dims = [d if isinstance(d, int) else -1 for d in spec["shape"]]
    if spec["dtype"] not in _DTYPES:
        raise FailedPrecondition(f"the ONNX export has an input/output {spec['name']} of dtype {spec['dtype']}, which "
                                 "the repository writer does not know: re-export with this persona version")
    return TensorSpec(spec["name"], _DTYPES[spec["dtype"]], dims)


def _digest(sha256_by_file: dict[str, str]) -> str:
    """A component's content digest (16 hex digits) from the sha256 of each of its files."""
    return hashlib.sha256(json.dumps(sha256_by_file, sort_keys=True).encode()).hexdigest()[:16]


def _onnx_source(export_dir: Path) -> _Source:
    return _manifest_source(export_dir, _read_manifest(export_dir))


def _tensorrt_source(export_dir: Path) -> _Source:
    """A tensorrt_build folder: one model.plan per component, with the ONNX graphs' inputs and outputs."""
    manifest = _read_json(export_dir / "manifest.json")
    if manifest is None or manifest.get("format") != "persona-tensorrt-stable-diffusion":
        raise FailedPrecondition(f"{export_dir} is not a persona TensorRT export (no manifest.json of that format): "
                                 "export the concept with `persona-cli export CONCEPT --format tensorrt`")
    return _manifest_source(export_dir, manifest)


def _manifest_source(export_dir: Path, manifest: dict) -> _Source:
    """Components as an export's manifest lists them (ONNX graphs or TensorRT plans: same schema)."""
    components = {}
    for component in COMPONENTS:
        spec = manifest["components"][component]
        folder = export_dir / Path(spec["path"]).parent
        components[component] = _Component(
            component, _digest(spec["sha256"]),
            tuple((folder / file, file) for file in spec["sha256"]),  # model.onnx and its external data, if any
            tuple(_tensor(t) for t in spec["inputs"]), tuple(_tensor(t) for t in spec["outputs"]))
    geometry = {
        "latent_channels": manifest["latent_channels"],
        "vae_scale_factor": manifest["vae_scale_factor"],
        "scaling_factor": manifest["scaling_factor"],
        "native_resolution": manifest.get("native_resolution", 512),
    }
    return _Source(components, geometry)


def _diffusers_source(folder: Path) -> _Source:
    """A diffusers Stable Diffusion folder as torch components: every file of a component's subfolder (config and
    weights, hashed once per process: `file_sha256`), and the ONNX graphs' inputs and outputs with sizes from the
    configs."""
    configs = _read_diffusers_configs(folder)
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    cross_dim = unet.get("cross_attention_dim", text["hidden_size"])
    if isinstance(cross_dim, (list, tuple)):  # per-block widths; one text encoder feeds them all
        cross_dim = cross_dim[0] if len(set(cross_dim)) == 1 else -1
    hidden = int(text["hidden_size"])
    latent_channels = int(unet.get("in_channels", 4))
    io = {
        "text_encoder": ([TensorSpec("input_ids", "INT64", [-1, -1])],
                         [TensorSpec("last_hidden_state", "FP32", [-1, -1, hidden]),
                          TensorSpec("pooler_output", "FP32", [-1, hidden])]),
        "unet": ([TensorSpec("sample", "FP32", [-1, latent_channels, -1, -1]),
                  TensorSpec("timestep", "FP32", [-1]),
                  TensorSpec("encoder_hidden_states", "FP32", [-1, -1, int(cross_dim)])],
                 [TensorSpec("out_sample", "FP32", [-1, int(unet.get("out_channels", latent_channels)), -1, -1])]),
        "vae_decoder": ([TensorSpec("latent_sample", "FP32", [-1, int(vae.get("latent_channels", 4)), -1, -1])],
                        [TensorSpec("sample", "FP32", [-1, int(vae.get("out_channels", 3)), -1, -1])]),
    }
    components = {}
    for component in COMPONENTS:
        subfolder, inputs, outputs = TORCH_COMPONENTS[component]
        inputs_, outputs_ = io[component]
        assert [t.name for t in inputs_] == list(inputs) and [t.name for t in outputs_] == list(outputs)
        files = sorted(p for p in (folder / subfolder).rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        relative = {p: p.relative_to(folder / subfolder).as_posix() for p in files}
        components[component] = _Component(
            component, _digest({relative[p]: file_sha256(p) for p in files}),
            tuple((p, f"{subfolder}/{relative[p]}") for p in files), tuple(inputs_), tuple(outputs_))
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)  # each VAE block after the first halves the image
    sample_size = unet["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = max(sample_size)
    geometry = {
        "latent_channels": latent_channels,
        "vae_scale_factor": vae_scale_factor,
        "scaling_factor": float(vae.get("scaling_factor", 0.18215)),  # diffusers' default for configs without it
        "native_resolution": int(sample_size) * vae_scale_factor,
    }
    return _Source(components, geometry)


def _p3s_unet(unet: _Component, condition: Path) -> _Component:
    """A p3s concept's UNet component: the base UNet's files and the condition file, named by both."""
    digest = _digest({"unet": unet.digest, CONDITION_FILE: file_sha256(condition)})
    return _Component(P3S_COMPONENT, digest, (*unet.files, (condition, CONDITION_FILE)), unet.inputs, unet.outputs)


def _customcontrast_unet(source: _Source, folder: Path, tokens: Path) -> _Component:
    """A customcontrast concept's UNet component: the base UNet's and text encoder's files, the tokenizer and the
    concept's two files, named by all of them; the plain UNet's inputs and outputs plus one step's (STEP_INPUTS)."""
    unet, text = source.components["unet"], source.components["text_encoder"]
    tokenizer = sorted(p for p in (folder / TOKENIZER_FOLDER).rglob("*") if p.is_file() and not p.name.startswith("."))
    own = [(p, f"{TOKENIZER_FOLDER}/{p.relative_to(folder / TOKENIZER_FOLDER).as_posix()}") for p in tokenizer]
    own += [(tokens, TOKENS_FILE), (tokens.parent / VISUAL_KV_FILE, VISUAL_KV_FILE)]
    digest = _digest({"unet": unet.digest, "text_encoder": text.digest, **{n: file_sha256(p) for p, n in own}})
    return _Component(CUSTOMCONTRAST_COMPONENT, digest, (*unet.files, *text.files, *own),
                      (*unet.inputs[:2], *(TensorSpec(*t) for t in STEP_INPUTS)),
                      (unet.outputs[0], *(TensorSpec(*t) for t in STEP_OUTPUTS)))


def _read_diffusers_configs(folder: Path) -> dict[str, dict]:
    wanted = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
              "scheduler": "scheduler/scheduler_config.json"}
    missing = [p for p in (*wanted.values(), "tokenizer") if not (folder / p).exists()]
    if missing:
        raise FailedPrecondition(
            f"{folder} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)}), which the torch "
            "component backend serves: export the concept with `persona-cli export CONCEPT --format diffusers`, or "
            "use component backend python/onnxruntime for ONNX exports")
    configs = {}
    for key, path in wanted.items():
        config = _read_json(folder / path)
        if config is None:
            raise FailedPrecondition(f"{folder / path} is not readable JSON: export the concept again")
        configs[key] = config
    return configs


def _read_manifest(export_dir: Path) -> dict:
    manifest = _read_json(export_dir / "manifest.json")
    if manifest is None or manifest.get("format") != "persona-onnx-stable-diffusion":
        raise FailedPrecondition(f"{export_dir} is not a persona ONNX export (no manifest.json of that format): "
                                 "export the concept with `persona-cli export CONCEPT --format onnx`")
    missing = [c for c in COMPONENTS if c not in manifest.get("components", {})]
    if missing:
        raise FailedPrecondition(f"the ONNX export in {export_dir} lacks {', '.join(missing)}: export it again")
    return manifest


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _digest_tree(root: Path, parts: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        for path in sorted((root / part).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()[:16]


def link_or_copy(source, target):
    """Hard-links `source` at `target` (GBs of weights are not copied), copying where links cannot be made (another
    filesystem, or links not allowed); returns `target`, so it also serves as shutil.copytree's copy_function."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)
