"""Caption use cases (SKELETON: being implemented)."""
from __future__ import annotations

from persona.services.runtime.jobs import JobRecord, JobRunner
from persona.services.runtime.metadata import MetadataStore, Migration

from ..subjects.domain import SubjectRepository
from .settings import CaptionSettings

MIGRATIONS: list[Migration] = []


class CaptionDomain:
    def __init__(self, db: MetadataStore, subjects: SubjectRepository, runner: JobRunner, settings: CaptionSettings):
        self.db, self.subjects, self.runner, self.settings = db, subjects, runner, settings
