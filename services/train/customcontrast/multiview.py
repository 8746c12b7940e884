"""The multi-view dataset the CustomContrast encoder trains on: a folder, one sub-folder per subject, several views.

Layout (MVImgNet-style data is copied or linked into it; names are free, order is by file name):

    DATASET/
      red-ring/                 one folder per subject; its name is the subject's id
        00.png  01.jpg  …       two or more views (.png .jpg .jpeg .webp)
        masks/00.png  …         optional: a subject mask per view, same stem, same size (white = subject)
        subject.json            optional: {"class": "ring"}; without it the class is the folder's name
      pink-square/
        …

MACL's positive for a view is another view of its subject, and its negatives are other subjects, so a subject
needs at least two views and the dataset at least two subjects (refused otherwise, naming the folder). Masks feed
the location loss (§3.4) and the segmented-subject similarity S of Eq. 7; a view without a mask uses the whole image.
Only image headers are read here (size checks); pixels are loaded by the training loop.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from persona.services.runtime.errors import InvalidArgument

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MIN_VIEWS = 2
MIN_SUBJECTS = 2


@dataclass(frozen=True)
class View:
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class MultiViewSubject:
    name: str
    class_name: str
    views: tuple[View, ...]


@dataclass(frozen=True)
class MultiViewDataset:
    root: Path
    subjects: tuple[MultiViewSubject, ...]

    @property
    def num_views(self) -> int:
        return sum(len(s.views) for s in self.subjects)


def read_multiview_dataset(root: str | Path) -> MultiViewDataset:
    """Reads and checks a dataset folder in the layout above."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgument(f"`dataset` {root} is not a folder: pass a folder with one sub-folder per subject")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    subjects = tuple(_read_subject(folder) for folder in folders)
    if len(subjects) < MIN_SUBJECTS:
        raise InvalidArgument(f"`dataset` {root} holds {len(subjects)} subject folder(s); contrastive training needs "
                              f"at least {MIN_SUBJECTS} (one sub-folder per subject, each with its views)")
    return MultiViewDataset(root, subjects)


def _read_subject(folder: Path) -> MultiViewSubject:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) < MIN_VIEWS:
        raise InvalidArgument(f"`dataset` subject folder {folder} has {len(images)} view(s); each subject needs at "
                              f"least {MIN_VIEWS} (MACL's positive is another view of the same subject): add views "
                              "or remove the folder")
    masks = _masks_by_stem(folder)
    unmatched = sorted(set(masks) - {p.stem for p in images})
    if unmatched:
        raise InvalidArgument(f"`dataset` masks {', '.join(str(masks[s]) for s in unmatched)} have no view of the "
                              f"same name in {folder}: name each mask after its view")
    views = []
    for image in images:
        mask = masks.get(image.stem)
        if mask is not None:
            image_size, mask_size = _size(image), _size(mask)
            if image_size != mask_size:
                raise InvalidArgument(f"`dataset` mask {mask} is {mask_size[0]}×{mask_size[1]} but its view {image} "
                                      f"is {image_size[0]}×{image_size[1]}: a mask must be the size of its view")
        views.append(View(image, mask))
    return MultiViewSubject(folder.name, _class_name(folder), tuple(views))


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    masks_dir = folder / "masks"
    if not masks_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(masks_dir.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _class_name(folder: Path) -> str:
    meta = folder / "subject.json"
    if not meta.is_file():
        return folder.name
    try:
        class_name = json.loads(meta.read_text()).get("class", "")
    except (json.JSONDecodeError, AttributeError) as error:
        raise InvalidArgument(f"`dataset` {meta} is not a JSON object like {{\"class\": \"dog\"}}: {error}") from None
    if not isinstance(class_name, str) or not class_name.strip():
        raise InvalidArgument(f"`dataset` {meta} has no \"class\" string: write e.g. {{\"class\": \"dog\"}}")
    return class_name.strip()


def _size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:
        raise InvalidArgument(f"`dataset` {path} is not a readable image: {error}") from None


def sample_batch(dataset: MultiViewDataset, batch_size: int, rng: random.Random) -> list[tuple[View, View, int]]:
    """`batch_size` (reference view, positive view, subject index) triples of distinct subjects (so every other
    sample of the batch is a true negative), the two views of a triple different."""
    if not 2 <= batch_size <= len(dataset.subjects):
        raise InvalidArgument(f"`batch_size` {batch_size} must be between 2 and the dataset's "
                              f"{len(dataset.subjects)} subjects: each sample of a batch is a different subject")
    picks = rng.sample(range(len(dataset.subjects)), batch_size)
    return [(*rng.sample(dataset.subjects[i].views, 2), i) for i in picks]
