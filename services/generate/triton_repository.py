"""A Triton model repository of persona models, written from their ONNX exports.

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

A component is served by the python backend running ONNX Runtime (`<version>/model.py` beside the graph; the only
choice with the `tritonserver` bundled in nvidia-pytriton) or, where the server has it, natively by the
`onnxruntime_onnx` platform (NVIDIA's image). The pipeline is a python model running the shared sampling loop; it
calls the components through BLS.

Graphs are hard-linked from the export where the filesystem allows (GBs are not copied), and every model or
version folder is written beside the repository and renamed into place, so Triton never reads half a model.
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

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

from .triton_config import TensorSpec, model_config
from .triton_models import CONCEPTS_FOLDER, PIPELINE_FILE, PIPELINE_INPUTS, PIPELINE_MODEL, PIPELINE_OUTPUTS

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
# How components are served: python = ONNX Runtime inside a python-backend model; onnxruntime = Triton's
# native onnxruntime backend (NVIDIA's image).
COMPONENT_BACKENDS = ("python", "onnxruntime")
TEMPLATES = {"pipeline": "sd_pipeline", "python": "onnxruntime_component"}
_DTYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class RepositoryEntry:
    """A pipeline in the repository: its Triton model name, newest version and component model names."""

    name: str
    version: int
    components: dict[str, str]
    native_resolution: int


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

    def add(self, name: str, export_dir: Path) -> RepositoryEntry:
        """Puts the ONNX export `export_dir` (onnx_export's layout) in the repository as concept `name`, writing
        only the component models that are not there yet and a new concept version only when something changed.
        Returns the entry whose component models (and `sd_pipeline`) must be loaded."""
        export_dir = Path(export_dir)
        manifest = _read_manifest(export_dir)
        components = {c: self._add_component(c, export_dir, manifest) for c in COMPONENTS}
        pipeline = {
            "models": components,
            "latent_channels": manifest["latent_channels"],
            "vae_scale_factor": manifest["vae_scale_factor"],
            "scaling_factor": manifest["scaling_factor"],
            "native_resolution": manifest.get("native_resolution", 512),
            "tokenizer_and_scheduler": _digest_tree(export_dir, ("tokenizer", "scheduler")),
        }
        current = self.entry(name)
        if current is not None and _read_json(self._concepts / name / str(current.version) / PIPELINE_FILE) == pipeline:
            return current
        version = 1 if current is None else current.version + 1
        self._write_pipeline(name, version, export_dir, pipeline)
        return RepositoryEntry(name, version, components, int(pipeline["native_resolution"]))

    def _add_component(self, component: str, export_dir: Path, manifest: dict) -> str:
        spec = manifest["components"][component]
        digest = hashlib.sha256(json.dumps(spec["sha256"], sort_keys=True).encode()).hexdigest()[:16]
        name = f"{component}_{digest}"
        if (self.root / name / "config.pbtxt").is_file():
            return name
        source = export_dir / Path(spec["path"]).parent

        def write(staging: Path) -> None:
            version = staging / "1"
            version.mkdir(parents=True)
            for file in spec["sha256"]:  # model.onnx and its external data, if any
                _link_or_copy(source / file, version / file)
            if self.component_backend == "python":
                (version / "model.py").write_text(template(TEMPLATES["python"]))
            (staging / "config.pbtxt").write_text(model_config(
                name, [_tensor(t) for t in spec["inputs"]], [_tensor(t) for t in spec["outputs"]],
                platform=None if self.component_backend == "python" else "onnxruntime_onnx",
                instance_kind=self.instance_kind))

        self._publish(self.root / name, write)
        return name

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
        return RepositoryEntry(name, versions[-1], dict(pipeline["models"]), int(pipeline["native_resolution"]))

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
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, target)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)
