"""Evaluation metrics against hand-computed values: DreamBench CLIP-I/CLIP-T/DINO, P3S variance, SID SA/NSD/TA,
CustomContrast's R/E split, the segment helpers, the embedders on tiny models, and the prompt sets."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persona.services.evaluate.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    SplitScores,
    clip_i,
    clip_t,
    dino,
    non_subject_disentanglement,
    non_subject_segment,
    per_image_scores,
    sid_scores,
    split_scores,
    strip_identifier,
    subject_alignment,
    subject_segment,
    text_alignment,
    variance,
)
from persona.services.evaluate.prompts import (
    DREAMBENCH_LIVE_PROMPTS,
    DREAMBENCH_OBJECT_PROMPTS,
    EvalPrompt,
    infer_kind,
    parse_prompts,
    prompt_set,
)
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

from tiny_models import tiny_clip, tiny_dino

DREAMBENCH_PROMPTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dreambench" / \
    "prompts_and_classes.txt"

RED, BLUE, BLACK = (255, 0, 0), (0, 0, 255), (0, 0, 0)
R2 = 1 / math.sqrt(2)


# --- scene: a red square subject on a blue background ----------------------------------------------------

def red_square_scene():
    """A 48x40 (w x h) blue image with a red 10x10 subject at rows 10..19, cols 15..24, and its mask."""
    pixels = np.zeros((40, 48, 3), dtype=np.uint8)
    pixels[:] = BLUE
    mask = np.zeros((40, 48), dtype=bool)
    mask[10:20, 15:25] = True
    pixels[mask] = RED
    return Image.fromarray(pixels), mask


def solid(color, w=32, h=32) -> Image.Image:
    return Image.new("RGB", (w, h), color)


class MeanColourEmbedder:
    """Stub CLIP: an image's embedding is its mean RGB colour (normalised by the metrics); texts from a table."""

    def __init__(self, texts: dict[str, list[float]]):
        self.texts = texts
        self.seen_texts: list[str] = []

    def image_embeddings(self, images):
        return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
                         for im in images])

    def text_embeddings(self, texts):
        self.seen_texts += list(texts)
        return np.asarray([self.texts[t] for t in texts], dtype=np.float64)


# --- pure metrics on hand-made embeddings ----------------------------------------------------------------

def test_clip_i_and_dino_are_the_mean_over_all_generated_reference_pairs():
    gen = [[1, 0, 0], [0, 1, 0]]
    ref = [[1, 0, 0], [1, 1, 0], [0, 0, 3]]  # unnormalised rows: cosine normalises them
    # cos table: g1 -> 1, 1/√2, 0 ; g2 -> 0, 1/√2, 0
    expected = (1 + R2 + 0 + 0 + R2 + 0) / 6
    assert clip_i(gen, ref) == pytest.approx(expected, abs=1e-12)
    assert dino(gen, ref) == pytest.approx(expected, abs=1e-12)
    assert per_image_scores(gen, ref) == pytest.approx([(1 + R2) / 3, R2 / 3], abs=1e-12)


def test_clip_t_is_the_raw_mean_cosine_with_one_or_per_image_prompts():
    gen = [[1, 0], [0, 1], [-1, 0]]
    # One prompt for all: cosines 1/√2, 1/√2, -1/√2 -> raw mean, negative values kept (no max(cos, 0)).
    assert clip_t(gen, [1, 1]) == pytest.approx(R2 / 3, abs=1e-12)
    # One prompt per image.
    assert clip_t(gen, [[1, 0], [1, 0], [1, 0]]) == pytest.approx((1 + 0 - 1) / 3, abs=1e-12)
    with pytest.raises(InvalidArgument, match="`prompts`"):
        clip_t(gen, [[1, 0], [0, 1]])


def test_variance_is_the_population_variance():
    assert variance([0.7, 0.7, 0.7]) == 0.0
    assert variance([1, 3]) == pytest.approx(1.0)
    assert variance([0.5]) == 0.0
    with pytest.raises(InvalidArgument, match="`scores`"):
        variance([])


