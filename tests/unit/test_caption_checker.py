"""The SID answer checker on hand-written answers: cleaning, identifier insertion, subject and style rules."""
import pytest

from persona.services.caption import checker
from persona.services.caption.instructions import opening


def check(answer, case=3, mode="object", class_name="dog", token="sks"):
    return checker.check(answer, case, mode, class_name, token, opening(mode, class_name))


@pytest.mark.parametrize("answer, expected", [
    ("a photo of a dog next to a black leather purse on a green fluffy blanket",
     "a photo of a sks dog next to a black leather purse on a green fluffy blanket"),
    ("A photo of a dog with a red collar on a wooden floor",
     "A photo of a sks dog with a red collar on a wooden floor"),
    ("a photo of a sks dog sitting on brown autumn leaves", "a photo of a sks dog sitting on brown autumn leaves"),
    ("a photo of a dog playing with a brown dog on the beach",  # a second dog may be described
     "a photo of a sks dog playing with a brown dog on the beach"),
    ("a photo of a dog wagging its tail beside a cat licking its white fur",
     "a photo of a sks dog wagging its tail beside a cat licking its white fur"),
    ('**Caption:** "a photo of a dog on a red couch"', "a photo of a sks dog on a red couch"),
    ("Here is the caption:\n  a photo of a dog\n near a blue   wall.", "a photo of a sks dog near a blue wall."),
])
def test_compliant_answers_get_the_identifier_before_the_class(answer, expected):
    verdict = check(answer)
    assert verdict.ok, verdict.problems
    assert verdict.text == expected


@pytest.mark.parametrize("answer, words", [
    ("a photo of a sks brown dog on a rug", ["brown"]),
    ("a photo of a fluffy white dog lying on the grass", ["fluffy", "white"]),
    ("A photo of a fluffy, white dog.", ["fluffy", "white"]),
    ("a photo of a dog with brown fur sitting on a bench", ["brown"]),
    ("a photo of a dog; the dog's golden coat shines in the sun", ["golden"]),
    ("a photo of a dog with a long fluffy tail", ["fluffy"]),
    ("a photo of a dog. The dog is brown and fluffy.", ["brown", "fluffy"]),
    ("a photo of a golden retriever dog on a lawn", ["golden", "retriever"]),
    ("a photo of a light-brown dog", ["light-brown"]),
    ("a photo of a smiling dog on a sofa", ["smiling"]),  # expression words too, outside expression mode
])
def test_describing_the_subject_breaks_cases_1_to_3(answer, words):
    for case in (1, 2, 3):
        verdict = check(answer, case=case)
        assert not verdict.ok
        [problem] = [p for p in verdict.problems if "describes the dog itself" in p]
        assert problem.split(": ", 1)[1].startswith(", ".join(f"'{w}'" for w in words) + " (")


def test_case_4_may_describe_the_subject():
    verdict = check("a photo of a brown fluffy dog on a green lawn", case=4)
    assert verdict.ok and verdict.text == "a photo of a brown fluffy sks dog on a green lawn"


def test_expression_mode_allows_the_expression_but_not_colour():
    assert check("a photo of a smiling dog with its mouth open on a red rug", mode="expression").ok
    verdict = check("a photo of a smiling brown dog on a rug", mode="expression")
    assert not verdict.ok and "'brown' (colour)" in verdict.problems[0] and "smiling" not in verdict.problems[0]


def test_case_2_names_other_objects_without_details():
    assert check("a photo of a dog next to a purse on a blanket", case=2).ok
    verdict = check("a photo of a dog next to a black purse on a striped blanket", case=2)
    assert verdict.problems == ("it gives details of objects: 'black', 'striped'; name the other objects by "
                                "their class only, without adjectives",)


def test_multi_word_class_and_an_article():
    verdict = check("a photo of a stuffed animal on a wooden shelf", class_name="stuffed animal")
    assert verdict.ok and verdict.text == "a photo of a sks stuffed animal on a wooden shelf"
    assert not check("a photo of a stuffed animal with white fur", class_name="stuffed animal").ok


@pytest.mark.parametrize("answer, problem", [
    ("a photo of a corgi on grass", "does not contain the class word 'dog'"),
    ("", "the answer is empty"),
    ("I'm sorry, I can't help with that.", "refusal"),
    ("a photo of a dog " + "x" * 1000, "at most 1000"),
])
def test_unusable_answers(answer, problem):
    verdict = check(answer)
    assert not verdict.ok and problem in verdict.problems[0]


