"""The composition root: builds stores → domain → servicers → one gRPC server hosting every service (or, with
`services=`, a subset of them: one pod per service in a split Kubernetes deployment).

`persona-cli serve` and the embedded CLI both call `build_app`; nothing below this module wires
services together.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from persona.services.caption import domain as caption_domain
from persona.services.caption.servicer import caption_service
from persona.services.caption.settings import CaptionSettings
from persona.services.evaluate.domain import KIND as EVALUATE_JOB_KIND
from persona.services.evaluate.domain import EvaluateDomain
from persona.services.evaluate.servicer import evaluate_service
from persona.services.evaluate.settings import EvaluateSettings
from persona.services.generate.domain import EmbeddedEngine, GenerateDomain
from persona.services.generate.servicer import generate_service
from persona.services.generate.settings import GenerateSettings
from persona.services.mask import domain as mask_domain
from persona.services.mask.servicer import mask_service
from persona.services.mask.settings import MaskSettings
from persona.services.models import concepts as model_concepts
from persona.services.models import exports as model_exports
from persona.services.models.library import ModelLibrary
from persona.services.runtime import auth, job_store, jobs
from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.datadir import lock_data_dir
from persona.services.runtime.caches import keep_caches_in
from persona.services.runtime.errorlog import close_error_log, open_error_log
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.interceptors import standard_interceptors
from persona.services.runtime.job_service import job_service
from persona.services.runtime.metadata import MetadataStore, SQLiteMetadataStore
from persona.services.runtime.model_access import ModelAccess
from persona.services.train.customcontrast.jobs import JOB_KIND as ENCODER_JOB_KIND
from persona.services.train.customcontrast.jobs import EncoderTraining
from persona.services.runtime.server import Pools, RunningServer, create_server
from persona.services.runtime.settings import RuntimeSettings
from persona.services.subjects import domain as subjects_domain
from persona.services.subjects.servicer import subject_service
from persona.services.subjects.settings import SubjectSettings
from persona.services.train import domain as train_domain
from persona.services.train import prior
from persona.services.train.dispatch import train_dispatcher
from persona.services.train.servicer import train_service
from persona.services.train.settings import TrainSettings

log = logging.getLogger("persona.app")

MIGRATIONS = [*auth.MIGRATIONS, *job_store.MIGRATIONS, *subjects_domain.MIGRATIONS, *caption_domain.MIGRATIONS,
              *prior.MIGRATIONS, *model_concepts.MIGRATIONS, *mask_domain.MIGRATIONS]

# The services `serve --services` picks from, and the job kinds each one runs (its domain's runner.register calls).
SERVICE_JOB_KINDS: dict[str, frozenset[str]] = {
    "caption": frozenset({caption_domain.JOB_KIND}),
    "mask": frozenset(),
    "train": frozenset({train_domain.JOB_KIND, model_exports.EXPORT_JOB_KIND, ENCODER_JOB_KIND}),
    "generate": frozenset(),
    "evaluate": frozenset({EVALUATE_JOB_KIND}),
}
SERVICES: tuple[str, ...] = tuple(SERVICE_JOB_KINDS)
# Served by every process whatever `services` says: small CRUD over the shared store that every client flow needs.
ALWAYS_SERVED: tuple[str, ...] = ("subjects", "jobs")
# Services that draw images, and so need the generate engine (Triton) up before the process reports SERVING.
DRAWING_SERVICES = frozenset({"generate", "evaluate"})


def parse_services(services: str | Iterable[str] | None) -> frozenset[str] | None:
    """The set of services to serve from "caption,train" or an iterable of names; None (or an empty value) = all.

    `subjects` and `jobs` are accepted and ignored (always served). Unknown names raise InvalidArgument listing the
    valid ones.
    """
    if services is None:
        return None
    names = services.split(",") if isinstance(services, str) else list(services)
    names = [n.strip().lower() for n in names if n and n.strip()]
    if not names:
        return None
    unknown = sorted({n for n in names if n not in SERVICE_JOB_KINDS and n not in ALWAYS_SERVED})
    if unknown:
        raise InvalidArgument(
            f"unknown service(s) {', '.join(unknown)} in `services` (--services / PERSONA_SERVICES): use a "
            f"comma-separated list of {', '.join(SERVICES)} ({' and '.join(ALWAYS_SERVED)} are always served)")
    return frozenset(n for n in names if n in SERVICE_JOB_KINDS)


@dataclass
class Domains:
    """Every service's domain over one metadata store and data dir, with the job runner they share."""

    artifacts: LocalArtifactStore
    runner: jobs.JobRunner
    subjects: subjects_domain.SubjectRepository
    captions: caption_domain.CaptionDomain
    masks: mask_domain.MaskDomain
    models: ModelLibrary
    train: train_domain.TrainDomain
    generate: GenerateDomain
    evaluate: EvaluateDomain
    encoders: EncoderTraining