def test_split_scores_gives_reconstruction_and_editing_means():
    got = split_scores([0.2, 0.4, 0.9, 0.6], ["reconstruction", "reconstruction", "editing", "reconstruction"])
    assert got.reconstruction == pytest.approx(0.4)
    assert got.editing == pytest.approx(0.9)
    assert split_scores([0.5], ["editing"]) == SplitScores(reconstruction=None, editing=0.5)
    with pytest.raises(InvalidArgument, match="`kinds`"):
        split_scores([0.5, 0.1], ["editing"])
    with pytest.raises(InvalidArgument, match="`kinds`"):
        split_scores([0.5], ["recon"])


def test_sid_formulas_on_embeddings():
    gen = [[1, 0, 0], [1, 0, 1]]
    assert subject_alignment(gen, [[1, 0, 0]]) == pytest.approx((1 + R2) / 2, abs=1e-12)
    assert non_subject_disentanglement(gen, [[0, 0, 1], [0, 0, 2]]) == pytest.approx(1 - R2 / 2, abs=1e-12)
    assert text_alignment(gen, [0, 1, 0]) == pytest.approx(0.0, abs=1e-12)


def test_zero_or_mismatched_embeddings_are_refused():
    with pytest.raises(InvalidArgument, match="`references` has a zero"):
        clip_i([[1, 0]], [[0, 0]])
    with pytest.raises(InvalidArgument, match="dimensions"):
        clip_i([[1, 0]], [[1, 0, 0]])


@pytest.mark.parametrize("prompt, token, expected", [
    ("a sks dog on the beach", "sks", "a dog on the beach"),
    ("sks dog", "sks", "dog"),
    ("a sks dog next to another sks dog", "sks", "a dog next to another dog"),
    ("a sksx dog, not sks", "sks", "a sksx dog, not"),
    ("a sks, dog", "sks", "a, dog"),
    ("a <sks> toy in the snow", "<sks>", "a toy in the snow"),
    ("a dog on the beach", "sks", "a dog on the beach"),
])
def test_strip_identifier(prompt, token, expected):
    assert strip_identifier(prompt, token) == expected


def test_strip_identifier_needs_a_token():
    with pytest.raises(InvalidArgument, match="`token`"):
        strip_identifier("a sks dog", " ")


# --- segments -------------------------------------------------------------------------------------------

def test_subject_segment_is_the_subject_on_black_cropped_square_and_resized():
    image, mask = red_square_scene()
    # Unresized: exactly the 10x10 red square, nothing of the blue background.
    crop = np.asarray(subject_segment(image, mask, size=None))
    assert crop.shape == (10, 10, 3)
    assert (crop == RED).all()
    # Resized to CLIP's input: still all red (a uniform square resizes to itself).
    big = np.asarray(subject_segment(image, mask))
    assert big.shape == (224, 224, 3)
    assert (big == RED).all()
    # Literal r ⊙ s(r): full frame, red inside the mask, black elsewhere.
    full = np.asarray(subject_segment(image, mask, crop=False))
    assert full.shape == (40, 48, 3)
    assert (full[mask] == RED).all() and (full[~mask] == BLACK).all()


def test_subject_segment_pads_a_wide_subject_to_a_centred_square_with_black():
    image, mask = red_square_scene()
    mask[:] = False
    mask[10:14, 15:25] = True  # 4 rows x 10 cols
    seg = np.asarray(subject_segment(image, mask, size=None))
    assert seg.shape == (10, 10, 3)
    # (10 - 4) // 2 = 3 black rows above, 3 below, the red band centred between them.
    assert (seg[:3] == BLACK).all() and (seg[7:] == BLACK).all()
    assert (seg[3:7] == RED).all()


def test_non_subject_segment_blacks_out_the_subject_and_keeps_the_frame():
    image, mask = red_square_scene()
    seg = np.asarray(non_subject_segment(image, mask))
    assert seg.shape == (40, 48, 3)
    assert (seg[mask] == BLACK).all()
    assert (seg[~mask] == BLUE).all()


def test_segments_take_0_255_mask_images_and_refuse_bad_masks():
    image, mask = red_square_scene()
    as_png = Image.fromarray(mask.astype(np.uint8) * 255)
    assert (np.asarray(subject_segment(image, as_png, size=None)) == RED).all()
    with pytest.raises(InvalidArgument, match="`mask` selects no pixel"):
        subject_segment(image, np.zeros((40, 48), dtype=bool))
    with pytest.raises(InvalidArgument, match="`mask` is 40x48 but its image is 48x40"):
        subject_segment(image, np.ones((48, 40), dtype=bool))


