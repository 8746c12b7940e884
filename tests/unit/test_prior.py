"""Prior preservation: class images generated once with the tiny base model, then reused (generations counted)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.metadata import SQLiteMetadataStore
from persona.services.train import prior
from persona.services.models.base_models import base_model_identity
from persona.services.train.prior import ClassImageCache, class_prompt_for

PROMPT = "a photo of a dog"
# 64 px (the tiny model's native size), 2 steps, guidance 1 (no classifier-free pass): seconds on a CPU.
SMALL = dict(resolution=64, steps=2, guidance_scale=1.0)
KEY = dict(class_prompt=PROMPT, count=3, seed=7, **SMALL)


class CountingGenerator:
    """Wraps a generator (the default diffusers one unless given), counting calls and images drawn."""

    def __init__(self, inner=None):
        self.inner = inner or prior.default_generator
        self.calls: list[list[int]] = []
        self.images = 0

    def __call__(self, base_model_dir, prompt, seeds, resolution, steps, guidance_scale):
        self.calls.append(list(seeds))
        for image in self.inner(base_model_dir, prompt, seeds, resolution, steps, guidance_scale):
            self.images += 1
            yield image


def flat_colour(base_model_dir, prompt, seeds, resolution, steps, guidance_scale):
    """A stand-in for the diffusers generator where only the cache logic is under test: one colour per seed."""
    for s in seeds:
        yield Image.new("RGB", (resolution, resolution), (s % 256, 0, 0))


def open_stores(root: Path) -> tuple[SQLiteMetadataStore, LocalArtifactStore]:
    db = SQLiteMetadataStore(root / "meta.sqlite3")
    db.migrate(prior.MIGRATIONS)
    return db, LocalArtifactStore(root / "artifacts")


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


@pytest.fixture(scope="session")
def tiny(tiny_model) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def generated(tiny, tmp_path_factory):
    """Stores holding KEY's 3 class images, drawn once by the real tiny model: (folder, images, generator, progress)."""
    root = tmp_path_factory.mktemp("generated")
    db, artifacts = open_stores(root)
    gen, progress = CountingGenerator(), []
    images = ClassImageCache(db, artifacts).get_or_generate(
        tiny, generate=gen, on_progress=lambda done, total: progress.append((done, total)), **KEY)
    db.close()
    return root, images, gen, progress


@pytest.fixture
def stores(generated, tmp_path):
    """A private copy of the generated stores, reopened as a later run would."""
    shutil.copytree(generated[0], tmp_path / "stores")
    db, artifacts = open_stores(tmp_path / "stores")
    yield db, artifacts
    db.close()


def test_first_call_generates_each_image_from_its_seed(generated):
    _, images, gen, progress = generated
    assert gen.calls == [[7, 8, 9]] and gen.images == 3
    assert [im.size for im in images] == [(64, 64)] * 3 and all(im.mode == "RGB" for im in images)
    assert progress == [(0, 3), (1, 3), (2, 3), (3, 3)]
    # Seeds differ per image, so the images do too.
    assert not np.array_equal(pixels(images)[0], pixels(images)[1])


def test_a_later_run_reuses_them_with_identical_pixels(tiny, generated, stores):
    gen = CountingGenerator()
    # A new cache on reopened stores: what a new run in a new process sees.
    again = ClassImageCache(*stores).get_or_generate(tiny, generate=gen, **KEY)
    assert gen.calls == [] and gen.images == 0
    assert all(np.array_equal(a, b) for a, b in zip(pixels(generated[1]), pixels(again)))
    assert stores[0].query_one("SELECT COUNT(*) AS n FROM prior_image_parts")["n"] == 0


@pytest.mark.parametrize("change", [dict(seed=8), dict(count=2), dict(class_prompt="a photo of a cat"),
                                    dict(steps=3), dict(guidance_scale=7.5)])
def test_a_different_key_generates_anew(tiny, stores, change):
    gen = CountingGenerator(flat_colour)
    changed = {**KEY, **change}
    images = ClassImageCache(*stores).get_or_generate(tiny, generate=gen, **changed)
    assert len(images) == changed["count"] and gen.images == changed["count"] and len(gen.calls) == 1


