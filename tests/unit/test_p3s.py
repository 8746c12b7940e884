"""P3S point masks: Otsu, Gaussian, components and the whole mask against hand-computed values; CLIP on a tiny model."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from persona.services.mask import p3s
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

from tiny_models import tiny_clip_vision


def grid(picture: str) -> np.ndarray:
    """A bool grid from rows of '#' (True) and '.' (False)."""
    return np.array([[c == "#" for c in row] for row in picture.split()], dtype=bool)


# --- Otsu -------------------------------------------------------------------------------------------------------

def test_otsu_small_histogram_by_hand():
    # 4 bins of width 1 over [0, 4]: counts [2, 1, 0, 3], centres 0.5, 1.5, 2.5, 3.5.
    # Split after bin 0: w0=2/6, mu0=0.5, w1=4/6, mu1=(1.5+3·3.5)/4=3.0 → (1/3)(2/3)(2.5)² = 1.389
    # Split after bin 1: w0=3/6, mu0=2.5/3, w1=3/6, mu1=3.5 → (1/4)(8/3)² = 1.778
    # Split after bin 2: bin 2 is empty, so the same 1.778 → tie; the threshold is the middle of the gap,
    # between edge 2 (after bin 1) and edge 3 (after bin 2): 2.5.
    assert p3s.otsu_threshold(np.array([0, 0, 1, 3, 4, 4.0]), bins=4) == 2.5


def test_otsu_bimodal_threshold_is_halfway_between_the_modes():
    # 256 bins over [0.1, 0.9]: the modes fill the first and last bins; every split between ties, so the
    # threshold is the middle of the empty run: (edge 1 + edge 255) / 2 = 0.1 + 0.8·128/256 = 0.5.
    values = np.array([0.1] * 10 + [0.9] * 6)
    assert p3s.otsu_threshold(values) == pytest.approx(0.5, abs=1e-12)


def test_otsu_noisy_bimodal_splits_the_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.03, 300), rng.normal(0.7, 0.03, 100)])
    t = p3s.otsu_threshold(values)
    assert values[:300].max() < t <= values[300:].min()


def test_otsu_constant_values_keep_everything():
    assert p3s.otsu_threshold(np.full(5, 0.3)) == 0.3


# --- Gaussian ---------------------------------------------------------------------------------------------------

def test_gaussian_blur_of_a_delta_is_the_normalised_kernel():
    delta = np.zeros((9, 9))
    delta[4, 4] = 1.0
    out = p3s.gaussian_blur(delta, sigma=1.0)
    # sigma 1 → radius ceil(3·1) = 3; weights exp(-i²/2) for i = -3..3, normalised.
    k = np.exp(-np.array([9, 4, 1, 0, 1, 4, 9]) / 2.0)
    k /= k.sum()
    expected = np.zeros((9, 9))
    expected[1:8, 1:8] = np.outer(k, k)
    np.testing.assert_allclose(out, expected, atol=1e-15)
    assert out[4, 4] == pytest.approx((1 / (1 + 2 * (math.exp(-0.5) + math.exp(-2) + math.exp(-4.5)))) ** 2)


def test_gaussian_blur_keeps_constants_at_the_border_and_sigma_zero_is_identity():
    # Symmetric padding repeats the edge: a constant map stays constant, even when the kernel is wider than it.
    np.testing.assert_allclose(p3s.gaussian_blur(np.full((3, 4), 0.7), sigma=2.0), 0.7)
    m = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(p3s.gaussian_blur(m, sigma=0), m)
    with pytest.raises(InvalidArgument, match="`sigma`"):
        p3s.gaussian_blur(m, sigma=-1)


# --- Components -------------------------------------------------------------------------------------------------

def test_connected_components_are_4_connected_in_raster_order():
    binary = grid("""
        ##..#
        #...#
        ..#..
        ...##
    """)
    expected = np.array([
        [1, 1, 0, 0, 2],
        [1, 0, 0, 0, 2],
        [0, 0, 3, 0, 0],   # touches nothing: diagonal neighbours are not connected
        [0, 0, 0, 4, 4],
    ])
    np.testing.assert_array_equal(p3s.connected_components(binary), expected)


def test_keep_components_at_points():
    binary = grid("""
        ##..#
        #...#
        ..#..
        ...##
    """)
    kept = p3s.keep_components_at(binary, [(1, 0), (3, 4), (2, 0)])  # (row, col); (2, 0) is False: keeps nothing
    np.testing.assert_array_equal(kept, grid("""
        ##...
        #....
        .....
        ...##
    """))


# --- Pixel ↔ patch ----------------------------------------------------------------------------------------------

def test_patch_of_scales_the_pixel_centre():
    # 780 px over 16 patches: 48.75 px a patch. Pixel 48's centre 48.5 < 48.75 → patch 0; pixel 49 → patch 1.
    assert p3s.patch_of((48, 0), (16, 16), (780, 780)) == (0, 0)
    assert p3s.patch_of((49, 779), (16, 16), (780, 780)) == (15, 1)
    assert p3s.patch_of((779.9, 0), (16, 16), (780, 780)) == (0, 15)


def test_upsample_nearest_agrees_with_patch_of():
    g = np.arange(12).reshape(3, 4)
    up = p3s.upsample_nearest(g, (10, 7))
    assert up.shape == (7, 10)
    for y in range(7):
        for x in range(10):
            assert up[y, x] == g[p3s.patch_of((x, y), (3, 4), (10, 7))]


# --- point_mask on synthetic features ---------------------------------------------------------------------------

# 12×12 patches over a 96×72 photo: a patch is 8 px wide and 6 px tall.
SIZE = (96, 72)
A = np.array([1.0, 0.0, 0.0])        # the subject
A2 = np.array([0.8, 0.6, 0.0])       # a similar object beside it: cos(A, A2) = 0.8
B = np.array([0.0, 0.0, 1.0])        # background: orthogonal to both
SCENE = """
    ............
    ............
    .SSSSaaa....
    .SSSSaaa....
    .SSSSaaa....
    .SSSSaaa....
    ............
    ............
    ............
    .........SS.
    .........SS.
    ............
