"""The shared model-folder resolver: local folders, hub ids from the local Hugging Face cache, the offline rule.

No model is loaded and nothing is downloaded: folders hold empty stand-in files (the resolver only checks that
they exist), the cache is a temporary folder laid out as huggingface_hub lays one out, and the download path
runs against a stand-in `snapshot_download` that records how it was called.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.runtime.models import (
    BIN_FALLBACK_PATTERNS,
    HUB_ID,
    TRANSFORMERS_PATTERNS,
    hub_offline,
    missing_files,
    read_model_type,
    resolve_model_folder,
)

UNCACHED = "persona-tests/not-in-any-cache"
REVISION = "0" * 40


def model_folder(folder: Path, model_type: str = "clip", files=("model.safetensors",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name in files:
        (folder / name).write_bytes(b"")
    return folder


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub reads, offline."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


def cached_snapshot(cache: Path, repo_id: str) -> Path:
    """A snapshot laid out the way huggingface_hub caches one: refs/main names the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    return snapshot


# --- local folders ----------------------------------------------------------------------------------------

def test_a_complete_folder_resolves_to_its_absolute_path(tmp_path, monkeypatch):
    folder = model_folder(tmp_path / "clip", files=("model.safetensors", "preprocessor_config.json"))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_folder("clip", "clip_model", required=(("preprocessor_config.json",),)) == folder.resolve()
    # Pickled or sharded weights count as weights too.
    assert resolve_model_folder(str(model_folder(tmp_path / "bin", files=("pytorch_model.bin",))), "m")


@pytest.mark.parametrize("files, lacking", [
    ((), "model.safetensors or model.safetensors.index.json or pytorch_model.bin"),
    (("model.safetensors",), "preprocessor_config.json or processor_config.json"),
])
def test_a_folder_without_weights_or_required_files_names_the_field(tmp_path, files, lacking):
    folder = model_folder(tmp_path / "m", files=files)
    with pytest.raises(InvalidArgument, match=r"`dino_model` .* is not a transformers model folder: missing") as e:
        resolve_model_folder(str(folder), "dino_model",
                             required=(("preprocessor_config.json", "processor_config.json"),))
    assert lacking in e.value.message
    assert "save_pretrained" in e.value.message


def test_a_folder_without_config_names_the_field(tmp_path):
    with pytest.raises(InvalidArgument, match="`model` .* missing config.json"):
        resolve_model_folder(str(tmp_path), "model")


def test_a_file_is_not_a_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(InvalidArgument, match="`clip_model` .* is a file, not a folder"):
        resolve_model_folder(str(path), "clip_model")


@pytest.mark.parametrize("ref", ["nowhere/x/y", "./missing", "a b/c"])
def test_neither_a_folder_nor_a_hub_id_is_invalid(tmp_path, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgument, match="`model` .* is neither an existing folder nor a hub id like owner/name"):
        resolve_model_folder(ref, "model")


@pytest.mark.parametrize("ref", ["", "  ", None])
def test_an_empty_reference_is_invalid(ref):
    with pytest.raises(InvalidArgument, match="`segmenter` is empty"):
        resolve_model_folder(ref, "segmenter")


def test_model_type_must_match(tmp_path):
    folder = model_folder(tmp_path / "sam", model_type="sam")
    assert resolve_model_folder(folder, "segmenter", model_type="sam") == folder
    with pytest.raises(InvalidArgument, match="`detector` .* is a sam model, not grounding-dino"):
        resolve_model_folder(str(folder), "detector", model_type="grounding-dino")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="is a unknown model, not sam"):
        resolve_model_folder(str(folder), "segmenter", model_type="sam")


def test_a_custom_check_replaces_the_transformers_one(tmp_path):
    # A diffusers pipeline has no top-level config.json or weights: the caller's check decides.
    folder = tmp_path / "pipeline"
    folder.mkdir()

    def missing(f: Path) -> list[str]:
        return [] if (f / "model_index.json").exists() else ["model_index.json"]

    with pytest.raises(InvalidArgument, match=r"`base_model` .* is not a diffusers folder: missing model_index.json; "
                                              r"pass a pipeline"):
        resolve_model_folder(str(folder), "base_model", missing=missing, kind="diffusers", fix="pass a pipeline")
    (folder / "model_index.json").write_text("{}")
    assert resolve_model_folder(str(folder), "base_model", missing=missing, kind="diffusers") == folder


def test_missing_files_and_model_type_helpers(tmp_path):
    assert missing_files(tmp_path) == ["config.json", " or ".join(
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))]
    assert read_model_type(tmp_path) == ""
    assert read_model_type(model_folder(tmp_path, model_type="clipseg")) == "clipseg"
    assert missing_files(tmp_path) == []


# --- hub ids and the offline rule -------------------------------------------------------------------------

