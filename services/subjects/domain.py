"""Subjects: create (validate every photo first, then store all in one transaction), get, list, delete."""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from persona.services.runtime.artifacts import ArtifactStore
from persona.services.runtime.budget import Budget
from persona.services.runtime.errors import InvalidArgument, NotFound
from persona.services.runtime.metadata import MetadataStore, Migration
from persona.services.runtime.paging import Page, keyset_clause, next_token

from .images import ValidatedImage, image_pixels, validate_image
from .settings import SubjectSettings

MIGRATIONS = [
    Migration("subjects", 1, (
        """CREATE TABLE subjects (
            subject_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, class_name TEXT NOT NULL,
            token TEXT NOT NULL, display_name TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL)""",
        "CREATE INDEX subjects_by_tenant ON subjects (tenant_id, created_at)",
        """CREATE TABLE subject_images (
            image_id TEXT PRIMARY KEY,
            subject_id TEXT NOT NULL REFERENCES subjects(subject_id) ON DELETE CASCADE,
            idx INTEGER NOT NULL, filename TEXT NOT NULL DEFAULT '', width INTEGER NOT NULL,
            height INTEGER NOT NULL, media_type TEXT NOT NULL, sha256 TEXT NOT NULL,
            size_bytes INTEGER NOT NULL, UNIQUE (subject_id, idx))""",
    )),
]

DEFAULT_TOKEN = "sks"
_CLASS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 '\-]*$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")


@dataclass(frozen=True)
class SubjectImage:
    image_id: str
    index: int
    filename: str
    width: int
    height: int
    media_type: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Subject:
    subject_id: str
    tenant_id: str
    class_name: str
    token: str
    display_name: str
    created_at: float
    images: list[SubjectImage] = field(default_factory=list)

    def image(self, image_id: str) -> SubjectImage:
        for image in self.images:
            if image.image_id == image_id:
                return image
        raise NotFound(f"`image_id` {image_id!r} is not an image of subject {self.subject_id}: "
                       f"see its images with `persona-cli subjects show {self.subject_id}`")


def normalize_class_name(class_name: str) -> str:
    name = " ".join(class_name.split())
    if not name:
        raise InvalidArgument("`class_name` is empty: pass the subject's class noun, e.g. --class dog")
    if len(name) > 64:
        raise InvalidArgument(f"`class_name` is {len(name)} characters; at most 64: use the plain class noun, e.g. dog")
    if not _CLASS_RE.match(name):
        raise InvalidArgument(f"`class_name` {name!r} has characters other than letters, digits, spaces, "
                              "hyphens and apostrophes: use the plain class noun, e.g. stuffed animal")
    return name


# DreamBench's live subjects (its dogs and cats): evaluation gives them its live prompts, CoRe its animate ones.
LIVE_CLASSES = frozenset({"dog", "cat"})


def indefinite_article(noun: str) -> str:
    """"a" or "an" before a class noun ("a dog", "an apple", "a unicorn", "an hourglass")."""
    word = noun.lower()
    # Spelling, not sound, decides in most cases; these are the common nouns where the two disagree.
    if word.startswith(("hour", "honest", "honou", "heir")):
        return "an"
    if word.startswith(("uni", "use", "usu", "ute", "eu", "ewe", "one", "once", "ukulele", "urinal")):
        return "a"
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def normalize_token(token: str) -> str:
    token = token.strip() or DEFAULT_TOKEN
    if not _TOKEN_RE.match(token):
        raise InvalidArgument(f"`token` {token!r} must be one word of 1–32 letters or digits, "
                              "ideally rare in the tokenizer's vocabulary, e.g. sks")
    return token