"""
SUBJECT_CLICK = (24, 24)      # patch row 4, col 3 (S)
SIMILAR_CLICK = (52, 20)      # patch row 3, col 6 (a)
BACKGROUND_CLICK = (90, 66)   # patch row 11, col 11


def scene_features() -> np.ndarray:
    rows = SCENE.split()
    return np.array([[{"S": A, "a": A2, ".": B}[c] for c in row] for row in rows])


def pixels(picture: str) -> np.ndarray:
    """The expected photo mask: each patch ('#' or 'S') a block of 6 rows × 8 columns."""
    return np.kron(grid(picture.replace("S", "#")), np.ones((6, 8), dtype=bool)).astype(bool)


def test_positive_click_gives_the_connected_similar_blob_not_the_outlier():
    # M_P: S = 1, a = 0.8, background = 0. Otsu over {0: 112, 0.8: 12, 1: 20 patches}:
    #   {0} | {0.8, 1}: (112/144)(32/144)(0.925 − 0)² = 0.148   (mu1 = (12·0.8 + 20)/32)
    #   {0, 0.8} | {1}: (124/144)(20/144)(1 − 0.0774)² = 0.102
    # so the threshold splits 0 from 0.8: S and the touching a are one component; the lone S-blob
    # (bottom right) is above the threshold but not connected to the click, so it goes.
    mask = p3s.point_mask(scene_features(), [SUBJECT_CLICK], [], SIZE, sigma=0)
    assert mask.dtype == bool and mask.shape == (72, 96)
    np.testing.assert_array_equal(mask, pixels("""
        ............
        ............
        .#######....
        .#######....
        .#######....
        .#######....
        ............
        ............
        ............
        ............
        ............
        ............
    """))


def test_negative_click_on_the_similar_object_removes_it():
    # M_N (click on a): S = cos(A, A2) = 0.8, a = 1, background = 0.
    # M_P·(1 − M_N): S = 1·0.2 = 0.2, a = 0.8·0 = 0, background = 0 → Otsu splits 0 | 0.2.
    mask = p3s.point_mask(scene_features(), [SUBJECT_CLICK], [SIMILAR_CLICK], SIZE, sigma=0)
    np.testing.assert_array_equal(mask, pixels("""
        ............
        ............
        .####.......
        .####.......
        .####.......
        .####.......
        ............
        ............
        ............
        ............
        ............
        ............
    """))


def test_background_click_gives_the_background_component():
    # M_P = 1 on background, 0 on S and a: the one background component, holes where the objects are.
    mask = p3s.point_mask(scene_features(), [BACKGROUND_CLICK], [], SIZE, sigma=0)
    np.testing.assert_array_equal(mask, pixels("""
        ############
        ############
        #.......####
        #.......####
        #.......####
        #.......####
        ############
        ############
        ############
        #########..#
        #########..#
        ############
    """))


@pytest.mark.parametrize("positives", [[SUBJECT_CLICK], [BACKGROUND_CLICK]])
def test_default_blur_keeps_these_masks(positives):
    # The default sigma (1 patch) moves values near the edges, but not across the wide gap Otsu splits here.
    blurred = p3s.point_mask(scene_features(), positives, [], SIZE)
    exact = p3s.point_mask(scene_features(), positives, [], SIZE, sigma=0)
    np.testing.assert_array_equal(blurred, exact)


def test_default_blur_still_removes_the_negative_object():
    # With the negative click the subject's score is only 0.2 against 0: the blur bleeds it a patch into the
    # background (left of S), but the similar object, whose score is 0, stays out.
    mask = p3s.point_mask(scene_features(), [SUBJECT_CLICK], [SIMILAR_CLICK], SIZE)
    subject, similar = pixels(SCENE.replace("a", ".")), pixels(SCENE.replace("S", ".").replace("a", "#"))
    subject[54:, :] = False   # the lone S-blob is not the clicked component
    assert mask[subject].all() and not mask[similar].any() and not mask[54:, :].any()


def test_every_component_holding_a_positive_click_is_kept():
    # Clicks on S and on the lone S-blob: M_P is the same map as for one click (both patches are A), and
    # the threshold is the same 0 | 0.8 split; now both components hold a click, so both stay.
    mask = p3s.point_mask(scene_features(), [SUBJECT_CLICK, (80, 60)], [], SIZE, sigma=0)
    np.testing.assert_array_equal(mask, pixels("""
        ............
        ............
        .#######....
        .#######....
        .#######....
        .#######....
        ............
        ............
        ............
        .........##.
        .........##.
        ............
    """))


def test_several_clicks_of_a_kind_combine_by_max():
    f = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])   # 1×4 grid
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(p3s.similarity_map(f, [(0, 0), (0, 1)]), [[1.0, 1.0, r, 0.0]])


def test_a_negative_click_on_the_subject_itself_selects_nothing():
    with pytest.raises(InvalidArgument, match="`positive_points` select nothing"):
        p3s.point_mask(scene_features(), [SUBJECT_CLICK], [(30, 30)], SIZE, sigma=0)


# --- Validation -------------------------------------------------------------------------------------------------

def test_point_outside_the_image_is_named():
    features = np.ones((4, 4, 3))
    with pytest.raises(InvalidArgument) as e:
        p3s.point_mask(features, [(10, 10), (900, 20)], [], (640, 480))
    assert e.value.message == (
        "`positive_points[1]` (900, 20) is outside the 640×480 image: x must be in 0–639, y in 0–479")
    with pytest.raises(InvalidArgument, match=r"`negative_points\[0\]` \(5, 480\) is outside"):
        p3s.point_mask(features, [(10, 10)], [(5, 480)], (640, 480))
    with pytest.raises(InvalidArgument, match=r"`positive_points\[0\]` \(-1, 3\)"):
        p3s.point_mask(features, [(-1, 3)], [], (640, 480))


def test_no_positive_point_or_malformed_points_are_invalid():
    features = np.ones((4, 4, 3))
    with pytest.raises(InvalidArgument, match="`positive_points` is empty"):
        p3s.point_mask(features, [], [(1, 1)], (64, 64))
    with pytest.raises(InvalidArgument, match=r"`positive_points\[0\]` is \(1, 2, 3\)"):
        p3s.point_mask(features, [(1, 2, 3)], [], (64, 64))
    with pytest.raises(InvalidArgument, match=r"`negative_points\[0\]`.*finite"):
        p3s.point_mask(features, [(1, 2)], [(float("nan"), 2)], (64, 64))
    with pytest.raises(InvalidArgument, match="`image_size`"):
        p3s.point_mask(features, [(1, 2)], [], (0, 64))


def test_similarity_map_is_clipped_cosine():
    f = np.array([[[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])   # 1×4 grid
    np.testing.assert_allclose(p3s.similarity_map(f, [(0, 0)]), [[1.0, 0.0, 1 / math.sqrt(2), 0.0]])
    np.testing.assert_array_equal(p3s.similarity_map(f, []), np.zeros((1, 4)))


# --- CLIP patch features ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_clip_vision(tmp_path_factory.mktemp("tiny-clip"))


def test_clip_patch_features_grid_and_end_to_end_mask(tiny_clip, dreambench, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    features = p3s.ClipPatchFeatures(tiny_clip, device="cpu")
    photo = Image.open(dreambench / "dog" / "00.jpg")
    grid_features = features(photo)
    # 64 px input, 8 px patches → 8×8 patches of the 32-wide hidden state; CLS dropped.
    assert (features.input_size, features.grid_size) == (64, 8)
    assert grid_features.shape == (8, 8, 32) and grid_features.dtype == np.float32
    click = (photo.width // 2, photo.height // 2)
    mask = p3s.point_mask(grid_features, [click], [], photo.size)
    assert mask.shape == (photo.height, photo.width) and mask.dtype == bool
    assert mask[click[1], click[0]]
    # Nearest upsampling: the mask is its 8×8 patch values (read at the patch centres), blown up.
    centres_y = ((2 * np.arange(8) + 1) * photo.height) // 16
    centres_x = ((2 * np.arange(8) + 1) * photo.width) // 16
    np.testing.assert_array_equal(p3s.upsample_nearest(mask[np.ix_(centres_y, centres_x)], photo.size), mask)


def test_clip_patch_features_loads_the_vision_half_of_a_full_clip_checkpoint(tmp_path, dreambench):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)).eval()
    clip.save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    photo = Image.open(dreambench / "dog" / "00.jpg")
    got = p3s.ClipPatchFeatures(tmp_path, device="cpu")(photo)
    # The reference: the whole photo resized to 32×32 (no crop), last hidden state without CLS.
    square = photo.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    pixels = processor(images=square, do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        want = clip.vision_model(pixel_values=pixels).last_hidden_state[0, 1:].reshape(4, 4, 32).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_missing_hub_model_offline_is_a_failed_precondition(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FailedPrecondition, match=r"`clip_model` 'persona-tests/no-such-clip' is not in the local .*"
                                                 r"hf download persona-tests/no-such-clip"):
        p3s.ClipPatchFeatures("persona-tests/no-such-clip", download=True, device="cpu")


def test_a_checkpoint_without_vision_weights_is_refused(tmp_path, tiny_clip):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_clip, tmp_path / "clip")
    weights = load_file(tmp_path / "clip" / "model.safetensors")
    dropped = next(k for k in weights if "post_layernorm" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "clip" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidArgument, match="has no weights for 1 CLIP vision tensors"):
        p3s.ClipPatchFeatures(tmp_path / "clip", device="cpu")


def test_bad_clip_model_references_are_invalid(tmp_path):
    with pytest.raises(InvalidArgument, match="`clip_model` is empty"):
        p3s.ClipPatchFeatures(" ")
    with pytest.raises(InvalidArgument, match="neither an existing folder nor a hub id"):
        p3s.ClipPatchFeatures(str(tmp_path / "nowhere" / "x" / "y"))
    with pytest.raises(InvalidArgument, match="not a CLIP vision model folder"):
        p3s.ClipPatchFeatures(tmp_path)
