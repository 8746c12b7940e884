"""The composition root: builds stores → domain → servicers → one gRPC server hosting every service.

`persona-cli serve` and the embedded CLI both call `build_app`; nothing below this module wires
services together.
"""
from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from persona.services.caption import domain as caption_domain
from persona.services.caption.servicer import caption_service
from persona.services.caption.settings import CaptionSettings
from persona.services.evaluate.domain import EvaluateDomain
from persona.services.evaluate.servicer import evaluate_service
from persona.services.evaluate.settings import EvaluateSettings
from persona.services.generate.domain import EmbeddedEngine, GenerateDomain
from persona.services.generate.servicer import generate_service
from persona.services.generate.settings import GenerateSettings
from persona.services.mask import domain as mask_domain
from persona.services.mask.servicer import mask_service
from persona.services.mask.settings import MaskSettings
from persona.services.runtime import auth, jobs
from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.errors import FailedPrecondition
from persona.services.runtime.interceptors import standard_interceptors
from persona.services.runtime.job_service import job_service
from persona.services.runtime.metadata import SQLiteMetadataStore
from persona.services.runtime.server import RunningServer, create_server
from persona.services.runtime.settings import RuntimeSettings
from persona.services.subjects import domain as subjects_domain
from persona.services.subjects.servicer import subject_service
from persona.services.subjects.settings import SubjectSettings
from persona.services.train import concepts as train_concepts
from persona.services.train import domain as train_domain
from persona.services.train import prior
from persona.services.train.servicer import train_service
from persona.services.train.settings import TrainSettings

log = logging.getLogger("persona.app")

MIGRATIONS = [*auth.MIGRATIONS, *jobs.MIGRATIONS, *subjects_domain.MIGRATIONS, *caption_domain.MIGRATIONS,
              *prior.MIGRATIONS, *train_concepts.MIGRATIONS, *mask_domain.MIGRATIONS]


@dataclass
class PersonaApp:
    """A running persona server and the parts it was built from (tests reach in through these)."""

    settings: RuntimeSettings
    db: SQLiteMetadataStore
    artifacts: LocalArtifactStore
    runner: jobs.JobRunner
    authenticator: auth.ApiKeyAuthenticator
    subjects: subjects_domain.SubjectRepository
    captions: caption_domain.CaptionDomain
    masks: mask_domain.MaskDomain
    train: train_domain.TrainDomain
    generate: GenerateDomain
    evaluate: EvaluateDomain
    server: RunningServer
    lock: IO[str]

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self, grace_s: float | None = None, jobs_timeout_s: float = 0.0) -> int:
        """Stops serving (in-flight calls get `grace_s`), waits up to `jobs_timeout_s` for running
        jobs, and releases the data dir. Returns how many jobs are still running."""
        self.server.stop(self.settings.grace_period_s if grace_s is None else grace_s)
        self.generate.engine.close()
        still_running = self.runner.shutdown(wait=jobs_timeout_s > 0, timeout_s=jobs_timeout_s)
        if not still_running:  # a running job still writes to the store: keep the data dir locked
            self.lock.close()
        return still_running


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Takes the data dir for this process alone (released at exit, even by kill -9).

    Job recovery at start assumes no other process runs this store's jobs; a second server or an
    embedded CLI on the same folder would run them twice.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "persona.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise FailedPrecondition(
            f"data dir {data_dir} is in use by another persona process (pid {owner}): talk to it with "
            "--server HOST:PORT (PERSONA_SERVER), or pass another --data-dir") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def open_metadata(settings: RuntimeSettings) -> SQLiteMetadataStore:
    """The metadata store of `settings.data_dir`, migrated to the current schema."""
    db = SQLiteMetadataStore(settings.data_dir / "metadata.sqlite3")
    db.migrate(MIGRATIONS)
    return db


def build_app(settings: RuntimeSettings, address: str = "127.0.0.1:0", *,
              subject_settings: SubjectSettings | None = None,
              caption_settings: CaptionSettings | None = None,
              train_settings: TrainSettings | None = None,
              generate_settings: GenerateSettings | None = None, mask_settings: MaskSettings | None = None,
              evaluate_settings: EvaluateSettings | None = None, start_engine: bool = False) -> PersonaApp:
    """Builds every service on `settings.data_dir`, starts serving on `address`, resumes jobs. `start_engine`
    starts what the generate engine draws on (a tritonserver persona runs) before health says SERVING, instead
    of on first use."""
    lock = lock_data_dir(settings.data_dir)
    try:
        return _build(settings, address, lock, subject_settings, caption_settings, train_settings,
                      generate_settings or GenerateSettings.from_env(), mask_settings or MaskSettings.from_env(),
                      evaluate_settings or EvaluateSettings.from_env(settings.data_dir / "evaluate"), start_engine)
    except BaseException:
        lock.close()
        raise


def _generate_engine(settings: GenerateSettings, data_dir: Path):
    """In-process torch by default; Triton when PERSONA_GENERATE_ENGINE=triton."""
    if settings.engine == "triton":
        from persona.services.generate.triton_engine import triton_engine_from_settings

        return triton_engine_from_settings(settings, data_dir)
    return EmbeddedEngine(settings)


def _build(settings: RuntimeSettings, address: str, lock: IO[str], subject_settings: SubjectSettings | None,
           caption_settings: CaptionSettings | None, train_settings: TrainSettings | None,
           generate_settings: GenerateSettings, mask_settings: MaskSettings, evaluate_settings: EvaluateSettings,
           start_engine: bool) -> PersonaApp:
    db = open_metadata(settings)
    artifacts = LocalArtifactStore(settings.data_dir / "artifacts")
    runner = jobs.JobRunner(jobs.JobStore(db), workers=settings.job_workers)
    authenticator = auth.ApiKeyAuthenticator(db, settings.auth)
    subjects = subjects_domain.SubjectRepository(db, artifacts, subject_settings or SubjectSettings.from_env())
    captions = caption_domain.CaptionDomain(db, subjects, runner, caption_settings or CaptionSettings.from_env())
    masks = mask_domain.MaskDomain(db, artifacts, subjects, mask_settings)
    train = train_domain.TrainDomain(db, artifacts, subjects, captions, runner,
                                     train_settings or TrainSettings.from_env(), settings.data_dir / "train", masks)
    generate = GenerateDomain(train, _generate_engine(generate_settings, settings.data_dir), generate_settings,
                              settings.data_dir / "generate")
    evaluate = EvaluateDomain(artifacts, runner, subjects, train, generate, masks, evaluate_settings)
    server = create_server(
        [job_service(runner), subject_service(subjects), caption_service(captions), mask_service(masks),
         train_service(train), generate_service(generate), evaluate_service(evaluate)], address,
        interceptors=standard_interceptors(authenticator), max_message_bytes=settings.max_message_bytes,
        workers=settings.rpc_workers,
    )
    if start_engine:
        try:
            generate.engine.start()  # a broken Triton install shows now, not at the first Generate
        except BaseException:
            server.stop(0)
            generate.engine.close()
            raise
    resumed = runner.recover(resume=settings.resume_interrupted_jobs)
    if resumed:
        log.info("found %d job(s) left by a previous run: %s", len(resumed), ", ".join(resumed))
    server.set_serving(True)
    return PersonaApp(settings=settings, db=db, artifacts=artifacts, runner=runner, authenticator=authenticator,
                      subjects=subjects, captions=captions, masks=masks, train=train, generate=generate,
                      evaluate=evaluate, server=server,
                      lock=lock)
