"""The toy world's entanglement measures (../shared/toyworld/README.md), and its reference-set reader.

In the toy world every colour is one of ten, so leakage is a pixel count: each pixel of a generated image is
mapped to the nearest palette colour, then

- nearby-object leakage: the fraction of pixels of the reference's nearby object's colour;
- nearby-object leakage, object-sized regions only: the same, counting only 4-connected regions of that colour of
  at most 6 % of the image (the object covers ≤ 4 %; a subject drawn in its colour does not count), and 0 in an
  image whose outer frame is at least a quarter that colour (a background or its pattern drawn in it, which the
  base model does by itself on a background-unsaid prompt; a leaked object in a corner covers at most ~12 % of the
  64-px frame);
- background leakage: the fraction of the outer 5-pixel frame in the reference background's colours (drawn on a
  prompt that leaves the background unsaid);
- text alignment: whether an asked plain background covers ≥ 40 % of the image;
- subject fidelity: whether the subject's colours (body + stripes) cover ≥ 3 % of the image.

Pure functions over H×W×3 arrays (uint8 0–255 or float 0–1) and PIL images; nothing here knows gRPC or torch.
A reference set is any folder holding photos and a `scene.json` in the shared sets' format.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from persona.services.runtime.errors import InvalidArgument

# The world's colours, RGB in 0–1, in the README's order.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.25, 0.9), "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.2, 0.75), "orange": (0.95, 0.5, 0.05), "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08), "pink": (0.95, 0.55, 0.7), "cyan": (0.1, 0.8, 0.85),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
PATTERNS = ("plain", "striped", "checkered", "dotted")
FRAME_WIDTH = 5
# Text alignment: the asked plain background covers at least this fraction of the image.
ASKED_BACKGROUND_MIN = 0.40
# Subject fidelity: the subject's colours cover at least this fraction of the image.
SUBJECT_MIN = 0.03
# The nearby object's colour covering at least this fraction of the frame is a drawn background, not the object.
NEARBY_AS_BACKGROUND = 0.25
# The world's nearby object has a radius of 6–10 % of the side: at most 4 % of the image (a square). A connected
# region of its colour over 1.5x that is something else drawn in it — the subject's body, a background patch.
NEARBY_OBJECT_MAX = 0.06
SCENE_FILE = "scene.json"
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ReferencePhoto:
    path: Path
    case1: str  # "a photo of a sks ring"
    case3: str  # the SID caption: the subject by its class, everything else described
    full: str  # the scene's full description (the subject's colour named)


@dataclass(frozen=True)
class ReferenceSet:
    """One subject's biased photos: they always share one background and one nearby object."""

    name: str
    folder: Path
    subject_colour: str
    subject_shape: str
    stripes: str | None  # the identity detail only the identifier can carry; None: plain subject
    background_pattern: str
    background_colours: tuple[str, ...]  # (colour,) for plain, (colour, colour2) for a pattern
    nearby_colour: str
    nearby_shape: str
    class_name: str
    token: str
    photos: tuple[ReferencePhoto, ...]

    @property
    def subject_colours(self) -> tuple[str, ...]:
        return (self.subject_colour,) + ((self.stripes,) if self.stripes else ())

    @property
    def colours(self) -> set[str]:
        """Every colour in the photos."""
        return {*self.subject_colours, *self.background_colours, self.nearby_colour}


def read_reference_set(folder: str | Path) -> ReferenceSet:
    """Reads `folder`/scene.json and its photos; raises InvalidArgument naming the field that is wrong."""
    folder = Path(folder)
    path = folder / SCENE_FILE
    if not path.is_file():
        raise InvalidArgument(f"`reference set` {folder} has no {SCENE_FILE}: pass a folder in the toy world's format, "
                              "e.g. ../shared/toyworld/references/red-ring")
    try:
        scene = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"`{path}` is not JSON ({e}): fix or regenerate it") from None

    def field(*keys: str, required: bool = True, choices: Sequence[str] = ()):
        value = scene
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        name = ".".join(keys)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgument(f"`{name}` is missing from {path}: give it as a string")
        if choices and value not in choices:
            raise InvalidArgument(f"`{name}` is {value!r} in {path}: use one of {', '.join(choices)}")
        return value

    pattern = field("background", "pattern", choices=PATTERNS)
    colours = (field("background", "color", choices=COLOURS),)
    if pattern != "plain":
        colours += (field("background", "color2", choices=COLOURS),)
    captions = scene.get("captions")
    if not isinstance(captions, dict) or not captions:
        raise InvalidArgument(f"`captions` is missing from {path}: map each photo's file name to its case1, case3 "
                              "and full captions")
    photos = []
    for name, entry in sorted(captions.items()):
        photo = folder / name
        if not photo.is_file() or photo.suffix.lower() not in PHOTO_SUFFIXES:
            raise InvalidArgument(f"`captions.{name}` names no photo in {folder}: use the file name of a "
                                  f"{'/'.join(PHOTO_SUFFIXES)} photo there")
        texts = [entry.get(k) if isinstance(entry, dict) else None for k in ("case1", "case3", "full")]
        for key, text in zip(("case1", "case3", "full"), texts):
            if not isinstance(text, str) or not text.strip():
                raise InvalidArgument(f"`captions.{name}.{key}` is missing from {path}: give it as a string")
        photos.append(ReferencePhoto(photo, *texts))
    class_name = field("class")
    token = _token(photos[0].case1, class_name, path, photos[0].path.name)
    return ReferenceSet(
        name=folder.name, folder=folder, subject_colour=field("subject", "color", choices=COLOURS),
        subject_shape=field("subject", "shape", choices=SHAPES),
        stripes=field("subject", "stripes", required=False, choices=COLOURS),
        background_pattern=pattern, background_colours=colours,
        nearby_colour=field("nearby", "color", choices=COLOURS), nearby_shape=field("nearby", "shape", choices=SHAPES),
        class_name=class_name, token=token, photos=tuple(photos))


