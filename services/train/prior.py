"""Prior preservation: class images drawn by the base model from the class prompt, cached and reused across runs.

DreamBooth's prior-preservation loss trains on the subject's photos and, alongside, on images the *base*
model draws for the plain class prompt ("a photo of a dog"), weighted by the prior loss weight, so the
class keeps its variety. Drawing a few hundred images costs minutes, and they depend only on the base
model and the sampling settings, so they are generated once, kept as PNG artifacts, and reused by every
later run with the same (base model, class prompt, count, seed, resolution, steps, guidance) key.

Image i is sampled from its own generator seeded with `seed + i`, so any subset regenerates on its own:
a run interrupted half-way continues from the images it already stored (journalled in
`prior_image_parts`), and a lost artifact is redrawn alone. The finished set is recorded in
`prior_images` in one transaction only after every image is stored, so a crash never leaves a
half-recorded set.

torch and diffusers are imported only by the default generator, so the cache itself stays cheap to import.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from PIL import Image

from persona.services.models.base_models import base_model_identity
from persona.services.runtime.artifacts import ArtifactStore
from persona.services.runtime.devices import device_name
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.model_loading import loading_models
from persona.services.subjects.domain import indefinite_article
from persona.services.subjects.images import png_bytes
from persona.services.runtime.metadata import MetadataStore, Migration

from .options import MAX_CLASS_IMAGES

MIGRATIONS = [
    Migration("prior_images", 1, (
        # One row per finished set. `image_sha256s`: JSON list of the PNG artifacts, image i at index i.
        # The key's inputs are kept beside it so an operator can see what a row is for.
        """CREATE TABLE prior_images (
            cache_key TEXT PRIMARY KEY, base_model_id TEXT NOT NULL, class_prompt TEXT NOT NULL,
            image_count INTEGER NOT NULL, seed INTEGER NOT NULL, resolution INTEGER NOT NULL,
            steps INTEGER NOT NULL, guidance_scale REAL NOT NULL, image_sha256s TEXT NOT NULL,
            created_at REAL NOT NULL)""",
        # Progress journal of a set still being generated: lets an interrupted generation continue
        # where it stopped. Emptied when the set is recorded in prior_images.
        """CREATE TABLE prior_image_parts (
            cache_key TEXT NOT NULL, image_index INTEGER NOT NULL, sha256 TEXT NOT NULL,
            PRIMARY KEY (cache_key, image_index))""",
    )),
]

# Bumped when the way images are drawn changes (seeding, sampler use), so older sets are not reused.
GENERATOR_VERSION = 1
# Pixels drawn per pipeline call: DreamBooth's sample_batch_size of 4 at 512 px. Smaller images go more to a call,
# up to MAX_BATCH_SIZE: the tiny model at 64 px is bound by per-call overhead, not arithmetic, so 100 class images
# in calls of 4 cost it several times what they cost in calls of 16.
PIXELS_PER_CALL = 4 * 512 * 512
MAX_BATCH_SIZE = 16

class ClassImageGenerator(Protocol):
    """Draws one image per seed, in order, for `prompt`; yields them as they are made."""

    def __call__(self, base_model_dir: Path, prompt: str, seeds: Sequence[int], resolution: int, steps: int,
                 guidance_scale: float) -> Iterable[Image.Image]: ...


def class_prompt_for(class_name: str) -> str:
    """DreamBooth's class prompt for `class_name`: "a photo of a dog", "a photo of an apple"."""
    name = " ".join((class_name or "").split())
    if not name:
        raise InvalidArgument("`class_name` is empty: pass the subject's class noun, e.g. --class dog")
    first = name.split(" ", 1)[0].lower()
    if first in ("a", "an", "the"):
        return f"a photo of {name}"  # the caller already chose the article
    return f"a photo of {indefinite_article(name)} {name}"