@dataclass
class PersonaApp(Domains):
    """A running persona server and the parts it was built from (tests reach in through these)."""

    settings: RuntimeSettings
    db: MetadataStore
    authenticator: auth.ApiKeyAuthenticator
    server: RunningServer
    # The data dir's lock (lock_data_dir); None when metadata is in a shared database (see build_app).
    lock: IO[str] | None
    # The services on this server's port (besides subjects, jobs, health and reflection): all of SERVICES unless
    # `build_app(services=…)` named fewer.
    services: frozenset[str] = frozenset(SERVICES)

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self, grace_s: float | None = None, jobs_timeout_s: float = 0.0) -> int:
        """Stops serving (in-flight calls get `grace_s`), waits up to `jobs_timeout_s` for running
        jobs, and releases the data dir. Returns how many jobs are still running."""
        self.server.stop(self.settings.grace_period_s if grace_s is None else grace_s)
        self.generate.engine.close()
        still_running = self.runner.shutdown(wait=jobs_timeout_s > 0, timeout_s=jobs_timeout_s)
        if not still_running:  # a running job still writes: keep the store open and the data dir locked
            self.db.close()
            if self.lock is not None:
                self.lock.close()
            close_error_log(self.settings.data_dir)
        return still_running


def open_metadata(settings: RuntimeSettings) -> MetadataStore:
    """The metadata store, migrated to the current schema: PostgreSQL at `settings.database_url`
    (PERSONA_DATABASE_URL) when set, else SQLite in `settings.data_dir`."""
    if settings.database_url:
        from persona.services.runtime.postgres import PostgresMetadataStore  # psycopg only when asked for

        db: MetadataStore = PostgresMetadataStore(settings.database_url)
    else:
        db = SQLiteMetadataStore(settings.data_dir / "metadata.sqlite3")
    try:
        db.migrate(MIGRATIONS)
    except BaseException:
        db.close()
        raise
    return db


def build_app(settings: RuntimeSettings, address: str = "127.0.0.1:0", *,
              subject_settings: SubjectSettings | None = None,
              caption_settings: CaptionSettings | None = None,
              train_settings: TrainSettings | None = None,
              generate_settings: GenerateSettings | None = None, mask_settings: MaskSettings | None = None,
              evaluate_settings: EvaluateSettings | None = None, start_engine: bool = False,
              services: str | Iterable[str] | None = None, unix_socket: Path | None = None) -> PersonaApp:
    """Builds every service on `settings.data_dir`, starts serving on `address`, resumes jobs. `start_engine`
    starts what the generate engine draws on (a tritonserver persona runs) before health says SERVING, instead
    of on first use.

    `services` (names from SERVICES, or "caption,train"; None = all) limits what this process serves: every domain
    is still built (they are cheap objects over the shared store), but only the named services' servicers are on
    the port, besides the job and subject services, health (overall "" and one status per service served) and
    reflection, and the job runner runs (and recovers) only those services' job kinds. A process per service needs
    a metadata store they share (Postgres), not one SQLite data dir. `unix_socket`: serve there too (the embedded
    persona-cli's socket that a second persona-cli on the same data dir uses)."""
    served = parse_services(services)
    keep_caches_in(settings.data_dir)  # before anything imports torch: its compile cache is placed at import
    # With a shared metadata database (Postgres) several processes use one data dir (a ReadWriteMany volume in
    # Kubernetes: a pod per service, generate replicas), so none may take it for itself; with SQLite, one does.
    lock = None if settings.database_url else lock_data_dir(settings.data_dir)
    try:
        return _build(settings, address, lock, subject_settings, caption_settings, train_settings,
                      generate_settings or GenerateSettings.from_env(), mask_settings or MaskSettings.from_env(),
                      evaluate_settings or EvaluateSettings.from_env(settings.data_dir / "evaluate"), start_engine,
                      served, unix_socket)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _generate_engine(settings: GenerateSettings, data_dir: Path):
    """In-process torch by default; Triton when PERSONA_GENERATE_ENGINE=triton."""
    if settings.engine == "triton":
        from persona.services.generate.triton_engine import triton_engine_from_settings

        return triton_engine_from_settings(settings, data_dir)
    return EmbeddedEngine(settings, cache_dir=data_dir / "cache")