def test_style_mode_inserts_the_identifier_and_forbids_style_words():
    verdict = check("A painting in the style of art, showing a red barn under a blue sky", mode="style",
                    class_name="painting")
    assert verdict.ok and verdict.text == "A painting in the style of sks art, showing a red barn under a blue sky"
    already = check("A painting in the style of sks art, with a barn", mode="style", class_name="painting")
    assert already.ok and already.text == "A painting in the style of sks art, with a barn"
    verdict = check("A painting in the style of art, with loose impressionist brushstrokes and a warm palette "
                    "showing a barn", mode="style", class_name="painting")
    assert not verdict.ok
    assert "'impressionist', 'brushstrokes', 'palette'" in verdict.problems[0]
    assert not check("A painting in the style of Van Gogh showing a barn", mode="style", class_name="painting").ok
    assert check("A painting in the style of art, in oil paint", mode="style", class_name="painting", case=4).ok


def test_long_captions_warn_but_pass():
    verdict = check("a photo of a dog " + "on a very long sandy beach " * 12)
    assert verdict.ok and "CLIP tokens" in verdict.warnings[0]
    assert check("a photo of a dog on a beach").warnings == ()


def test_clip_token_lower_bound_counts_words_punctuation_and_ends():
    assert checker.clip_tokens_at_least("a photo of a sks dog.") == 6 + 1 + 2


@pytest.mark.parametrize("answer, expected, repaired", [
    ("a photo of a dog, a corgi, lying on a green lawn", "a photo of a sks dog lying on a green lawn",
     "dropped 'a corgi'"),
    ("a photo of a dog named Max lying on a red blanket", "a photo of a sks dog lying on a red blanket",
     "dropped 'named Max'"),
    ("a photo of a dog on a red sofa; the puppy is asleep", "a photo of a sks dog on a red sofa; the dog is asleep",
     "replaced 'the puppy' with 'the dog'"),
    ("A dog lying on a green lawn", "a photo of a sks dog lying on a green lawn", "re-opened"),
    ("This is a close-up photo of the dog on a red mat", "a photo of a sks dog on a red mat", "re-opened"),
])
def test_other_names_and_framing_are_repaired(answer, expected, repaired):
    verdict = check(answer)
    assert verdict.ok, verdict.problems
    assert verdict.text == expected
    assert any(repaired in w for w in verdict.warnings), verdict.warnings


@pytest.mark.parametrize("answer, words", [
    ("a photo of a dog lying on a green lawn; the puppy has brown fur", "'brown'"),
    ("a photo of a dog on a red blanket. It has brown fluffy fur.", "'brown', 'fluffy'"),
    ("a photo of a dog on a red blanket. Its fur is golden.", "'golden'"),
    ("a photo of a dog, a fluffy white corgi, on a red blanket; the corgi has a shiny coat", "'shiny'"),
])
def test_other_names_still_describing_the_subject_are_problems(answer, words):
    verdict = check(answer)
    assert not verdict.ok and any(f"describes the dog itself: {words}" in p for p in verdict.problems), verdict


def test_another_object_named_like_the_subject_is_left_alone():
    verdict = check("a photo of a backpack next to a leather bag; the bag is brown", class_name="backpack")
    assert verdict.ok and verdict.text.endswith("the bag is brown") and verdict.warnings == ()


def test_case_3_needs_detail_and_case_2_no_material():
    [problem] = check("a photo of a dog").problems
    assert "gives no detail of anything but the dog" in problem
    assert "gives no detail" in check("a photo of a dog next to a purse on a sofa").problems[0]
    assert check("a photo of a dog next to a large purse on a sofa").ok  # a shape or size is a detail
    verdict = check("a photo of a dog next to a leather purse on a sofa", case=2)
    assert verdict.problems and "'leather'" in verdict.problems[0]


def test_an_answer_that_opens_otherwise_is_a_problem():
    verdict = check("On a green lawn in the sun lies a dog")
    assert not verdict.ok and 'does not open as instructed: start exactly with "a photo of a dog"' in verdict.problems[0]
    verdict = check("Showing a red barn, a painting in the style of art", mode="style", class_name="painting")
    assert not verdict.ok and "does not open as instructed" in verdict.problems[0]