def _token(case1: str, class_name: str, path: Path, photo: str) -> str:
    """The identifier in a Case 1 caption: the word before the class noun ("a photo of a sks ring" -> sks)."""
    words = case1.split()
    if class_name not in words or words.index(class_name) == 0:
        raise InvalidArgument(f"`captions.{photo}.case1` in {path} is {case1!r}: write it as 'a photo of a TOKEN "
                              f"{class_name}'")
    return words[words.index(class_name) - 1]


# Measures -------------------------------------------------------------------------------------------------

_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.float64)


def palette_labels(image) -> np.ndarray:
    """H×W indices into COLOURS: each pixel's nearest palette colour (Euclidean in RGB)."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidArgument(f"`image` has shape {pixels.shape}: give an H×W×3 RGB image")
    pixels = pixels.astype(np.float64)
    if np.asarray(image).dtype == np.uint8 or pixels.max() > 1.0:
        pixels = pixels / 255.0
    distances = ((pixels[:, :, None, :] - _PALETTE_ARRAY[None, None]) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1)


def colour_fraction(labels: np.ndarray, colours: Sequence[str], region: np.ndarray | None = None) -> float:
    """Fraction of the pixels (of `region`, a bool H×W mask, when given) whose palette colour is in `colours`."""
    hits = np.isin(labels, [COLOURS.index(c) for c in colours])
    if region is not None:
        hits = hits[region]
    return float(hits.mean()) if hits.size else 0.0


def frame(height: int, width: int, thickness: int = FRAME_WIDTH) -> np.ndarray:
    """Bool H×W mask of the outer `thickness`-pixel frame."""
    mask = np.ones((height, width), dtype=bool)
    mask[thickness:height - thickness, thickness:width - thickness] = False
    return mask


def nearby_leakage(labels: np.ndarray, reference: ReferenceSet) -> float:
    return colour_fraction(labels, [reference.nearby_colour])


def nearby_object_leakage(labels: np.ndarray, reference: ReferenceSet) -> float:
    """The fraction of the image in object-sized regions of the nearby colour (4-connected, each at most
    NEARBY_OBJECT_MAX of the image); 0 where the frame is at least NEARBY_AS_BACKGROUND that colour (a drawn
    background). nearby_leakage counts every pixel of the colour: on yellow-cross (nearby pink) a subject drawn pink
    read as the pink circle leaking (notes/quality-18.md §11)."""
    if colour_fraction(labels, [reference.nearby_colour], frame(*labels.shape)) >= NEARBY_AS_BACKGROUND:
        return 0.0
    mask = labels == COLOURS.index(reference.nearby_colour)
    sizes = region_sizes(mask)
    return float(((sizes > 0) & (sizes <= NEARBY_OBJECT_MAX * mask.size)).sum() / mask.size)


def region_sizes(mask: np.ndarray) -> np.ndarray:
    """Per pixel of `mask`, the size of its 4-connected region (0 off the mask)."""
    sizes = np.zeros(mask.shape, dtype=np.int64)
    seen = np.zeros(mask.shape, dtype=bool)
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], region, queue = True, [], [start]
        while queue:
            y, x = queue.pop()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        rows, cols = zip(*region)
        sizes[list(rows), list(cols)] = len(region)
    return sizes


def background_leakage(labels: np.ndarray, reference: ReferenceSet) -> float:
    return colour_fraction(labels, reference.background_colours, frame(*labels.shape))


def asked_background_shown(labels: np.ndarray, colour: str) -> bool:
    return colour_fraction(labels, [colour]) >= ASKED_BACKGROUND_MIN


def subject_shown(labels: np.ndarray, reference: ReferenceSet) -> bool:
    return colour_fraction(labels, reference.subject_colours) >= SUBJECT_MIN


# Prompts --------------------------------------------------------------------------------------------------

UNSAID = "unsaid"  # the background left unsaid, a new nearby object named
ASKED = "asked"  # a new plain background asked for


@dataclass(frozen=True)
class BenchPrompt:
    text: str
    kind: str  # UNSAID or ASKED
    colour: str  # the new object's colour (UNSAID) or the asked background's (ASKED)


def free_colours(reference: ReferenceSet) -> list[str]:
    """Palette colours in none of the reference's photos, farthest from them first: a new object or background in
    one of them cannot be mistaken for leakage or for the subject, and its blurred edges (a purple beside a blue
    nearby object) do not land on the reference's colours."""
    return sorted((c for c in COLOURS if c not in reference.colours),
                  key=lambda c: (-_distance(c, reference.colours), COLOURS.index(c)))


