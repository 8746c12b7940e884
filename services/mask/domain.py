"""Mask use cases: make a subject image's mask from clicks or text, store it with the image, hand it out.

A mask is a PNG artifact (mode L, 255 = subject) recorded in the `masks` table against the subject image (one
per image: a new mask replaces the old, and deleting the subject deletes the row). Training (masked loss) and
evaluation read masks through `mask_array`. The models that make masks are loaded once per process and shared
(`MaskModels`): CLIP-L is 1.7 GB and seconds to load.
"""
from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.errors import InvalidArgument, NotFound
from persona.services.runtime.metadata import MetadataStore, Migration
from persona.services.runtime.model_access import ModelAccess

from ..subjects.domain import Subject, SubjectRepository
from .settings import MaskSettings

MIGRATIONS = [
    Migration("masks", 1, (
        """CREATE TABLE masks (
            image_id TEXT PRIMARY KEY REFERENCES subject_images(image_id) ON DELETE CASCADE,
            subject_id TEXT NOT NULL, tenant_id TEXT NOT NULL, artifact_id TEXT NOT NULL,
            width INTEGER NOT NULL, height INTEGER NOT NULL, method TEXT NOT NULL,
            details_json TEXT NOT NULL, coverage REAL NOT NULL, created_at REAL NOT NULL)""",
        "CREATE INDEX masks_by_subject ON masks (subject_id)",
    )),
]

POINTS = "p3s-points"
CLIPSEG = "clipseg"
GROUNDED_SAM = "grounded-sam"
TEXT_METHODS = (GROUNDED_SAM, CLIPSEG)
MAX_POINTS = 32
MAX_TEXT_CHARS = 200


@dataclass(frozen=True)
class StoredMask:
    subject_id: str
    image_id: str
    artifact_id: str
    width: int
    height: int
    method: str
    positive: tuple[tuple[int, int], ...] = ()
    negative: tuple[tuple[int, int], ...] = ()
    text: str = ""
    models: tuple[str, ...] = ()
    coverage: float = 0.0
    created_at: float = 0.0


@dataclass
class MaskModels:
    """The mask-making models of this process, each loaded on first use and kept (keyed by model id)."""

    settings: MaskSettings
    _loaded: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _get(self, key: tuple, make):
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = make()
            return self._loaded[key]

    def point_mask(self, image: Image.Image, positive, negative, model: str) -> tuple[np.ndarray, tuple[str, ...]]:
        from . import p3s

        features = self._get(("clip", model), lambda: p3s.ClipPatchFeatures(model, device=self.settings.device))
        mask = p3s.point_mask(features(image), positive, negative, image.size)
        return mask, (model,)

    def text_mask(self, image: Image.Image, text: str, method: str) -> tuple[np.ndarray, tuple[str, ...]]:
        from . import grounded

        s = self.settings
        if method == CLIPSEG:
            masker = self._get(("clipseg", s.clipseg_model),
                               lambda: grounded.ClipSegMasker(s.clipseg_model, device=s.device))
        else:
            masker = self._get(("grounded-sam", s.detector_model, s.segmenter_model),
                               lambda: grounded.GroundedSamMasker(s.detector_model, s.segmenter_model,
                                                                  device=s.device))
        result = masker.mask(image, text)
        return result.mask, tuple(result.model_ids)


