"""The reviewed VLM instructions: one per (case, mode, class), the Case 1 templates, the corrective turn."""
import pytest

from persona.services.caption import instructions

IMAGE = "data:image/png;base64,AAAA"


def test_version_and_choices():
    assert instructions.INSTRUCTION_VERSION == "sid-3"
    assert instructions.CASES == (1, 2, 3, 4) and instructions.DEFAULT_CASE == 3
    assert instructions.MODES == ("object", "style", "expression")


@pytest.mark.parametrize("mode, class_name, expected", [
    ("object", "dog", "a photo of a sks dog"),
    ("expression", "owl", "a photo of an sks owl"),
    ("style", "painting", "A painting in the style of sks art"),
    ("style", "cartoon", "A cartoon in the style of sks art"),
])
def test_case_1_template(mode, class_name, expected):
    assert instructions.template_caption(mode, class_name, "sks") == expected


def test_messages_hold_the_instruction_and_the_image():
    [message] = instructions.build_messages(3, "object", "dog", IMAGE)
    assert message["role"] == "user"
    text, image = message["content"]
    assert text == {"type": "text", "text": instructions.instruction_text(3, "object", "dog")}
    assert image == {"type": "image_url", "image_url": {"url": IMAGE}}


def test_object_cases_follow_table_1():
    case2, case3, case4 = (instructions.instruction_text(c, "object", "backpack") for c in (2, 3, 4))
    for text in (case2, case3, case4):
        assert 'Start the sentence exactly with "a photo of a backpack"' in text and "sks" not in text
    assert "class names only" in case2 and "no colours" in case2 and "Do not describe the backpack itself" in case2
    assert "describe every other object" in case3 and "in detail" in case3
    assert "Do not describe the backpack itself" in case3
    assert "Describe the backpack itself in the same detail" in case4 and "Do not describe the backpack" not in case4


def test_expression_mode_describes_the_expression_only():
    text = instructions.instruction_text(3, "expression", "cat")
    assert "Describe the cat's facial expression" in text
    assert "Apart from its facial expression, do not describe the cat itself" in text


def test_style_mode_follows_appendix_c1():
    text = instructions.instruction_text(3, "style", "painting")
    assert 'Start the sentence exactly with "A painting in the style of art,"' in text
    assert "Do not describe the style of the painting itself" in text and "brushstrokes" in text
    assert "Describe the style" in instructions.instruction_text(4, "style", "painting")


def test_correction_repeats_the_answer_and_names_the_broken_rules():
    answer = "a photo of a brown dog"
    assistant, user = instructions.correction_messages(answer, ["it describes the dog itself: 'brown'"], 3,
                                                       "object", "dog")
    assert assistant == {"role": "assistant", "content": answer}
    assert user["role"] == "user"
    assert "- it describes the dog itself: 'brown'" in user["content"]
    assert 'starting exactly with "a photo of a dog"' in user["content"]