def _distance(colour: str, others) -> float:
    """Squared RGB distance from `colour` to the nearest of `others` (palette names)."""
    return min(float(np.sum((np.array(PALETTE[colour]) - np.array(PALETTE[c])) ** 2)) for c in others)


def _unsaid_object_colours(reference: ReferenceSet, free: list[str]) -> list[str]:
    """The free colours ordered for the new objects of background-unsaid prompts: as `free_colours`, but a colour
    must be twice as far from the reference's *nearby* colour as from its other colours. The toy base often draws
    the named object's colour as the whole background, darker: red-ring's "next to a small cyan circle" drew a
    background that the palette maps to blue, its nearby object's colour (0.61 of the pixels in one seed, every
    configuration alike), which read as nearby-object leakage. Cyan is 0.31 from blue in RGB², black 0.71."""
    def key(colour: str) -> float:
        return min(_distance(colour, reference.colours), _distance(colour, [reference.nearby_colour]) / 2)

    return sorted(free, key=lambda c: (-key(c), COLOURS.index(c)))


def bench_prompts(reference: ReferenceSet, count: int = 2) -> list[BenchPrompt]:
    """`count` prompts of each kind in the world's grammar: 'a photo of a sks ring next to a small black circle'
    (background unsaid) and 'a photo of a sks ring on a plain cyan background' (a new one asked)."""
    free = free_colours(reference)
    if len(free) < 2 * count:
        raise InvalidArgument(f"`reference set` {reference.name} uses {len(reference.colours)} colours: fewer than "
                              f"{2 * count} are left for new objects and backgrounds; use a set with fewer colours")
    subject = f"a photo of {_article(reference.token)} {reference.token} {reference.class_name}"
    shape = next(s for s in ("circle", "triangle", "square") if s not in (reference.subject_shape,
                                                                          reference.nearby_shape))
    objects = _unsaid_object_colours(reference, free)[:count]
    unsaid = [BenchPrompt(f"{subject} next to a small {c} {shape}", UNSAID, c) for c in objects]
    # The remaining free colours, farthest first, for the backgrounds: each asked colour differs from the objects'.
    backgrounds = [c for c in free if c not in objects][:count]
    asked = [BenchPrompt(f"{subject} on a plain {c} background", ASKED, c) for c in backgrounds]
    return unsaid + asked


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass(frozen=True)
class ImageScores:
    """One generated image's measures; the leakages only for UNSAID prompts, text alignment only for ASKED."""

    kind: str
    subject: bool
    nearby_leakage: float | None = None
    background_leakage: float | None = None
    nearby_object_leakage: float | None = None
    asked_background: bool | None = None


def score_image(image, prompt: BenchPrompt, reference: ReferenceSet) -> ImageScores:
    labels = palette_labels(image)
    shown = subject_shown(labels, reference)
    if prompt.kind == UNSAID:
        return ImageScores(UNSAID, shown, nearby_leakage(labels, reference), background_leakage(labels, reference),
                           nearby_object_leakage=nearby_object_leakage(labels, reference))
    return ImageScores(ASKED, shown, asked_background=asked_background_shown(labels, prompt.colour))


METRICS = ("nearby_leakage", "background_leakage", "text_alignment", "subject_fidelity", "nearby_object_leakage")


def summarise(scores: Sequence[ImageScores]) -> dict[str, float]:
    """The four metrics over one run's images: mean leakages (UNSAID images), the fraction of ASKED images showing
    their background, the fraction of all images showing the subject."""
    unsaid = [s for s in scores if s.kind == UNSAID]
    asked = [s for s in scores if s.kind == ASKED]
    result = {}
    if unsaid:
        result["nearby_leakage"] = float(np.mean([s.nearby_leakage for s in unsaid]))
        result["background_leakage"] = float(np.mean([s.background_leakage for s in unsaid]))
        result["nearby_object_leakage"] = float(np.mean([s.nearby_object_leakage for s in unsaid]))
    if asked:
        result["text_alignment"] = float(np.mean([s.asked_background for s in asked]))
    if scores:
        result["subject_fidelity"] = float(np.mean([s.subject for s in scores]))
    return result


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value) of per-seed figures."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def default_toyworld() -> Path:
    """The shared toy world: PERSONA_TOYWORLD, else ../shared/toyworld beside a persona checkout."""
    import os

    given = os.environ.get("PERSONA_TOYWORLD", "").strip()
    return Path(given) if given else Path(__file__).resolve().parents[2].parent / "shared" / "toyworld"
