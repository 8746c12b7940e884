"""The toy world's entanglement measures against hand-computed cases, and its reference-set reader."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persona.services.evaluate import toyworld as tw
from persona.services.runtime.errors import InvalidArgument

SHARED_SETS = Path(__file__).resolve().parents[2].parent / "shared" / "toyworld" / "references"


def rgb(name: str) -> np.ndarray:
    return (np.array(tw.PALETTE[name]) * 255).round().astype(np.uint8)


def canvas(size: int, colour: str) -> np.ndarray:
    return np.tile(rgb(colour), (size, size, 1))


def write_set(folder: Path, **scene_overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas(8, "green")).save(folder / "00.png")
    scene = {"subject": {"color": "red", "shape": "ring", "stripes": "white"},
             "background": {"color": "green", "pattern": "striped", "color2": "yellow"},
             "nearby": {"color": "blue", "shape": "square"}, "class": "ring",
             "captions": {"00.png": {"case1": "a photo of a sks ring",
                                     "case3": "a photo of a sks ring on a striped green and yellow background",
                                     "full": "a photo of a red ring on a striped green and yellow background"}}}
    scene.update(scene_overrides)
    (folder / "scene.json").write_text(json.dumps(scene))
    return folder


def test_palette_maps_each_pixel_to_the_nearest_colour():
    pixels = np.array([[[230, 25, 25], [200, 60, 60]],  # red exactly; a darker red still nearest red
                       [[250, 140, 175], [128, 128, 128]]], dtype=np.uint8)  # pink; mid-grey
    labels = tw.palette_labels(pixels)
    # Mid-grey (0.502): to white 3·0.448² = 0.602, to black 3·0.422² = 0.534, to purple .01+.09+.06 = 0.16 → purple.
    assert [[tw.COLOURS[i] for i in row] for row in labels] == [["red", "red"], ["pink", "purple"]]
    # Floats in 0–1 and PIL images read the same.
    assert (tw.palette_labels(pixels / 255.0) == labels).all()
    assert (tw.palette_labels(Image.fromarray(pixels)) == labels).all()


def test_leakages_text_alignment_and_fidelity_by_hand(tmp_path):
    ref = tw.read_reference_set(write_set(tmp_path / "ring"))
    # 20×20, plain cyan; a 5×4 blue block (20 px of 400 = 0.05) inside; frame (5 px: 400 - 10×10 = 300 px)
    # has 30 green + 15 yellow pixels (45/300 = 0.15); a 4×4 red + 2×2 white subject (16 + 4 = 20 px = 0.05).
    image = canvas(20, "cyan")
    image[8:13, 8:12] = rgb("blue")
    image[0:2, 0:15] = rgb("green")
    image[19, 0:15] = rgb("yellow")
    image[6:10, 13:17] = rgb("red")
    image[12:14, 13:15] = rgb("white")
    labels = tw.palette_labels(image)
    assert tw.nearby_leakage(labels, ref) == pytest.approx(20 / 400)
    assert tw.background_leakage(labels, ref) == pytest.approx(45 / 300)
    assert tw.nearby_object_leakage(labels, ref) == pytest.approx(20 / 400)  # no blue in the frame
    # The frame's top 2 rows blue (2·20 = 40 px of 300 frame px) stay under 0.25, but as one region of 40 px (0.1 of
    # the image, over NEARBY_OBJECT_MAX 0.06) they are no object: the 20-px block alone counts; a 2×10 strip (20 px)
    # would count. 5 rows (100 + 30 more px: 130/300 ≥ 0.25) are a background: 0.
    image[0:2, 0:20] = rgb("blue")
    assert tw.nearby_object_leakage(tw.palette_labels(image), ref) == pytest.approx(20 / 400)
    image[0:2, 10:20] = rgb("cyan")
    assert tw.nearby_object_leakage(tw.palette_labels(image), ref) == pytest.approx(40 / 400)
    image[0:5, 0:20] = rgb("blue")
    labels5 = tw.palette_labels(image)
    assert tw.nearby_leakage(labels5, ref) == pytest.approx((100 + 20) / 400) and \
        tw.nearby_object_leakage(labels5, ref) == 0.0
    assert tw.subject_shown(labels, ref)  # 0.05 ≥ 0.03
    # cyan covers 400 - 20 - 45 - 20 = 315 px = 0.7875 ≥ 0.40; red (0.04) does not.
    assert tw.asked_background_shown(labels, "cyan") and not tw.asked_background_shown(labels, "red")
    small = canvas(20, "cyan")
    small[0:3, 10:13] = rgb("red")
    small[0:1, 13:16] = rgb("white")  # 9 + 3 = 12 px = 0.03: just enough
    assert tw.subject_shown(tw.palette_labels(small), ref)
    small[0:1, 15] = rgb("cyan")  # 11 px = 0.0275
    assert not tw.subject_shown(tw.palette_labels(small), ref)


def test_a_subject_drawn_in_the_nearby_colour_is_not_the_nearby_object(tmp_path):
    """yellow-cross's failure mode (notes/quality-18.md §11): the concept drew the cross pink, the nearby circle's
    colour; every pink pixel counted as the circle leaking. Only object-sized regions count."""
    ref = tw.read_reference_set(write_set(tmp_path / "ring"))  # nearby object blue
    image = canvas(20, "cyan")
    image[4:14, 4:14] = rgb("blue")  # a 10×10 body: 100 px = 0.25 of the image, one region
    image[17:19, 0:3] = rgb("blue")  # a 2×3 object in a corner: 6 px, inside the frame (6/300 < 0.25)
    image[16:18, 16:18] = rgb("blue")  # another 4 px
    labels = tw.palette_labels(image)
    assert tw.nearby_leakage(labels, ref) == pytest.approx(110 / 400)
    assert tw.nearby_object_leakage(labels, ref) == pytest.approx(10 / 400)
    sizes = tw.region_sizes(labels == tw.COLOURS.index("blue"))
    assert sizes[5, 5] == 100 and sizes[17, 0] == 6 and sizes[16, 16] == 4 and sizes[0, 0] == 0


def test_frame_is_the_outer_band():
    mask = tw.frame(12, 12, thickness=5)
    assert mask.sum() == 144 - 4 and not mask[5:7, 5:7].any()


def test_scores_and_summary(tmp_path):
    ref = tw.read_reference_set(write_set(tmp_path / "ring"))
    prompts = tw.bench_prompts(ref, count=2)
    assert [p.text for p in prompts] == [
        "a photo of a sks ring next to a small black circle", "a photo of a sks ring next to a small pink circle",
        "a photo of a sks ring on a plain cyan background", "a photo of a sks ring on a plain purple background"]
    # cyan is the second colour farthest from the photos', but only 0.31 from their nearby blue: an object drawn
    # in it is not asked for (a cyan background would read as the nearby object leaking).
    leaky = canvas(20, "green")  # the reference's background all over, no subject
    leaky[0:10, 0:4] = rgb("blue")  # 40 px nearby colour: 0.1
    asked = canvas(20, "purple")
    asked[5:10, 5:10] = rgb("red")  # 25 px subject: 0.0625
    scores = [tw.score_image(leaky, prompts[0], ref), tw.score_image(canvas(20, "pink"), prompts[1], ref),
              tw.score_image(asked, prompts[2], ref), tw.score_image(asked, prompts[3], ref)]
    summary = tw.summarise(scores)
    assert summary["nearby_leakage"] == pytest.approx((0.1 + 0.0) / 2)
    # The leaky image's blue block fills 40 of its 300 frame pixels (0.13 < 0.25), but 0.1 of the image in one
    # region is bigger than any nearby object (≤ 0.06): not counted.
    assert summary["nearby_object_leakage"] == 0.0
    # Frame of the leaky image: 300 px, 40 of its blue block's pixels lie in it (rows 0–9 × cols 0–3 all frame).
    assert summary["background_leakage"] == pytest.approx(((300 - 40) / 300 + 0.0) / 2)
    assert summary["text_alignment"] == pytest.approx(0.5)  # cyan asked, not shown; purple asked and shown
    assert summary["subject_fidelity"] == pytest.approx(0.5)
    assert tw.spread([0.1, 0.3]) == pytest.approx((0.2, 0.1414213562))
    assert tw.spread([0.4]) == (0.4, 0.0)


@pytest.mark.parametrize("name", ["red-ring", "pink-square", "yellow-cross"])
def test_reads_the_shared_sets(name):
    ref = tw.read_reference_set(SHARED_SETS / name)
    assert ref.token == "sks" and len(ref.photos) == 4 and ref.class_name == ref.subject_shape
    assert all(p.case1 == f"a photo of a sks {ref.class_name}" and p.case3.startswith(p.case1 + " on a ")
               for p in ref.photos)
    # The new objects and backgrounds of the prompts never share a colour with the photos.
    assert all(p.colour not in ref.colours for p in tw.bench_prompts(ref))
    # A photo is its own scene: its background covers the frame, its nearby object some pixels.
    labels = tw.palette_labels(Image.open(ref.photos[0].path))
    assert tw.background_leakage(labels, ref) > 0.8 and tw.nearby_leakage(labels, ref) > 0.005
    assert tw.subject_shown(labels, ref)


def test_reader_names_the_wrong_field(tmp_path):
    with pytest.raises(InvalidArgument, match="has no scene.json"):
        tw.read_reference_set(tmp_path)
    with pytest.raises(InvalidArgument, match="`subject.color` is 'gold'"):
        tw.read_reference_set(write_set(tmp_path / "a", subject={"color": "gold", "shape": "ring"}))
    with pytest.raises(InvalidArgument, match="`captions.01.png` names no photo"):
        tw.read_reference_set(write_set(tmp_path / "b", captions={"01.png": {}}))
    folder = write_set(tmp_path / "c")
    scene = json.loads((folder / "scene.json").read_text())
    del scene["captions"]["00.png"]["case3"]
    (folder / "scene.json").write_text(json.dumps(scene))
    with pytest.raises(InvalidArgument, match=r"`captions.00.png.case3` is missing"):
        tw.read_reference_set(folder)
    plain = tw.read_reference_set(write_set(tmp_path / "d", background={"color": "cyan", "pattern": "plain"}))
    assert plain.background_colours == ("cyan",) and plain.stripes == "white"
    shutil.rmtree(tmp_path / "d")
