"""The multi-view dataset reader (services/train/customcontrast/multiview.py) over toy-world subjects drawn by
bench/toyworld_views.py, and its refusals."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from persona.bench.toyworld_views import ToySubject, draw_view, write_multiview_dataset
from persona.services.evaluate.toyworld import COLOURS, palette_labels
from persona.services.runtime.errors import InvalidArgument
from persona.services.train.customcontrast.multiview import read_multiview_dataset, sample_batch


def test_a_toy_world_dataset_reads_back_with_its_masks(tmp_path):
    root = write_multiview_dataset(tmp_path / "data", subjects=3, views=3, seed=1, size=32)
    dataset = read_multiview_dataset(root)
    assert len(dataset.subjects) == 3 and dataset.num_views == 9
    for subject in dataset.subjects:
        meta = json.loads((root / subject.name / "subject.json").read_text())
        assert subject.class_name == meta["class"]
        for view in subject.views:
            assert view.mask is not None and view.mask.stem == view.image.stem
            # The mask covers exactly the subject: its pixels are the subject's colours.
            labels = palette_labels(np.asarray(Image.open(view.image)))
            mask = np.asarray(Image.open(view.mask)) > 127
            assert mask.sum() > 0
            assert {COLOURS[i] for i in np.unique(labels[mask])} <= {meta["colour"], meta["stripes"]}


def test_views_of_one_subject_vary_background_and_place_but_not_identity():
    subject = ToySubject("ring", "red", "blue")
    rng = random.Random(3)
    descriptions = [draw_view(subject, rng, size=32)[2] for _ in range(6)]
    assert len({tuple(d["background"]) for d in descriptions}) > 1
    assert len({tuple(d["centre"]) for d in descriptions}) == 6
    assert all(subject.colour not in d["background"] and "blue" not in d["background"] for d in descriptions)


def test_a_subject_with_one_view_is_refused_naming_its_folder(tmp_path):
    root = write_multiview_dataset(tmp_path / "data", subjects=2, views=2, seed=0, size=16)
    lonely = sorted(p for p in root.iterdir())[0]
    (lonely / "01.png").unlink()
    (lonely / "masks" / "01.png").unlink()
    with pytest.raises(InvalidArgument, match=f"subject folder {lonely} has 1 view"):
        read_multiview_dataset(root)


def test_other_bad_folders_are_refused_with_the_fix(tmp_path):
    with pytest.raises(InvalidArgument, match="is not a folder"):
        read_multiview_dataset(tmp_path / "missing")
    root = write_multiview_dataset(tmp_path / "data", subjects=2, views=2, seed=0, size=16)
    first, second = sorted(p for p in root.iterdir())
    shutil.rmtree(second)
    with pytest.raises(InvalidArgument, match="holds 1 subject folder"):
        read_multiview_dataset(root)
    write_multiview_dataset(root, subjects=2, views=2, seed=5, size=16)
    Image.new("L", (16, 16)).save(first / "masks" / "07.png")
    with pytest.raises(InvalidArgument, match="have no view of the same name"):
        read_multiview_dataset(root)
    (first / "masks" / "07.png").unlink()
    Image.new("L", (8, 8)).save(first / "masks" / "00.png")
    with pytest.raises(InvalidArgument, match="is 8×8 but its view"):
        read_multiview_dataset(root)
    Image.new("L", (16, 16)).save(first / "masks" / "00.png")
    (first / "subject.json").write_text("[]")
    with pytest.raises(InvalidArgument, match="is not a JSON object"):
        read_multiview_dataset(root)
    (first / "subject.json").unlink()
    assert read_multiview_dataset(root).subjects[0].class_name == first.name


def test_a_batch_holds_distinct_subjects_and_two_different_views_each(tmp_path):
    dataset = read_multiview_dataset(write_multiview_dataset(tmp_path / "d", subjects=4, views=3, seed=2, size=16))
    batch = sample_batch(dataset, 3, random.Random(0))
    assert len({index for _, _, index in batch}) == 3
    assert all(reference != positive for reference, positive, _ in batch)
    with pytest.raises(InvalidArgument, match="`batch_size` 5"):
        sample_batch(dataset, 5, random.Random(0))