def cache_key(base_model_id: str, class_prompt: str, count: int, seed: int, resolution: int, steps: int,
              guidance_scale: float) -> str:
    """sha256 of everything that decides the class images; equal keys mean interchangeable sets."""
    fields = dict(version=GENERATOR_VERSION, base_model=base_model_id, class_prompt=class_prompt, count=count,
                  seed=seed, resolution=resolution, steps=steps, guidance_scale=float(guidance_scale))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def batch_size_for(resolution: int) -> int:
    """Images per pipeline call at `resolution`: 4 at 512 px, 16 at 256 px and below, 1 above 1024 px."""
    return max(1, min(MAX_BATCH_SIZE, PIXELS_PER_CALL // (resolution * resolution)))


class DiffusersClassImageGenerator:
    """The default generator: the base model's own StableDiffusionPipeline, loaded once per call, batched
    (`batch_size` images per pipeline call; None: batch_size_for the resolution)."""

    def __init__(self, batch_size: int | None = None, device: str | None = None):
        self.batch_size = batch_size
        self.device = device

    def __call__(self, base_model_dir: Path, prompt: str, seeds: Sequence[int], resolution: int, steps: int,
                 guidance_scale: float) -> Iterator[Image.Image]:
        import torch
        from diffusers import StableDiffusionPipeline

        device = device_name(self.device)
        # fp16 on a GPU halves memory and time; CPUs have no fast fp16 kernels.
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        # The folder's own scheduler (DDIM for `tiny`): class images should look like what the model draws.
        with loading_models():
            pipe = StableDiffusionPipeline.from_pretrained(
                base_model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        size = self.batch_size or batch_size_for(resolution)
        try:
            for start in range(0, len(seeds), size):
                batch = seeds[start:start + size]
                # CPU generators, one per image: the starting noise of image i depends only on seed + i,
                # whatever the device, batch size or where a resumed run starts.
                generators = [torch.Generator("cpu").manual_seed(s) for s in batch]
                with torch.inference_mode():
                    out = pipe([prompt] * len(batch), height=resolution, width=resolution,
                               num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                               output_type="pil")
                yield from out.images
        finally:
            del pipe
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


default_generator = DiffusersClassImageGenerator()


class ClassImageCache:
    """Class images for prior preservation, generated on first use and reused while their key matches."""

    def __init__(self, db: MetadataStore, artifacts: ArtifactStore):
        self.db = db
        self.artifacts = artifacts

    def get_or_generate(self, base_model_dir: Path, class_prompt: str, count: int, seed: int, resolution: int,
                        steps: int = 30, guidance_scale: float = 7.5,
                        generate: ClassImageGenerator | None = None,
                        on_progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """The `count` class images for this key, in order: from the cache, else drawn with the base model.

        `generate` replaces the diffusers generator (tests count calls through it); `on_progress(done,
        total)` is called once with what is already stored, then after each new image.
        """
        class_prompt = " ".join((class_prompt or "").split())
        _validate(class_prompt, count, resolution, steps, guidance_scale)
        model_id = base_model_identity(Path(base_model_dir))
        key = cache_key(model_id, class_prompt, count, seed, resolution, steps, guidance_scale)

        row = self.db.query_one("SELECT image_sha256s FROM prior_images WHERE cache_key = :k", {"k": key})
        if row is not None:
            digests: list[str | None] = json.loads(row["image_sha256s"])
        else:
            parts = self.db.query("SELECT image_index, sha256 FROM prior_image_parts WHERE cache_key = :k",
                                  {"k": key})
            digests = [None] * count
            for part in parts:
                if part["image_index"] < count:
                    digests[part["image_index"]] = part["sha256"]
        # A digest whose file is gone (store pruned, disk lost) is redrawn, not trusted.
        missing = [i for i, d in enumerate(digests) if d is None or not self.artifacts.exists(d)]
        if row is not None and not missing:
            return [self._load(d) for d in digests]

        done = count - len(missing)
        if on_progress:
            on_progress(done, count)
        if missing:
            images = (generate or default_generator)(
                Path(base_model_dir), class_prompt, [seed + i for i in missing], resolution, steps, guidance_scale)
            produced = 0
            for index, image in zip(missing, images):
                digest = self.artifacts.put(png_bytes(image))
                digests[index] = digest
                # Journal each image as soon as it is stored, so an interrupted run continues from here.
                self.db.execute(
                    "INSERT INTO prior_image_parts (cache_key, image_index, sha256) VALUES (:k, :i, :s) "
                    "ON CONFLICT (cache_key, image_index) DO UPDATE SET sha256 = excluded.sha256",
                    {"k": key, "i": index, "s": digest})
                produced += 1
                done += 1
                if on_progress:
                    on_progress(done, count)
            if produced != len(missing):
                raise RuntimeError(f"class image generator returned {produced} images for {len(missing)} seeds")

        # Every image is stored: record the set in one go and drop its journal.
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO prior_images (cache_key, base_model_id, class_prompt, image_count, seed, resolution,"
                " steps, guidance_scale, image_sha256s, created_at) VALUES (:k, :m, :p, :n, :seed, :r, :steps, :g,"
                " :d, :t) ON CONFLICT (cache_key) DO UPDATE SET image_sha256s = excluded.image_sha256s,"
                " created_at = excluded.created_at",
                {"k": key, "m": model_id, "p": class_prompt, "n": count, "seed": seed, "r": resolution,
                 "steps": steps, "g": float(guidance_scale), "d": json.dumps(digests), "t": time.time()})
            self.db.execute("DELETE FROM prior_image_parts WHERE cache_key = :k", {"k": key})
        return [self._load(d) for d in digests]

    def _load(self, digest: str) -> Image.Image:
        image = Image.open(io.BytesIO(self.artifacts.get(digest)))
        image.load()  # decode now: the bytes object is not kept
        return image.convert("RGB")


def _validate(class_prompt: str, count: int, resolution: int, steps: int, guidance_scale: float) -> None:
    if not class_prompt:
        raise InvalidArgument("`class_prompt` is empty: pass the class prompt, e.g. \"a photo of a dog\", "
                              "or leave it out to derive it from --class")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_CLASS_IMAGES:
        raise InvalidArgument(f"`class_images` is {count!r}: pass a count from 1 to {MAX_CLASS_IMAGES} "
                              "(DreamBooth uses 200 per subject)")
    if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise InvalidArgument(f"`resolution` is {resolution!r}: pass a positive multiple of 8, "
                              "e.g. the base model's native 512")
    if not isinstance(steps, int) or steps < 1:
        raise InvalidArgument(f"`class_steps` is {steps!r}: pass at least 1 inference step, e.g. 30")
    if not guidance_scale >= 0:
        raise InvalidArgument(f"`class_guidance_scale` is {guidance_scale!r}: pass 0 or more, e.g. 7.5")
