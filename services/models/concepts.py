"""Concepts: what a training run produced, with everything needed to reproduce and trust it.

A concept row is written when training is requested (state TRAINING) and completed by the job. It
keeps the base model (as asked and by content hash), method, regularisers, the options in effect,
and the exact caption each image trained with, so a concept can be retrained or audited after the
subject's captions change. Its files (weights, exports, validation images) are artifacts listed in
`concept_files` under a role.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from persona.services.runtime.errors import NotFound
from persona.services.runtime.metadata import MetadataStore, Migration
from persona.services.runtime.paging import Page, keyset_clause, next_token

MIGRATIONS = [
    Migration("concepts", 1, (
        """CREATE TABLE concepts (
            concept_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, subject_id TEXT NOT NULL,
            job_id TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, display_name TEXT NOT NULL,
            token TEXT NOT NULL, class_name TEXT NOT NULL, base_model TEXT NOT NULL,
            base_model_sha256 TEXT NOT NULL, base_model_family TEXT NOT NULL, method TEXT NOT NULL,
            regularizers_json TEXT NOT NULL, captions TEXT NOT NULL, options_json TEXT NOT NULL,
            training_captions_json TEXT NOT NULL, steps_done INTEGER NOT NULL DEFAULT 0,
            final_loss REAL NOT NULL DEFAULT 0, resolution INTEGER NOT NULL,
            parent_concept_id TEXT NOT NULL DEFAULT '', persona_version TEXT NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL)""",
        "CREATE INDEX concepts_by_tenant ON concepts (tenant_id, created_at)",
        # role: "weights" (the method's own output), "export:<format>" ("export:onnx-fp16" for formats with a
        # precision), or "validation".
        """CREATE TABLE concept_files (
            concept_id TEXT NOT NULL REFERENCES concepts(concept_id) ON DELETE CASCADE,
            role TEXT NOT NULL, path TEXT NOT NULL, artifact_id TEXT NOT NULL, size_bytes INTEGER NOT NULL,
            step INTEGER NOT NULL DEFAULT 0, prompt TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (concept_id, role, path))""",
    )),
    # The CustomContrast encoder a "customcontrast" concept was made with ('' for the fine-tuning methods).
    Migration("concepts", 2, ("ALTER TABLE concepts ADD COLUMN encoder TEXT NOT NULL DEFAULT ''",)),
]

TRAINING, READY, FAILED, CANCELLED = "TRAINING", "READY", "FAILED", "CANCELLED"
WEIGHTS, VALIDATION = "weights", "validation"


def export_role(format_name: str, fp16: bool | None = None) -> str:
    """Role of an export's files: "export:lora", or with a precision "export:onnx-fp16" / "export:onnx-fp32"."""
    if fp16 is None:
        return f"export:{format_name}"
    return f"export:{format_name}-{'fp16' if fp16 else 'fp32'}"


@dataclass(frozen=True)
class ConceptFile:
    role: str
    path: str
    artifact_id: str
    size_bytes: int
    step: int = 0
    prompt: str = ""


@dataclass(frozen=True)
class TrainingCaption:
    image_id: str
    text: str
    source: str  # vlm | user | template (stored captions) | class (the Case 1 template chosen or fallen back to)


@dataclass(frozen=True)
class Concept:
    concept_id: str
    tenant_id: str
    subject_id: str
    job_id: str
    state: str
    display_name: str
    token: str
    class_name: str
    base_model: str
    base_model_sha256: str
    base_model_family: str
    method: str
    regularizers: tuple[str, ...]
    captions: str
    # TrainingOptions field name → value, every default filled in.
    options: dict
    training_captions: tuple[TrainingCaption, ...]
    steps_done: int
    final_loss: float
    resolution: int
    parent_concept_id: str
    persona_version: str
    created_at: float
    updated_at: float
    # The CustomContrast encoder id of a "customcontrast" concept (made without fine-tuning); '' otherwise.
    encoder: str = ""
    files: tuple[ConceptFile, ...] = field(default=())

    def files_of(self, role: str) -> list[ConceptFile]:
        return [f for f in self.files if f.role == role]