class SubjectRepository:
    """The subjects of every tenant; every read is scoped to the caller's tenant."""

    def __init__(self, db: MetadataStore, artifacts: ArtifactStore, settings: SubjectSettings):
        self.db = db
        self.artifacts = artifacts
        self.settings = settings
        # Pixels decoded at once across concurrent uploads: the memory uploads may take.
        self.decoding = Budget(max(settings.decode_budget_pixels, settings.max_image_pixels), queue=64,
                               wait_s=settings.decode_wait_s, what="photo decoding",
                               settings="PERSONA_DECODE_BUDGET_PIXELS")

    def _validated(self, uploads: list[tuple[bytes, str]]) -> list[ValidatedImage]:
        """Every photo decoded and checked, one at a time, within the process's decode budget."""
        limits = self.settings
        # From the headers, before decoding anything; photos over the per-photo limit are refused by validate_image.
        pixels = [image_pixels(data) for data, _ in uploads]
        total = sum(n for n in pixels if n <= limits.max_image_pixels)
        if total > limits.max_request_pixels:
            raise InvalidArgument(f"`images` hold {total / 1e6:.0f} megapixels together; one upload takes at most "
                                  f"{limits.max_request_pixels / 1e6:.0f} (PERSONA_MAX_UPLOAD_PIXELS): downscale the "
                                  "photos or upload fewer")
        validated = []
        for i, ((data, filename), n) in enumerate(zip(uploads, pixels)):
            with self.decoding.hold(n if n <= limits.max_image_pixels else 0):
                validated.append(validate_image(f"images[{i}]", data, filename, limits))
        return validated

    def create(self, tenant_id: str, class_name: str, token: str, display_name: str,
               uploads: list[tuple[bytes, str]]) -> Subject:
        """Validates everything first; stores nothing unless every photo is accepted."""
        class_name = normalize_class_name(class_name)
        token = normalize_token(token)
        if len(display_name) > 200:
            raise InvalidArgument(f"`display_name` is {len(display_name)} characters; at most 200")
        if not uploads:
            raise InvalidArgument("`images` is empty: upload 1 to "
                                  f"{self.settings.max_images} photos of the subject (3–7 work best)")
        if len(uploads) > self.settings.max_images:
            raise InvalidArgument(f"`images` has {len(uploads)} photos; at most {self.settings.max_images} "
                                  "(PERSONA_MAX_IMAGES_PER_SUBJECT): pick the 3–7 most varied")
        validated = self._validated(uploads)
        subject_id = f"subj_{uuid.uuid4().hex[:16]}"
        now = time.time()
        digests = [self.artifacts.put(v.data) for v in validated]  # content-addressed: safe before the commit
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO subjects (subject_id, tenant_id, class_name, token, display_name, created_at)"
                " VALUES (:id, :t, :c, :tok, :d, :now)",
                {"id": subject_id, "t": tenant_id, "c": class_name, "tok": token, "d": display_name, "now": now},
            )
            for index, (image, digest) in enumerate(zip(validated, digests)):
                self.db.execute(
                    "INSERT INTO subject_images (image_id, subject_id, idx, filename, width, height, media_type,"
                    " sha256, size_bytes) VALUES (:id, :s, :i, :f, :w, :h, :m, :sha, :n)",
                    {"id": f"img_{uuid.uuid4().hex[:16]}", "s": subject_id, "i": index, "f": image.filename,
                     "w": image.width, "h": image.height, "m": image.media_type, "sha": digest,
                     "n": len(image.data)},
                )
        return self.get(tenant_id, subject_id)

    def get(self, tenant_id: str, subject_id: str) -> Subject:
        if not subject_id:
            raise InvalidArgument("`subject_id` is empty: pass the id `persona-cli subjects add` printed")
        row = self.db.query_one("SELECT * FROM subjects WHERE subject_id = :id AND tenant_id = :t",
                                {"id": subject_id, "t": tenant_id})
        if row is None:  # another tenant's subject is NOT_FOUND too: existence is not leaked
            raise NotFound(f"`subject_id` {subject_id!r} does not exist: list yours with `persona-cli subjects list`")
        return self._with_images(row)

    def list(self, tenant_id: str, page: Page) -> tuple[list[Subject], str]:
        where, params = keyset_clause(page, "subject_id")
        rows = self.db.query(
            f"SELECT * FROM subjects WHERE tenant_id = :t AND {where}"
            " ORDER BY created_at DESC, subject_id DESC LIMIT :n",
            {"t": tenant_id, "n": page.size + 1, **params},
        )
        return [self._with_images(r) for r in rows[: page.size]], next_token(rows, page, "subject_id")

    def delete(self, tenant_id: str, subject_id: str) -> None:
        self.get(tenant_id, subject_id)
        # Image records and captions go with it (ON DELETE CASCADE); artifacts are content-addressed
        # and may be shared, so they stay until a garbage collection.
        self.db.execute("DELETE FROM subjects WHERE subject_id = :id AND tenant_id = :t",
                        {"id": subject_id, "t": tenant_id})

    def image_bytes(self, tenant_id: str, subject_id: str, image_id: str) -> tuple[SubjectImage, bytes]:
        image = self.get(tenant_id, subject_id).image(image_id)
        return image, self.artifacts.get(image.sha256)

    def image_rgb(self, tenant_id: str, subject_id: str, image_id: str):
        """The stored photo decoded as an RGB PIL image (stored photos are upright: EXIF rotation was applied at
        upload)."""
        import io

        from PIL import Image

        _, data = self.image_bytes(tenant_id, subject_id, image_id)
        return Image.open(io.BytesIO(data)).convert("RGB")

    def _with_images(self, row: dict) -> Subject:
        images = [
            SubjectImage(image_id=r["image_id"], index=r["idx"], filename=r["filename"], width=r["width"],
                         height=r["height"], media_type=r["media_type"], sha256=r["sha256"],
                         size_bytes=r["size_bytes"])
            for r in self.db.query("SELECT * FROM subject_images WHERE subject_id = :id ORDER BY idx",
                                   {"id": row["subject_id"]})
        ]
        return Subject(subject_id=row["subject_id"], tenant_id=row["tenant_id"], class_name=row["class_name"],
                       token=row["token"], display_name=row["display_name"], created_at=row["created_at"],
                       images=images)