class MaskDomain:
    def __init__(self, db: MetadataStore, artifacts: LocalArtifactStore, subjects: SubjectRepository,
                 settings: MaskSettings, models: MaskModels | None = None, access: ModelAccess | None = None):
        self.db, self.artifacts, self.subjects, self.settings = db, artifacts, subjects, settings
        # Which models a request's `model` may name (default: any folder, as the embedded CLI).
        self.access = access or ModelAccess()
        self.models = models or MaskModels(settings)

    def from_points(self, tenant_id: str, subject_id: str, image_id: str, positive: Sequence[tuple[int, int]],
                    negative: Sequence[tuple[int, int]] = (), model: str = "") -> StoredMask:
        """P3S point supervision on one image; the mask is stored as that image's mask."""
        if not image_id:
            raise InvalidArgument("`image_id` is empty: pass one of the subject's images (`persona-cli subjects show "
                                  f"{subject_id}` lists them), or --image N on the CLI")
        if not positive:
            raise InvalidArgument("`positive` is empty: click at least one point on the subject, e.g. --point 320,240")
        if len(positive) + len(negative) > MAX_POINTS:
            raise InvalidArgument(f"{len(positive) + len(negative)} points: at most {MAX_POINTS} in all")
        subject = self.subjects.get(tenant_id, subject_id)
        image = self._image(tenant_id, subject, image_id)
        for name, points in (("positive", positive), ("negative", negative)):
            for index, (x, y) in enumerate(points):
                if not (0 <= x < image.width and 0 <= y < image.height):
                    raise InvalidArgument(
                        f"`{name}[{index}]` ({x}, {y}) is outside the {image.width}×{image.height} image: x must be "
                        f"in 0–{image.width - 1}, y in 0–{image.height - 1}")
        model = self.access.locate(model, "model") if model.strip() else self.settings.clip_model
        mask, models = self.models.point_mask(image, list(positive), list(negative), model)
        return self._store(tenant_id, subject, image_id, mask, POINTS, models,
                           positive=tuple(map(tuple, positive)), negative=tuple(map(tuple, negative)))

    def from_text(self, tenant_id: str, subject_id: str, image_id: str = "", text: str = "",
                  method: str = GROUNDED_SAM) -> list[StoredMask]:
        """Masks of what `text` (default: the class name) names, in one image or every image of the subject."""
        if method not in TEXT_METHODS:
            raise InvalidArgument(f"`method` is {method!r}: use one of {', '.join(TEXT_METHODS)}")
        text = " ".join(text.split())
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"`text` is {len(text)} characters; at most {MAX_TEXT_CHARS}: name the subject, "
                                  "e.g. dog")
        subject = self.subjects.get(tenant_id, subject_id)
        text = text or subject.class_name
        image_ids = [image_id] if image_id else [i.image_id for i in subject.images]
        images = [(i, self._image(tenant_id, subject, i)) for i in image_ids]  # every id checked before any work
        stored = []
        for one_id, image in images:
            mask, models = self.models.text_mask(image, text, method)
            stored.append(self._store(tenant_id, subject, one_id, mask, method, models, text=text))
        return stored

    def segment(self, image: Image.Image, text: str, method: str = GROUNDED_SAM) -> np.ndarray:
        """The bool (H, W) mask of what `text` names in an image that is not a subject photo (e.g. a generated
        one), with this process's mask models; nothing is stored."""
        return self.models.text_mask(image, text, method)[0]

    def get(self, tenant_id: str, subject_id: str, image_id: str) -> StoredMask:
        subject = self.subjects.get(tenant_id, subject_id)
        subject.image(image_id)  # NOT_FOUND naming the image when it is not the subject's
        row = self.db.query_one("SELECT * FROM masks WHERE image_id = :i AND tenant_id = :t",
                                {"i": image_id, "t": tenant_id})
        if row is None:
            raise NotFound(f"image {image_id} of subject {subject_id} has no mask yet: make one with "
                           f"`persona-cli mask {subject_id} --image N --point X,Y` or `--text {subject.class_name}`")
        return _from_row(row)

    def png(self, mask: StoredMask) -> bytes:
        return self.artifacts.get(mask.artifact_id)

    def mask_array(self, tenant_id: str, subject_id: str, image_id: str) -> np.ndarray | None:
        """The image's mask as a bool (H, W) array, or None when it has none (for training and evaluation)."""
        try:
            mask = self.get(tenant_id, subject_id, image_id)
        except NotFound:
            return None
        return np.asarray(Image.open(io.BytesIO(self.png(mask)))) > 127

    def negative_region(self, tenant_id: str, subject_id: str, image_id: str) -> np.ndarray | None:
        """The bool (H, W) region of the photo's stored negative clicks, or None when its mask came from no
        negative click (no mask, a text mask, or only positive points). Reading of P3S Eq. 3's "rough mask of
        negative subject": the point algorithm (p3s.point_mask: similarity to the clicked patches, Gaussian, Otsu,
        components at the clicks) run on the negative clicks alone, on the CLIP model that made the stored mask.
        The positive clicks do not suppress it (1 − M_P): a second dog resembles the first, so that factor would
        erase the very region to remove; the subject is protected by its own mask instead (the fill region is this
        region minus the subject mask). Nothing is stored."""
        try:
            stored = self.get(tenant_id, subject_id, image_id)
        except NotFound:
            return None
        if stored.method != POINTS or not stored.negative:
            return None
        subject = self.subjects.get(tenant_id, subject_id)
        image = self._image(tenant_id, subject, image_id)
        model = stored.models[0] if stored.models else self.settings.clip_model
        region, _ = self.models.point_mask(image, list(stored.negative), [], model)
        return np.asarray(region, dtype=bool)

    # -- helpers

    def _image(self, tenant_id: str, subject: Subject, image_id: str) -> Image.Image:
        subject.image(image_id)  # NOT_FOUND naming the image and how to list the subject's images
        return self.subjects.image_rgb(tenant_id, subject.subject_id, image_id)

    def _store(self, tenant_id: str, subject: Subject, image_id: str, mask: np.ndarray, method: str,
               models: tuple[str, ...], *, positive=(), negative=(), text: str = "") -> StoredMask:
        mask = np.asarray(mask, dtype=bool)
        buffer = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
        artifact_id = self.artifacts.put(buffer.getvalue())
        stored = StoredMask(subject.subject_id, image_id, artifact_id, mask.shape[1], mask.shape[0], method,
                            tuple(positive), tuple(negative), text, tuple(models), float(mask.mean()), time.time())
        details = {"positive": [list(p) for p in positive], "negative": [list(p) for p in negative], "text": text,
                   "models": list(models)}
        self.db.execute(
            "INSERT INTO masks (image_id, subject_id, tenant_id, artifact_id, width, height, method, details_json,"
            " coverage, created_at) VALUES (:i, :s, :t, :a, :w, :h, :m, :d, :c, :at)"
            " ON CONFLICT(image_id) DO UPDATE SET artifact_id = excluded.artifact_id, width = excluded.width,"
            " height = excluded.height, method = excluded.method, details_json = excluded.details_json,"
            " coverage = excluded.coverage, created_at = excluded.created_at",
            {"i": image_id, "s": subject.subject_id, "t": tenant_id, "a": artifact_id, "w": stored.width,
             "h": stored.height, "m": method, "d": json.dumps(details), "c": stored.coverage,
             "at": stored.created_at})
        return stored


def _from_row(row) -> StoredMask:
    details = json.loads(row["details_json"])
    return StoredMask(row["subject_id"], row["image_id"], row["artifact_id"], row["width"], row["height"],
                      row["method"], tuple(tuple(p) for p in details["positive"]),
                      tuple(tuple(p) for p in details["negative"]), details["text"], tuple(details["models"]),
                      row["coverage"], row["created_at"])