class ConceptStore:
    """Concept rows and their files, every read scoped to a tenant."""

    def __init__(self, db: MetadataStore):
        self.db = db

    def create(self, *, tenant_id: str, subject_id: str, display_name: str, token: str, class_name: str,
               base_model: str, base_model_sha256: str, base_model_family: str, method: str,
               regularizers: list[str], captions: str, options: dict, training_captions: list[TrainingCaption],
               resolution: int, persona_version: str, parent_concept_id: str = "", encoder: str = "") -> Concept:
        concept_id = f"cpt_{uuid.uuid4().hex[:16]}"
        now = time.time()
        self.db.execute(
            "INSERT INTO concepts (concept_id, tenant_id, subject_id, state, display_name, token, class_name,"
            " base_model, base_model_sha256, base_model_family, method, regularizers_json, captions, options_json,"
            " training_captions_json, resolution, persona_version, parent_concept_id, encoder, created_at, updated_at)"
            " VALUES (:id, :t, :s, :state, :d, :tok, :c, :bm, :bsha, :fam, :m, :regs, :caps, :opts, :tc, :res, :ver,"
            " :parent, :enc, :now, :now)",
            {"id": concept_id, "t": tenant_id, "s": subject_id, "state": TRAINING, "d": display_name, "tok": token,
             "c": class_name, "bm": base_model, "bsha": base_model_sha256, "fam": base_model_family, "m": method,
             "regs": json.dumps(regularizers), "caps": captions, "opts": json.dumps(options, sort_keys=True),
             "tc": json.dumps([c.__dict__ for c in training_captions]), "res": resolution, "ver": persona_version,
             "parent": parent_concept_id, "enc": encoder, "now": now})
        return self.get(concept_id)

    def get(self, concept_id: str, tenant_id: str | None = None) -> Concept:
        """The concept; NotFound when absent or owned by another tenant (when `tenant_id` is given)."""
        row = self.db.query_one("SELECT * FROM concepts WHERE concept_id = :id", {"id": concept_id})
        if row is None or (tenant_id is not None and row["tenant_id"] != tenant_id):
            raise NotFound(f"concept {concept_id!r} does not exist: see yours with `persona-cli concepts list`")
        files = self.db.query("SELECT * FROM concept_files WHERE concept_id = :id ORDER BY role, step, path",
                              {"id": concept_id})
        return _from_row(row, files)

    def on_base_model(self, tenant_id: str, base_model_sha256: str) -> list[Concept]:
        """The tenant's concepts trained on the base model with this content hash, newest first."""
        rows = self.db.query("SELECT concept_id FROM concepts WHERE tenant_id = :t AND base_model_sha256 = :b"
                             " ORDER BY created_at DESC", {"t": tenant_id, "b": base_model_sha256})
        return [self.get(r["concept_id"]) for r in rows]

    def list(self, tenant_id: str, page: Page, subject_id: str = "") -> tuple[list[Concept], str]:
        where, params = keyset_clause(page, "concept_id")
        subject_filter = " AND subject_id = :s" if subject_id else ""
        rows = self.db.query(
            f"SELECT concept_id, created_at FROM concepts WHERE tenant_id = :t{subject_filter} AND {where}"
            " ORDER BY created_at DESC, concept_id DESC LIMIT :n",
            {"t": tenant_id, "s": subject_id, "n": page.size + 1, **params})
        concepts = [self.get(r["concept_id"]) for r in rows[: page.size]]
        return concepts, next_token(rows, page, "concept_id")

    def update(self, concept_id: str, **fields) -> None:
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = :{name}" for name in fields)
        self.db.execute(f"UPDATE concepts SET {assignments} WHERE concept_id = :concept_id",
                        {**fields, "concept_id": concept_id})

    def put_file(self, concept_id: str, file: ConceptFile) -> None:
        self.db.execute(
            "INSERT INTO concept_files (concept_id, role, path, artifact_id, size_bytes, step, prompt)"
            " VALUES (:c, :role, :path, :a, :n, :step, :prompt) ON CONFLICT (concept_id, role, path) DO UPDATE"
            " SET artifact_id = excluded.artifact_id, size_bytes = excluded.size_bytes, step = excluded.step,"
            " prompt = excluded.prompt",
            {"c": concept_id, "role": file.role, "path": file.path, "a": file.artifact_id, "n": file.size_bytes,
             "step": file.step, "prompt": file.prompt})

    def replace_files(self, concept_id: str, role: str, files: list[ConceptFile]) -> None:
        """Sets the files of `role` to exactly `files`, in one transaction."""
        with self.db.transaction():
            self.db.execute("DELETE FROM concept_files WHERE concept_id = :c AND role = :r",
                            {"c": concept_id, "r": role})
            for file in files:
                self.put_file(concept_id, file)

    def delete(self, concept_id: str) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM concept_files WHERE concept_id = :c", {"c": concept_id})
            self.db.execute("DELETE FROM concepts WHERE concept_id = :c", {"c": concept_id})


def _from_row(row: dict, files: list[dict]) -> Concept:
    return Concept(
        concept_id=row["concept_id"], tenant_id=row["tenant_id"], subject_id=row["subject_id"], job_id=row["job_id"],
        state=row["state"], display_name=row["display_name"], token=row["token"], class_name=row["class_name"],
        base_model=row["base_model"], base_model_sha256=row["base_model_sha256"],
        base_model_family=row["base_model_family"], method=row["method"],
        regularizers=tuple(json.loads(row["regularizers_json"])), captions=row["captions"],
        options=json.loads(row["options_json"]),
        training_captions=tuple(TrainingCaption(**c) for c in json.loads(row["training_captions_json"])),
        steps_done=row["steps_done"], final_loss=row["final_loss"], resolution=row["resolution"],
        parent_concept_id=row["parent_concept_id"], persona_version=row["persona_version"],
        created_at=row["created_at"], updated_at=row["updated_at"], encoder=row.get("encoder") or "",
        files=tuple(ConceptFile(role=f["role"], path=f["path"], artifact_id=f["artifact_id"],
                                size_bytes=f["size_bytes"], step=f["step"], prompt=f["prompt"]) for f in files),
    )