@pytest.mark.parametrize("download", [False, True])
def test_an_uncached_hub_id_offline_says_hf_download(hf_cache, download):
    # HF_HUB_OFFLINE=1 forbids downloading even when the caller allows it.
    with pytest.raises(FailedPrecondition, match=f"`clip_model` '{UNCACHED}' is not in the local Hugging Face "
                                                 f"cache: .*`hf download {UNCACHED}`") as e:
        resolve_model_folder(UNCACHED, "clip_model", download=download)
    assert "local transformers model folder as `clip_model`" in e.value.message


def test_a_cached_hub_snapshot_resolves(hf_cache):
    snapshot = cached_snapshot(hf_cache, "persona-tests/tiny-sam")
    model_folder(snapshot, model_type="sam")
    assert resolve_model_folder("persona-tests/tiny-sam", "segmenter", model_type="sam") == snapshot
    with pytest.raises(InvalidArgument, match="is a sam model, not clipseg"):
        resolve_model_folder("persona-tests/tiny-sam", "model", model_type="clipseg")


def test_a_partly_cached_snapshot_is_a_failed_precondition(hf_cache):
    snapshot = cached_snapshot(hf_cache, "persona-tests/half")
    model_folder(snapshot, files=())  # config.json only, e.g. after `hf download <id> config.json`
    with pytest.raises(FailedPrecondition, match=r"only partly in the local Hugging Face cache \(missing "
                                                 r"model.safetensors or .*hf download persona-tests/half"):
        resolve_model_folder("persona-tests/half", "model")


@pytest.mark.parametrize("value, offline", [("1", True), ("on", True), (" TRUE ", True), ("yes", True),
                                            ("0", False), ("", False), ("false", False)])
def test_hf_hub_offline_is_read_at_call_time(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub_offline() is False


class FakeSnapshots:
    """Stands in for huggingface_hub.snapshot_download: records calls, writes what `files` says each pass brings."""

    def __init__(self, folder: Path, *passes: tuple[str, ...]):
        self.folder, self.passes, self.calls = folder, list(passes), []

    def __call__(self, repo_id, local_files_only=False, allow_patterns=None, **kwargs):
        self.calls.append(dict(repo_id=repo_id, local_files_only=bool(local_files_only),
                               allow_patterns=list(allow_patterns or [])))
        model_folder(self.folder, files=self.passes.pop(0))
        return str(self.folder)


def test_download_fetches_the_patterns_then_the_bin_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # First pass: no safetensors in the repo; second pass: its pickled checkpoint.
    fake = FakeSnapshots(tmp_path / "snap", (), ("pytorch_model.bin",))
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    assert resolve_model_folder("facebook/dino-vits16", "dino_model", download=True) == tmp_path / "snap"
    assert fake.calls == [
        dict(repo_id="facebook/dino-vits16", local_files_only=False, allow_patterns=list(TRANSFORMERS_PATTERNS)),
        dict(repo_id="facebook/dino-vits16", local_files_only=False, allow_patterns=list(BIN_FALLBACK_PATTERNS)),
    ]


def test_no_fallback_pass_when_weights_came_or_none_is_asked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fake = FakeSnapshots(tmp_path / "snap", ("model.safetensors",))
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    resolve_model_folder("owner/name", "model", download=True, allow_patterns=["*.json", "model*.safetensors"])
    assert [c["allow_patterns"] for c in fake.calls] == [["*.json", "model*.safetensors"]]

    # fallback_patterns=() (a diffusers pipeline): one pass, and the caller's check reports what is missing.
    fake = FakeSnapshots(tmp_path / "pipe", ())
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    with pytest.raises(FailedPrecondition, match="only partly .*missing unet"):
        resolve_model_folder("owner/pipe", "base_model", download=True, fallback_patterns=(),
                             missing=lambda f: ["unet"])
    assert len(fake.calls) == 1


@pytest.mark.parametrize("offline, download, local_only", [("1", True, True), ("0", False, True),
                                                           ("0", True, False)])
def test_only_download_and_not_offline_may_fetch(tmp_path, monkeypatch, offline, download, local_only):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    fake = FakeSnapshots(tmp_path / "snap", ("model.safetensors",))
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    resolve_model_folder("owner/name", "model", download=download)
    assert fake.calls[0]["local_files_only"] is local_only


def test_a_failed_fetch_is_a_failed_precondition(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    with pytest.raises(FailedPrecondition, match=r"`model` 'owner/name' could not be fetched \(no route to host\): "
                                                 r".*hf download owner/name"):
        resolve_model_folder("owner/name", "model", download=True)


def test_hub_id_pattern():
    assert HUB_ID.match("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert HUB_ID.match("facebook/dino-vits16")
    for ref in ("name", "a/b/c", "/abs/path", "./rel/x", "-x/y", "a b/c"):
        assert not HUB_ID.match(ref), ref
