"""A base model's ONNX export goes through the same exporter and cache as a concept's: converted once (parity
checked, diffusers layout added), kept in the artifact store, copied out to each folder asked for."""
from __future__ import annotations

import json

import pytest

from persona.services.models import exports
from persona.services.models.library import ModelLibrary
from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.jobs import JobRunner, JobStore
from persona.services.runtime.metadata import SQLiteMetadataStore
from persona.services.train.settings import TrainSettings


@pytest.fixture
def library(tmp_path, model_cache):
    db = SQLiteMetadataStore(tmp_path / "meta.db")
    runner = JobRunner(JobStore(db), workers=1)
    yield ModelLibrary(db, LocalArtifactStore(tmp_path / "artifacts"), runner,
                       TrainSettings(base_model_cache_dir=model_cache, device="cpu"), tmp_path / "work")
    runner.shutdown()
    db.close()


def test_a_base_model_is_exported_once_and_copied_out_per_folder(library, tiny_model, tmp_path, monkeypatch):
    base = library.resolve_base("tiny")
    calls = []
    real = exports.export_pipeline_to_onnx
    monkeypatch.setattr(exports, "export_pipeline_to_onnx",
                        lambda *args, **kwargs: calls.append(args[0]) or real(*args, **kwargs))

    first = library.exports.base_model_folder(base, "onnx", tmp_path / "a", fp16=False)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["fp16"] is False and (first / "model_index.json").is_file()  # the concept exports' layout
    second = library.exports.base_model_folder(base, "onnx", tmp_path / "b", fp16=False)
    assert calls == [base.path]  # converted once, from the base model's own folder
    assert sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file()) == sorted(
        p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())


def test_a_base_model_has_no_diffusers_export_to_make(library, tmp_path):
    with pytest.raises(InvalidArgument, match="diffusers folder already"):
        library.exports.base_model_folder(library.resolve_base("tiny"), "diffusers", tmp_path / "x", fp16=False)