def test_sid_scores_on_the_scene_with_a_stub_embedder():
    image, mask = red_square_scene()
    # Stub: embedding = mean colour. Subject segment -> red (1,0,0); non-subject segment -> blue with a black
    # hole, direction (0,0,1). Generated: all red (1,0,0) and half red / half blue (1,0,1)/√2.
    half = np.zeros((32, 32, 3), dtype=np.uint8)
    half[:, :16] = RED
    half[:, 16:] = BLUE
    stub = MeanColourEmbedder({"a dog on the beach": [1, 1, 0]})
    got = sid_scores(stub, [solid(RED), Image.fromarray(half)], [image, image], [mask, mask],
                     "a sks dog on the beach", "sks")
    # SA = Avg cos(subject, g): (1 + 1/√2) / 2 for each of the two references.
    assert got.subject_alignment == pytest.approx((1 + R2) / 2, abs=1e-9)
    # NSD = 1 - Avg cos(non-subject, g) = 1 - (0 + 1/√2) / 2.
    assert got.non_subject_disentanglement == pytest.approx(1 - R2 / 2, abs=1e-9)
    # TA: text (1,1,0)/√2 against (1,0,0) and (1,0,1)/√2: (1/√2 + 1/2) / 2; the identifier was removed first.
    assert got.text_alignment == pytest.approx((R2 + 0.5) / 2, abs=1e-9)
    assert stub.seen_texts == ["a dog on the beach"]


def test_sid_scores_need_one_mask_per_reference():
    image, mask = red_square_scene()
    with pytest.raises(InvalidArgument, match="`masks`"):
        sid_scores(MeanColourEmbedder({}), [image], [image, image], [mask], "a sks dog", "sks")


# --- embedders on tiny models ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    return tiny_clip(root / "clip"), tiny_dino(root / "dino")


def photo(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(40, 56, 3) * 255).astype(np.uint8))


