"""Caption use cases: start a captioning job (Case 1 template or checked VLM answers), list, get, set."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from persona.services.runtime.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, PersonaError
from persona.services.runtime.job_store import JobRecord
from persona.services.runtime.jobs import JobContext, JobRunner
from persona.services.runtime.metadata import MetadataStore, Migration

from ..subjects.domain import Subject, SubjectImage, SubjectRepository
from . import checker, instructions
from .settings import CaptionSettings
from .vlm import OpenAIVlm, Outcome, caption_image

MIGRATIONS = [
    Migration("captions", 1, (
        # `description_case`: CASE is an SQL keyword. `job_id`: the job that wrote the row, so a
        # resumed job skips what it already did.
        """CREATE TABLE captions (
            image_id TEXT PRIMARY KEY REFERENCES subject_images(image_id) ON DELETE CASCADE,
            subject_id TEXT NOT NULL, tenant_id TEXT NOT NULL, text TEXT NOT NULL,
            description_case INTEGER NOT NULL, mode TEXT NOT NULL, source TEXT NOT NULL,
            instruction_version TEXT NOT NULL, model TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            failure TEXT NOT NULL DEFAULT '', job_id TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL)""",
        "CREATE INDEX captions_by_subject ON captions (subject_id)",
    )),
]

JOB_KIND = "caption"
TEMPLATE, VLM, USER = "template", "vlm", "user"


@dataclass(frozen=True)
class Caption:
    subject_id: str
    image_id: str
    text: str  # empty when `failure` is set
    case: int  # 1–4; 0 for a person's caption
    mode: str  # object | style | expression; "" for a person's caption
    source: str  # template | vlm | user
    instruction_version: str
    model: str
    attempts: int
    failure: str
    job_id: str
    updated_at: float

    @classmethod
    def from_row(cls, row: dict) -> "Caption":
        return cls(subject_id=row["subject_id"], image_id=row["image_id"], text=row["text"],
                   case=row["description_case"], mode=row["mode"], source=row["source"],
                   instruction_version=row["instruction_version"], model=row["model"], attempts=row["attempts"],
                   failure=row["failure"], job_id=row["job_id"], updated_at=row["updated_at"])


class CaptionDomain:
    """SID captions of subject images; captioning runs as resumable "caption" jobs."""

    def __init__(self, db: MetadataStore, subjects: SubjectRepository, runner: JobRunner, settings: CaptionSettings):
        self.db, self.subjects, self.runner, self.settings = db, subjects, runner, settings
        self.vlm = OpenAIVlm(settings)
        runner.register(JOB_KIND, self._run, resumable=True)

    def start(self, tenant_id: str, subject_id: str, case: int = instructions.DEFAULT_CASE,
              mode: str = instructions.DEFAULT_MODE, image_ids: list[str] | tuple[str, ...] = (),
              overwrite_user_captions: bool = False) -> JobRecord:
        """Validates the request, checks the VLM can be reached (Cases 2–4), and queues the job."""
        if case not in instructions.CASES:
            raise InvalidArgument(f"`case` is {case}: use 1–4 (DESCRIPTION_CASE_1 … DESCRIPTION_CASE_4), "
                                  f"or leave it unset for Case 3 (SID)")
        if mode not in instructions.MODES:
            raise InvalidArgument(f"`mode` is {mode!r}: use one of {', '.join(instructions.MODES)}")
        subject = self.subjects.get(tenant_id, subject_id)
        image_ids = list(dict.fromkeys(image_ids))
        self._select(subject, image_ids)
        if case != 1:
            self.vlm.require_configured()
            self.vlm.preflight()
        params = {"case": case, "mode": mode, "image_ids": image_ids,
                  "overwrite_user_captions": bool(overwrite_user_captions),
                  "instruction_version": instructions.INSTRUCTION_VERSION,
                  "model": TEMPLATE if case == 1 else self.vlm.model}
        return self.runner.submit(tenant_id, JOB_KIND, params, subject_id)

    def list(self, tenant_id: str, subject_id: str) -> list[Caption]:
        """The subject's captions in image order (images without one are left out)."""
        self.subjects.get(tenant_id, subject_id)
        rows = self.db.query(
            "SELECT c.* FROM captions c JOIN subject_images i ON i.image_id = c.image_id"
            " WHERE c.subject_id = :s AND c.tenant_id = :t ORDER BY i.idx", {"s": subject_id, "t": tenant_id})
        return [Caption.from_row(r) for r in rows]

    def get(self, tenant_id: str, subject_id: str, image_id: str) -> Caption:
        self.subjects.get(tenant_id, subject_id).image(image_id)
        row = self.db.query_one("SELECT * FROM captions WHERE image_id = :id AND tenant_id = :t",
                                {"id": image_id, "t": tenant_id})
        if row is None:
            raise NotFound(f"image {image_id} has no caption yet: write them with StartCaptioning "
                           f"(`persona-cli caption {subject_id}`) or SetCaption")
        return Caption.from_row(row)

    def set(self, tenant_id: str, subject_id: str, image_id: str, text: str) -> Caption:
        """Stores a person's caption; it must carry the subject's identifier so training can bind it."""
        subject = self.subjects.get(tenant_id, subject_id)
        subject.image(image_id)
        text = " ".join(text.split())
        example = instructions.template_caption("object", subject.class_name, subject.token)
        if not text:
            raise InvalidArgument(f"`text` is empty: write the description, e.g. {example!r} on a beach")
        if len(text) > checker.MAX_CHARS:
            raise InvalidArgument(f"`text` is {len(text)} characters; at most {checker.MAX_CHARS}: shorten it")
        if not re.search(rf"\b{re.escape(subject.token)}\b", text, re.I):
            raise InvalidArgument(f"`text` does not contain the subject's identifier {subject.token!r}: put it "
                                  f"before the class word, e.g. {example!r}")
        self._store(subject, image_id, text=text, case=0, mode="", source=USER, instruction_version=USER,
                    model=USER, attempts=0, failure="", job_id="")
        return self.get(tenant_id, subject_id, image_id)

    # The job ------------------------------------------------------------------------------------

    def _run(self, ctx: JobContext) -> dict:
        """Captions the job's images; idempotent: a resumed job skips images it already captioned."""
        job, params = ctx.job, ctx.job.params
        case, mode = params["case"], params["mode"]
        subject = self._subject_of(job)
        images = self._select(subject, params["image_ids"])
        existing = {c.image_id: c for c in self.list(job.tenant_id, subject.subject_id)}
        result: dict = {"captioned": 0, "failed": [], "skipped": []}
        todo: list[SubjectImage] = []
        for image in images:
            old = existing.get(image.image_id)
            if old and old.source == USER and not params["overwrite_user_captions"]:
                result["skipped"].append(image.image_id)
            elif old and old.job_id == job.job_id and not old.failure:
                result["captioned"] += 1  # written before a restart interrupted this job
            else:
                todo.append(image)
        progress = _Progress(ctx, total=len(images), done=len(images) - len(todo))
        if case == 1:
            for image in todo:
                ctx.check_cancelled()
                text = instructions.template_caption(mode, subject.class_name, subject.token)
                self._record(ctx, subject, image, Outcome(text, attempts=0), result, progress)
            return result
        if todo:
            self.vlm.require_configured()  # a resumed job may meet a server configured differently
        error = self._caption_with_vlm(ctx, subject, todo, result, progress)
        if error is not None or result["failed"]:
            ctx.store.update(job.job_id, result=result)  # the partial result stays visible on the FAILED job
        if error is not None:
            raise error
        if result["failed"]:
            raise FailedPrecondition(self._failure_message(subject, result["failed"], len(images)))
        return result

    def _caption_with_vlm(self, ctx: JobContext, subject: Subject, todo: list[SubjectImage], result: dict,
                          progress: "_Progress") -> PersonaError | None:
        """Bounded parallel VLM conversations; stores each outcome as it arrives.

        Returns the first endpoint error (unreachable, bad key, …), after which no new image starts.
        """
        error: PersonaError | None = None
        with ThreadPoolExecutor(max(1, self.settings.concurrency), thread_name_prefix="persona-vlm") as pool:
            futures = {pool.submit(self._ask, ctx, subject, image): image for image in todo}
            try:
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    try:
                        outcome = future.result()
                    except Cancelled:
                        raise
                    except PersonaError as e:
                        error = error or e
                        _cancel(futures)
                        continue
                    self._record(ctx, subject, futures[future], outcome, result, progress)
                    if error is None:
                        ctx.check_cancelled()
            except BaseException:  # Cancelled, a deleted subject, a crash: start nothing more
                _cancel(futures)
                raise
        return error

    def _ask(self, ctx: JobContext, subject: Subject, image: SubjectImage) -> Outcome:
        """One image's conversation, on a pool thread; a cancelled job starts no new image."""
        ctx.check_cancelled()
        _, data = self.subjects.image_bytes(subject.tenant_id, subject.subject_id, image.image_id)
        return caption_image(self.vlm, data, ctx.job.params["case"], ctx.job.params["mode"], subject.class_name,
                             subject.token, self.settings)

    def _record(self, ctx: JobContext, subject: Subject, image: SubjectImage, outcome: Outcome, result: dict,
                progress: "_Progress") -> None:
        """Stores one image's outcome (a failure too) and reports it."""
        case, mode = ctx.job.params["case"], ctx.job.params["mode"]
        self._store(subject, image.image_id, text=outcome.text, case=case, mode=mode,
                    source=TEMPLATE if case == 1 else VLM, instruction_version=instructions.INSTRUCTION_VERSION,
                    model=TEMPLATE if case == 1 else self.vlm.model, attempts=outcome.attempts,
                    failure=outcome.failure, job_id=ctx.job.job_id)
        if outcome.failure:
            result["failed"].append(image.image_id)
            ctx.warn(f"no compliant caption for image {image.image_id} after {outcome.attempts} attempts: "
                     f"{outcome.failure}", image_id=image.image_id)
        else:
            result["captioned"] += 1
            for warning in outcome.warnings:
                ctx.warn(f"image {image.image_id}: {warning}", image_id=image.image_id)
        progress.advance(image.image_id, failed=bool(outcome.failure))

    def _store(self, subject: Subject, image_id: str, **fields) -> None:
        with self.db.transaction():
            # The subject may have been deleted while the job ran: its images went with it.
            if self.db.query_one("SELECT 1 FROM subject_images WHERE image_id = :id", {"id": image_id}) is None:
                raise NotFound(f"subject {subject.subject_id} was deleted while its captions were being written")
            # An upsert both SQLite (>= 3.24) and Postgres run; it sets every column, as INSERT OR REPLACE did.
            self.db.execute(
                "INSERT INTO captions (image_id, subject_id, tenant_id, text, description_case, mode,"
                " source, instruction_version, model, attempts, failure, job_id, updated_at) VALUES (:image_id,"
                " :subject_id, :tenant_id, :text, :case, :mode, :source, :instruction_version, :model, :attempts,"
                " :failure, :job_id, :now) ON CONFLICT (image_id) DO UPDATE SET subject_id = excluded.subject_id,"
                " tenant_id = excluded.tenant_id, text = excluded.text, description_case = excluded.description_case,"
                " mode = excluded.mode, source = excluded.source, instruction_version = excluded.instruction_version,"
                " model = excluded.model, attempts = excluded.attempts, failure = excluded.failure,"
                " job_id = excluded.job_id, updated_at = excluded.updated_at",
                {"image_id": image_id, "subject_id": subject.subject_id, "tenant_id": subject.tenant_id,
                 "now": time.time(), **fields},
            )

    def _subject_of(self, job: JobRecord) -> Subject:
        try:
            return self.subjects.get(job.tenant_id, job.subject_id)
        except NotFound:
            raise NotFound(f"subject {job.subject_id} was deleted before its captions were written") from None

    @staticmethod
    def _select(subject: Subject, image_ids: list[str]) -> list[SubjectImage]:
        """The requested images in image order; all of them when `image_ids` is empty."""
        if not image_ids:
            return list(subject.images)
        if any(not i for i in image_ids):
            raise InvalidArgument("`image_ids` has an empty id: pass ids from GetSubject's `images`, or none for all")
        known = {image.image_id for image in subject.images}
        unknown = [i for i in image_ids if i not in known]
        if unknown:
            raise NotFound(f"`image_ids` has ids that are not images of subject {subject.subject_id}: "
                           f"{', '.join(unknown)}; see its images with "
                           f"`persona-cli subjects show {subject.subject_id}`")
        wanted = set(image_ids)
        return [image for image in subject.images if image.image_id in wanted]

    def _failure_message(self, subject: Subject, failed: list[str], total: int) -> str:
        shown = [f"{c.image_id} ({c.failure})" for c in self.list(subject.tenant_id, subject.subject_id)
                 if c.image_id in failed][:5]
        more = f" and {len(failed) - len(shown)} more" if len(failed) > len(shown) else ""
        return (f"{len(failed)} of {total} images got no compliant caption after {self.settings.max_attempts} VLM "
                f"calls each: {'; '.join(shown)}{more}. The other captions are stored: write these with SetCaption, "
                f"start again with their `image_ids`, or set PERSONA_VLM_MODEL to a stronger model")


class _Progress:
    """Per-image progress events: fraction done, and which image."""

    def __init__(self, ctx: JobContext, total: int, done: int):
        self.ctx, self.total, self.done = ctx, total, done

    def advance(self, image_id: str, failed: bool) -> None:
        self.done += 1
        verb = "no compliant caption for" if failed else "captioned"
        self.ctx.progress(self.done / max(1, self.total), f"{verb} {image_id} ({self.done}/{self.total})",
                          stage="caption", image_id=image_id, done=self.done, total=self.total)


def _cancel(futures) -> None:
    for future in futures:
        future.cancel()
