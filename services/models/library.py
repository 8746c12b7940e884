"""The model library: base models and every tenant's concepts as the services read them, and their exports.

One is built by the composition root (app.py) and handed to the services: train writes concepts into it (its rows and
weights), generate and evaluate read concepts and exports from it, and all resolve base models through it. It also
holds the process's device lock: a training run and a GPU export never share the device.
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Protocol

from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.devices import cuda_available
from persona.services.runtime.job_store import TERMINAL
from persona.services.runtime.jobs import JobContext, JobRunner, hold
from persona.services.runtime.metadata import MetadataStore
from persona.services.runtime.model_access import ModelAccess
from persona.services.runtime.paging import Page

from . import concepts as concept_store
from .base_models import ResolvedBaseModel, resolve_base_model
from .concepts import Concept, ConceptStore
from .exports import ConceptExports, ExportSettings


class LibrarySettings(ExportSettings, Protocol):
    """What the library reads of the train service's settings (train/settings.py)."""

    # The base model of a request that names none (the operator's choice: any folder or hub id, unchecked by access).
    default_base_model: str


class ModelLibrary:
    """Concepts of every tenant (each read scoped to its tenant), base models, and the exports of both."""

    def __init__(self, db: MetadataStore, artifacts: LocalArtifactStore, runner: JobRunner,
                 settings: LibrarySettings, work_dir: Path, model_access: ModelAccess | None = None):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        # Which base models a request may name (default: any folder, as the embedded CLI).
        self.model_access = model_access or ModelAccess()
        self.concepts = ConceptStore(db)
        # One training run or GPU export per process at a time: two on one GPU would both run out of memory.
        self._device_lock = threading.Lock()
        self.exports = ConceptExports(self.concepts, artifacts, settings, work_dir, runner, self.get,
                                      self.hold_device, self.on_cuda)

    def resolve_base(self, ref: str) -> ResolvedBaseModel:
        """A request's base model (empty: the server's default), through the model access policy; its `ref` stays
        as the request named it."""
        ref = (ref or "").strip()
        if not ref or ref == self.settings.default_base_model:  # the operator's own choice
            return resolve_base_model(ref or self.settings.default_base_model, self.settings)
        return dataclasses.replace(resolve_base_model(self.model_access.locate(ref, "base_model"), self.settings),
                                   ref=ref)

    def get(self, tenant_id: str, concept_id: str) -> Concept:
        """The tenant's concept (NotFound for another tenant's)."""
        return self._reconciled(self.concepts.get(concept_id, tenant_id))

    def list(self, tenant_id: str, page: Page, subject_id: str = "") -> tuple[list[Concept], str]:
        concepts, token = self.concepts.list(tenant_id, page, subject_id)
        return [self._reconciled(c) for c in concepts], token

    def hold_device(self, ctx: JobContext | None):
        """Waits (cancellably) until no training run or GPU export holds the device; holds it while in the block."""
        return hold(self._device_lock, ctx, "waiting for another job to finish with the device")

    def on_cuda(self) -> bool:
        """Whether training and exports run on a CUDA device (the settings' device, else whether one is there)."""
        device = self.settings.device
        if device:
            return device.startswith("cuda")
        return cuda_available()

    def _reconciled(self, concept: Concept) -> Concept:
        """A TRAINING concept whose job ended without saying so (server stopped with resume off) takes its state."""
        if concept.state != concept_store.TRAINING or not concept.job_id:
            return concept
        job = self.runner.store.get(concept.job_id)
        if job.state not in TERMINAL:
            return concept
        state = {"CANCELLED": concept_store.CANCELLED, "SUCCEEDED": concept_store.READY}.get(job.state,
                                                                                               concept_store.FAILED)
        self.concepts.update(concept.concept_id, state=state)
        return self.concepts.get(concept.concept_id)