def test_identical_images_score_one_on_tiny_clip_and_dino(tiny_folders, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip_dir, dino_dir = tiny_folders
    clip, dino_model = ClipEmbedder(str(clip_dir), device="cpu"), DinoEmbedder(str(dino_dir), device="cpu")
    images = [photo(0), photo(0), photo(1)]

    c = clip.image_embeddings(images)
    assert c.shape == (3, 16)
    assert np.linalg.norm(c, axis=1) == pytest.approx([1, 1, 1], abs=1e-5)
    assert clip_i(c[:1], c[1:2]) == pytest.approx(1.0, abs=1e-5)
    assert clip_i(c[:1], c[2:]) < 1 - 1e-4

    d = dino_model.image_embeddings(images)
    assert d.shape == (3, 32)
    assert np.linalg.norm(d, axis=1) == pytest.approx([1, 1, 1], abs=1e-5)
    assert dino(d[:1], d[1:2]) == pytest.approx(1.0, abs=1e-5)

    t = clip.text_embeddings(["a dog on the beach", "a red dog"])
    assert t.shape == (2, 16)
    assert np.linalg.norm(t, axis=1) == pytest.approx([1, 1], abs=1e-5)
    assert -1 <= clip_t(c, t[0]) <= 1


def test_an_offline_hub_model_missing_from_the_cache_says_hf_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = ClipEmbedder("persona-tests/no-such-clip", download=True)  # lazy: nothing happens yet
    with pytest.raises(FailedPrecondition, match="`clip_model` 'persona-tests/no-such-clip'") as e:
        embedder.image_embeddings([photo(0)])
    assert "hf download persona-tests/no-such-clip" in e.value.message


def test_a_folder_that_is_not_a_model_is_invalid(tmp_path):
    with pytest.raises(InvalidArgument, match="`dino_model` .* missing config.json"):
        DinoEmbedder(str(tmp_path)).load()
    with pytest.raises(InvalidArgument, match="neither an existing folder nor a hub id"):
        DinoEmbedder(str(tmp_path / "nowhere" / "x" / "y")).load()


# --- prompt sets ----------------------------------------------------------------------------------------

def test_dreambench_tables_match_the_shared_prompt_file():
    assert DREAMBENCH_PROMPTS.exists(), f"DreamBench prompt list not found at {DREAMBENCH_PROMPTS}"
    text = DREAMBENCH_PROMPTS.read_text()
    objects, live = text.split("Live Subject Prompts")

    def listed(part: str) -> list[str]:
        return [t.replace("{0} {1}", "{}") for t in re.findall(r"'(a [^']*)'\.format", part)]

    assert [t for t, _ in DREAMBENCH_OBJECT_PROMPTS] == listed(objects)
    assert [t for t, _ in DREAMBENCH_LIVE_PROMPTS] == listed(live)


def test_dreambench_picks_object_or_live_prompts_by_class():
    objects = prompt_set("dreambench", "backpack", "sks")
    live = prompt_set("dreambench", "dog", "sks")
    assert len(objects) == len(live) == 25
    assert objects[2] == EvalPrompt("a sks backpack on the beach", "reconstruction")
    assert objects[20] == EvalPrompt("a red sks backpack", "editing")
    assert [p.kind for p in objects].count("editing") == 5
    assert live[11] == EvalPrompt("a sks dog wearing a santa hat", "editing")
    assert [p.kind for p in live].count("reconstruction") == 10
    assert prompt_set("dreambench", "Cat", "sks")[10].text == "a sks Cat wearing a red hat"
    assert [p.text for p in prompt_set("dreambench-live", "toy", "sks")][10] == "a sks toy wearing a red hat"
    assert [p.text for p in prompt_set("dreambench-object", "dog", "sks")][10] == \
        "a sks dog with a wheat field in the background"


def test_the_kind_rule_agrees_with_the_dreambench_table():
    for template, kind in DREAMBENCH_OBJECT_PROMPTS + DREAMBENCH_LIVE_PROMPTS:
        assert infer_kind(template) == kind, template
    assert infer_kind("a photo of a {} in the style of Van Gogh") == "editing"
    assert infer_kind("a photo of {} on the beach") == "reconstruction"


def test_a_user_prompt_file_with_comments_and_prefixes(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# my prompts\n"
        "\n"
        "a {} on the beach\n"
        "   # an indented comment\n"
        "E: a {token} {class} on the moon\n"
        "r:a {0} {1} wearing a hat\n"
        "a cube shaped {}\n"
        "a {class} next to a {token} {class}\n")
    assert prompt_set(str(path), "dog", "sks") == [
        EvalPrompt("a sks dog on the beach", "reconstruction"),
        EvalPrompt("a sks dog on the moon", "editing"),          # prefix beats the rule
        EvalPrompt("a sks dog wearing a hat", "reconstruction"),  # prefix beats the rule
        EvalPrompt("a cube shaped sks dog", "editing"),           # the rule
        EvalPrompt("a dog next to a sks dog", "reconstruction"),
    ]


def test_an_empty_prompt_file_is_invalid(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n   \n")
    with pytest.raises(InvalidArgument, match="`prompts`"):
        prompt_set(str(path), "dog", "sks")


@pytest.mark.parametrize("line, match", [
    ("a sks dog on the beach", "names no subject"),
    ("a {subject} on the beach", r"placeholder \{subject\}"),
    ("a {token dog", "unmatched brace"),
    ("E:", "kind prefix but no prompt"),
])
def test_bad_prompt_lines_name_the_line(line, match):
    with pytest.raises(InvalidArgument, match=f"`prompts` line 2 .*{match}"):
        parse_prompts(f"a {{}} in the snow\n{line}\n", "dog", "sks")


def test_prompt_set_refuses_unknown_sets_and_empty_subjects(tmp_path):
    with pytest.raises(InvalidArgument, match="`prompts` 'nope' is neither a built-in set"):
        prompt_set("nope", "dog", "sks")
    with pytest.raises(InvalidArgument, match="`class_name`"):
        prompt_set("dreambench", "", "sks")
    with pytest.raises(InvalidArgument, match="`token`"):
        prompt_set("dreambench", "dog", "")