def _domains(settings: RuntimeSettings, db: MetadataStore, subject_settings: SubjectSettings | None,
             caption_settings: CaptionSettings | None, train_settings: TrainSettings | None,
             generate_settings: GenerateSettings, mask_settings: MaskSettings,
             evaluate_settings: EvaluateSettings) -> Domains:
    """The domains of a server (`_build`) or of a job worker (`run_job`): the one place they are wired together."""
    train_settings = train_settings or TrainSettings.from_env(settings.data_dir)
    artifacts = LocalArtifactStore(settings.data_dir / "artifacts")
    access = ModelAccess(paths=settings.model_paths, root=settings.models_root or train_settings.base_model_cache_dir,
                         allowed=settings.allowed_models)
    runner = jobs.JobRunner(job_store.JobStore(db), workers=settings.job_workers)
    subjects = subjects_domain.SubjectRepository(db, artifacts, subject_settings or SubjectSettings.from_env())
    captions = caption_domain.CaptionDomain(db, subjects, runner, caption_settings or CaptionSettings.from_env())
    masks = mask_domain.MaskDomain(db, artifacts, subjects, mask_settings, access=access)
    # The library's work folder: export scratch space and the records of base models' exports.
    models = ModelLibrary(db, artifacts, runner, train_settings, settings.data_dir / "exports", model_access=access)
    encoders = EncoderTraining(runner, models, settings.data_dir, train_settings.device)
    train = train_domain.TrainDomain(db, artifacts, subjects, captions, runner, train_settings,
                                     settings.data_dir / "train", models, masks,
                                     dispatcher=train_dispatcher(train_settings, settings.data_dir,
                                                                 settings.database_url), encoders=encoders)
    generate = GenerateDomain(models, _generate_engine(generate_settings, settings.data_dir), generate_settings,
                              settings.data_dir / "generate")
    evaluate = EvaluateDomain(artifacts, runner, subjects, models, generate, masks, evaluate_settings)
    return Domains(artifacts, runner, subjects, captions, masks, models, train, generate, evaluate, encoders)


def run_job(settings: RuntimeSettings, job_id: str, *,
            train_settings: TrainSettings | None = None) -> job_store.JobRecord:
    """Runs one persisted job in this process and returns it finished: `persona-cli run-job`, the worker side of a
    dispatcher. No server, and no data dir lock: the server that dispatched the job holds it (SQLite) or the store
    is shared (Postgres)."""
    # The worker runs the job itself: it builds no dispatcher (a pod has no Kubernetes API token, by design).
    train_settings = dataclasses.replace(train_settings or TrainSettings.from_env(settings.data_dir),
                                         dispatcher="thread")
    keep_caches_in(settings.data_dir)
    db = open_metadata(settings)
    open_error_log(settings.data_dir)
    try:
        d = _domains(settings, db, None, None, train_settings, GenerateSettings.from_env(), MaskSettings.from_env(),
                     EvaluateSettings.from_env(settings.data_dir / "evaluate"))
        try:
            return d.runner.run_here(job_id)
        finally:
            d.runner.shutdown()
            d.generate.engine.close()
    finally:
        db.close()
        close_error_log(settings.data_dir)


def _build(settings: RuntimeSettings, address: str, lock: IO[str] | None, subject_settings: SubjectSettings | None,
           caption_settings: CaptionSettings | None, train_settings: TrainSettings | None,
           generate_settings: GenerateSettings, mask_settings: MaskSettings, evaluate_settings: EvaluateSettings,
           start_engine: bool, served: frozenset[str] | None = None, unix_socket: Path | None = None) -> PersonaApp:
    db = open_metadata(settings)
    open_error_log(settings.data_dir)  # traces of failed jobs and calls, wherever stderr goes
    try:
        d = _domains(settings, db, subject_settings, caption_settings, train_settings, generate_settings,
                     mask_settings, evaluate_settings)
        runner, subjects, generate = d.runner, d.subjects, d.generate
        authenticator = auth.ApiKeyAuthenticator(db, settings.auth)
        serving = frozenset(SERVICES) if served is None else served
        if served is not None:  # None: every kind, as before `--services` existed
            runner.serve_only(set().union(*(SERVICE_JOB_KINDS[name] for name in served)))
        registrations = {"caption": caption_service(d.captions), "mask": mask_service(d.masks),
                         "train": train_service(d.train, d.encoders), "generate": generate_service(generate),
                         "evaluate": evaluate_service(d.evaluate)}
        server = create_server(
            [job_service(runner, settings.max_watch_streams), subject_service(subjects), *(registrations[name] for name in SERVICES
                                                               if name in serving)], address,
            interceptors=standard_interceptors(authenticator), max_message_bytes=settings.max_message_bytes,
            workers=Pools(quick=settings.rpc_workers, work=settings.work_workers,
                          # a few beyond the limit, so the call over it is turned away at once, not queued
                          waiting=settings.max_watch_streams + 8),
            unix_socket=unix_socket,
        )
        if start_engine and serving & DRAWING_SERVICES:
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
        return PersonaApp(**vars(d), settings=settings, db=db, authenticator=authenticator, server=server, lock=lock,
                          services=serving)
    except BaseException:
        db.close()  # a bad setting (e.g. the kubernetes dispatcher on SQLite) or a busy port: nothing stays open
        close_error_log(settings.data_dir)
        raise
