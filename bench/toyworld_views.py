"""Multi-view subjects drawn in the toy world (../shared/toyworld/README.md), written as a CustomContrast dataset
folder (services/train/customcontrast/multiview.py): the tests' data and the encoder demonstration's.

A subject is an identity that never changes — shape, colour and the stripes of a second colour only the encoder can
carry — and each view redraws it with what CustomContrast must learn to ignore: a new background (pattern and
colours), position and size within the world's ranges, and sometimes a small nearby object at a lower corner. Each
view's mask is the subject's pixels. numpy + PIL only, seeded, 64 px by default (the toy model's size).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from persona.services.evaluate.toyworld import PALETTE

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
PATTERNS = ("plain", "striped", "checkered", "dotted")


@dataclass(frozen=True)
class ToySubject:
    shape: str
    colour: str
    stripes: str | None  # the identity detail: diagonal stripes of this colour, or none

    @property
    def name(self) -> str:
        return "-".join(filter(None, (self.colour, self.shape, self.stripes and f"{self.stripes}-striped")))


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape centred at (cx, cy) in pixels."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - cx, yy - cy
    distance = np.hypot(dx, dy)
    if shape == "circle":
        return distance <= radius
    if shape == "ring":
        return (distance <= radius) & (distance >= 0.55 * radius)
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.8 * radius
    if shape == "diamond":
        return abs(dx) + abs(dy) <= radius
    if shape == "cross":
        arm = 0.3 * radius
        return ((abs(dx) <= arm) & (abs(dy) <= radius)) | ((abs(dy) <= arm) & (abs(dx) <= radius))
    if shape == "triangle":  # apex up
        height = (dy + radius) / (1.8 * radius)
        return (dy >= -radius) & (dy <= 0.8 * radius) & (abs(dx) <= height * radius)
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def _pattern(kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(size // 8, 2)
    if kind == "plain":
        return np.zeros((size, size), bool)
    if kind == "striped":
        return (xx // (period // 2 or 1)) % 2 == 1
    if kind == "checkered":
        return (xx // period + yy // period) % 2 == 1
    return (xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2 <= (period / 4) ** 2  # dotted


def draw_view(subject: ToySubject, rng: random.Random, size: int = 64) -> tuple[Image.Image, Image.Image, dict]:
    """One view of `subject`: (image, mask, description of what varied)."""
    colour = lambda name: np.array(PALETTE[name]) * 255  # noqa: E731
    taken = {subject.colour, subject.stripes}
    free = [c for c in PALETTE if c not in taken]
    background, second = rng.sample(free, 2)
    pattern = rng.choice(PATTERNS)
    pixels = np.empty((size, size, 3))
    pixels[:] = colour(background)
    pixels[_pattern(pattern, size)] = colour(second)

    radius = rng.uniform(0.18, 0.28) * size
    cx, cy = (rng.uniform(size / 3, 2 * size / 3) for _ in range(2))
    mask = shape_mask(subject.shape, size, cx, cy, radius)
    pixels[mask] = colour(subject.colour)
    if subject.stripes:
        yy, xx = np.mgrid[0:size, 0:size]
        pixels[mask & (((xx + yy) // max(size // 16, 1)) % 2 == 1)] = colour(subject.stripes)

    nearby = None
    if rng.random() < 0.5:
        small = rng.uniform(0.06, 0.10) * size
        corner_x = small + 1 if rng.random() < 0.5 else size - small - 1
        nearby = {"shape": rng.choice(SHAPES), "colour": rng.choice([c for c in free if c not in (background, second)])}
        object_mask = shape_mask(nearby["shape"], size, corner_x, size - small - 1, small) & ~mask
        pixels[object_mask] = colour(nearby["colour"])
    description = {"background": [pattern, background, second], "centre": [round(cx, 1), round(cy, 1)],
                   "radius": round(radius, 1), "nearby": nearby}
    return (Image.fromarray(pixels.round().astype(np.uint8)), Image.fromarray((mask * 255).astype(np.uint8)),
            description)


def toy_subjects(count: int, rng: random.Random) -> list[ToySubject]:
    """`count` distinct identities (shape, colour, stripes)."""
    identities = [(s, c, t) for s in SHAPES for c in PALETTE for t in (None, *PALETTE) if t != c]
    return [ToySubject(*identity) for identity in rng.sample(identities, count)]


def write_multiview_dataset(root: str | Path, subjects: int = 4, views: int = 3, seed: int = 0,
                            size: int = 64) -> Path:
    """Writes `subjects` toy subjects × `views` views (with masks and subject.json) in the dataset layout."""
    rng, root = random.Random(seed), Path(root)
    for subject in toy_subjects(subjects, rng):
        folder = root / subject.name
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        described = []
        for index in range(views):
            image, mask, description = draw_view(subject, rng, size)
            image.save(folder / f"{index:02d}.png")
            mask.save(folder / "masks" / f"{index:02d}.png")
            described.append(description)
        (folder / "subject.json").write_text(json.dumps(
            {"class": subject.shape, "colour": subject.colour, "stripes": subject.stripes, "views": described},
            indent=1))
    return root