def test_a_copied_model_folder_keeps_its_identity(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    assert base_model_identity(copy) == base_model_identity(tiny)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert base_model_identity(copy) != base_model_identity(tiny)


def test_a_missing_artifact_is_redrawn_alone_from_its_seed(tiny, generated, stores):
    db, artifacts = stores
    cache, gen = ClassImageCache(db, artifacts), CountingGenerator()
    lost = json.loads(db.query_one("SELECT image_sha256s FROM prior_images")["image_sha256s"])[1]
    artifacts.path_of(lost).unlink()

    again = cache.get_or_generate(tiny, generate=gen, **KEY)
    # Only image 1 is drawn again, from its own seed (7 + 1), by the real model; the others come from the cache.
    assert gen.calls == [[8]] and gen.images == 1
    first = pixels(generated[1])
    assert np.array_equal(first[0], pixels(again)[0]) and np.array_equal(first[2], pixels(again)[2])
    # Same seed, so the same image, up to the numerics of a batch of 1 instead of 3.
    assert np.abs(first[1].astype(int) - pixels(again)[1].astype(int)).max() <= 2
    # The row now points at the redrawn image: the next call generates nothing.
    cache.get_or_generate(tiny, generate=gen, **KEY)
    assert gen.images == 1


def test_an_interrupted_generation_continues_where_it_stopped(tiny, tmp_path):
    db, artifacts = open_stores(tmp_path)
    cache = ClassImageCache(db, artifacts)

    def killed_after_two(*args):
        for n, image in enumerate(flat_colour(*args)):
            if n == 2:
                raise KeyboardInterrupt("killed")
            yield image

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_generate(tiny, generate=killed_after_two, **KEY)
    # No set recorded, two images journalled.
    assert db.query("SELECT * FROM prior_images") == []
    assert db.query_one("SELECT COUNT(*) AS n FROM prior_image_parts")["n"] == 2

    gen = CountingGenerator(flat_colour)
    images = cache.get_or_generate(tiny, generate=gen, **KEY)
    assert gen.calls == [[9]]
    assert [im.getpixel((0, 0)) for im in images] == [(7, 0, 0), (8, 0, 0), (9, 0, 0)]
    assert db.query_one("SELECT COUNT(*) AS n FROM prior_images")["n"] == 1
    assert db.query_one("SELECT COUNT(*) AS n FROM prior_image_parts")["n"] == 0
    db.close()


@pytest.mark.parametrize("count", [0, -1, 1001, 2.5, True])
def test_a_bad_count_names_class_images(tmp_path, count):
    with pytest.raises(InvalidArgument, match="`class_images`"):
        ClassImageCache(*open_stores(tmp_path)).get_or_generate(tmp_path, PROMPT, count=count, seed=0, **SMALL)


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_an_empty_prompt_names_class_prompt(tmp_path, prompt):
    with pytest.raises(InvalidArgument, match="`class_prompt`"):
        ClassImageCache(*open_stores(tmp_path)).get_or_generate(tmp_path, prompt, count=3, seed=0, **SMALL)


@pytest.mark.parametrize("name, prompt", [
    ("dog", "a photo of a dog"),
    ("apple", "a photo of an apple"),
    ("  red   backpack ", "a photo of a red backpack"),
    ("umbrella", "a photo of an umbrella"),
    ("unicorn", "a photo of a unicorn"),
    ("hourglass", "a photo of an hourglass"),
    ("an owl", "a photo of an owl"),
])
def test_class_prompt_for(name, prompt):
    assert class_prompt_for(name) == prompt


def test_class_prompt_for_an_empty_class_names_it():
    with pytest.raises(InvalidArgument, match="`class_name`"):
        class_prompt_for(" ")


@pytest.mark.parametrize("resolution, size", [(512, 4), (64, 16), (256, 16), (384, 7), (768, 1), (2048, 1)])
def test_class_images_per_pipeline_call_follow_a_pixel_budget(resolution, size):
    # 4 images of 512² per call (DreamBooth's sample_batch_size): 4·512²/384² = 7.1 → 7; at most 16, at least 1.
    assert prior.batch_size_for(resolution) == size
