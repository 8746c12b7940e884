"""Text-grounded masks: CLIPSeg and Grounded-SAM load tiny random models offline and mask a DreamBench photo.

Random weights make the mask's content arbitrary, so these tests pin shapes, types, provenance, the Otsu rule,
the thresholds' extremes (0: everything; above 1: nothing detected) and the errors for missing models.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persona.services.mask.grounded import (
    CLIPSEG,
    DEFAULT_CLIPSEG_MIN_THRESHOLD,
    GROUNDED_SAM,
    ClipSegMasker,
    GroundedSamMasker,
    MaskResult,
    grounding_query,
)
from persona.services.mask.p3s import otsu_threshold
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

from tiny_models import tiny_clipseg, tiny_grounding_dino, tiny_sam

# A hub id no Hugging Face cache holds.
UNCACHED = "persona-tests/not-in-any-cache"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-mask-models")
    return {"clipseg": tiny_clipseg(root / "clipseg"), "dino": tiny_grounding_dino(root / "dino"),
            "sam": tiny_sam(root / "sam")}


@pytest.fixture(scope="module")
def photo(dreambench) -> Image.Image:
    image = Image.open(dreambench / "dog" / "00.jpg")
    image.load()
    return image


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def clipseg(tiny) -> ClipSegMasker:
    return ClipSegMasker(str(tiny["clipseg"]), device="cpu")


def _assert_mask_of(result: MaskResult, image: Image.Image) -> None:
    assert result.mask.shape == (image.height, image.width)
    assert result.mask.dtype == np.bool_


def test_clipseg_masks_at_the_image_size_with_otsu(clipseg, tiny, photo, offline):
    result = clipseg.mask(photo, "dog")

    _assert_mask_of(result, photo)
    assert (result.method, result.model_ids, result.query) == (CLIPSEG, (str(tiny["clipseg"]),), "dog")
    probs = clipseg.probabilities(photo, "dog")
    assert probs.shape == (photo.height, photo.width) and probs.dtype == np.float32
    assert 0.0 <= probs.min() <= probs.max() <= 1.0
    # The default threshold is Otsu's on the probabilities, floored; the mask is what reaches it.
    assert result.threshold == max(otsu_threshold(probs), DEFAULT_CLIPSEG_MIN_THRESHOLD)
    np.testing.assert_array_equal(result.mask, probs >= result.threshold)
    if result.mask.any():
        assert result.score == pytest.approx(float(probs[result.mask].mean()))
        assert result.note == ""


def test_clipseg_explicit_thresholds_are_used_as_given(clipseg, photo, offline):
    everything = clipseg.mask(photo, "dog", threshold=0.0)
    assert everything.mask.all() and everything.threshold == 0.0 and 0 < everything.score < 1
    # Above the map's maximum: empty, score 0, and a note saying the subject was not found.
    above = float(clipseg.probabilities(photo, "dog").max()) + 1e-6
    nothing = clipseg.mask(photo, "dog", threshold=min(above, 1.0))
    assert not nothing.mask.any() and nothing.score == 0.0 and "not found" in nothing.note
    with pytest.raises(InvalidArgument, match="`threshold`"):
        clipseg.mask(photo, "dog", threshold=1.5)
    with pytest.raises(InvalidArgument, match="`text` is empty"):
        clipseg.mask(photo, "  ")


def test_clipseg_loads_once_per_masker(clipseg, photo, offline):
    first = clipseg.load()
    clipseg.mask(photo.convert("L"), "dog")  # any mode: converted to RGB
    assert clipseg.load() is first


def test_grounded_sam_segments_the_best_box(tiny, photo, offline):
    masker = GroundedSamMasker(str(tiny["dino"]), str(tiny["sam"]), device="cpu", box_threshold=0.0)
    result = masker.mask(photo, "Dog")

    _assert_mask_of(result, photo)
    assert result.method == GROUNDED_SAM
    assert result.model_ids == (str(tiny["dino"]), str(tiny["sam"]))
    assert result.query == "dog."
    # Threshold 0 keeps every query of the tiny detector's 10, best first, inside the image.
    assert len(result.boxes) == 10
    scores = [d.score for d in result.boxes]
    assert scores == sorted(scores, reverse=True)
    for d in result.boxes:
        assert 0 <= d.x0 <= d.x1 <= photo.width and 0 <= d.y0 <= d.y1 <= photo.height
    if result.mask.any():
        assert result.score == scores[0]


def test_grounded_sam_union_covers_the_best_box_mask(tiny, photo, offline):
    best = GroundedSamMasker(str(tiny["dino"]), str(tiny["sam"]), device="cpu", box_threshold=0.0).mask(photo, "dog")
    union = GroundedSamMasker(str(tiny["dino"]), str(tiny["sam"]), device="cpu", box_threshold=0.0,
                              union=True).mask(photo, "dog")
    _assert_mask_of(union, photo)
    assert [d.box for d in union.boxes] == [d.box for d in best.boxes]
    # SAM segments each box on its own, so the union holds the best box's mask; a batch of one box versus ten
    # may round a few boundary logits differently, hence the tolerance of a few pixels.
    assert (best.mask & ~union.mask).mean() < 1e-4
    assert union.coverage >= best.coverage - 1e-4


def test_grounded_sam_nothing_detected_is_an_empty_mask_with_a_note(tiny, photo, offline):
    masker = GroundedSamMasker(str(tiny["dino"]), str(tiny["sam"]), device="cpu", box_threshold=1.01)
    result = masker.mask(photo, "dog")

    _assert_mask_of(result, photo)
    assert not result.mask.any() and result.coverage == 0.0
    assert result.score == 0.0 and result.boxes == ()
    assert "nothing matching 'dog.' was detected" in result.note


def test_grounding_query_is_lower_case_and_ends_in_a_period():
    assert grounding_query("Dog") == "dog."
    assert grounding_query("  a  Stuffed Animal ") == "a stuffed animal."
    assert grounding_query("dog. cat.") == "dog. cat."
    with pytest.raises(InvalidArgument, match="`text` is empty"):
        grounding_query("")


@pytest.mark.parametrize("download", [False, True])
def test_uncached_hub_id_offline_says_hf_download(download, photo, offline):
    # HF_HUB_OFFLINE=1 forbids downloading even when the masker allows it.
    message = f"`model` '{UNCACHED}' is not in the local Hugging Face cache: .*`hf download {UNCACHED}`"
    with pytest.raises(FailedPrecondition, match=message):
        ClipSegMasker(UNCACHED, device="cpu", download=download).mask(photo, "dog")


def test_uncached_segmenter_is_named(tiny, offline):
    with pytest.raises(FailedPrecondition, match=f"`segmenter` '{UNCACHED}'.*hf download"):
        GroundedSamMasker(str(tiny["dino"]), UNCACHED, device="cpu").load()


def test_wrong_or_missing_folders_are_invalid_arguments(tiny, tmp_path, offline):
    with pytest.raises(InvalidArgument, match="`detector` .* is a sam model, not grounding-dino"):
        GroundedSamMasker(str(tiny["sam"]), str(tiny["sam"]), device="cpu").load()
    with pytest.raises(InvalidArgument, match="`model` .* missing config.json"):
        ClipSegMasker(str(tmp_path), device="cpu").load()
    with pytest.raises(InvalidArgument, match="`model` is empty"):
        ClipSegMasker("", device="cpu")
    with pytest.raises(InvalidArgument, match="`device`"):
        ClipSegMasker(str(tiny["clipseg"]), device="tpu")
    with pytest.raises(InvalidArgument, match="`box_threshold`"):
        GroundedSamMasker(str(tiny["dino"]), str(tiny["sam"]), device="cpu", box_threshold=-0.1)
