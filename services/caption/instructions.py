"""The reviewed VLM instructions for SID captions (Tab. 1 cases, App. C.1 style, App. D.2 expression).

Every word persona sends to a vision-language model is written here, in one place, and versioned:
change any text below and bump INSTRUCTION_VERSION, since stored captions record the version that
wrote them.

The VLM is asked to open with "a photo of a dog" (style: "A painting in the style of art,") and
persona inserts the identifier ("sks") before the class word itself afterwards, as the paper does
(SID §3.2, Fig. 4: "the unique identifier [v] is inserted" after the VLM writes). Asking the model
to write a rare nonsense token makes it "correct" or explain it; inserting it ourselves cannot fail.
"""
from __future__ import annotations

from persona.services.subjects.domain import indefinite_article

# sid-2: "a unicorn", "an hourglass" (article by sound, not spelling); sid-3: the pose is asked for, not only allowed
# (SID's pose bias: an unnamed pose binds to the identifier).
INSTRUCTION_VERSION = "sid-3"

CASES = (1, 2, 3, 4)
DEFAULT_CASE = 3  # SID proper; Cases 1, 2 and 4 are the paper's baselines and ablation
MODES = ("object", "style", "expression")
DEFAULT_MODE = "object"

# The one-sentence limit keeps captions near CLIP's 77-token training window.
_FORMAT = ("Reply with the caption only: one sentence of at most 60 words, no quotation marks, no markdown, "
           "no preface or explanation.")



def opening(mode: str, class_name: str) -> str:
    """What the VLM must start its answer with (before persona inserts the identifier)."""
    if mode == "style":
        return f"{indefinite_article(class_name).capitalize()} {class_name} in the style of art,"
    return f"a photo of {indefinite_article(class_name)} {class_name}"


def template_caption(mode: str, class_name: str, token: str) -> str:
    """The Case 1 description, written without a VLM: the class and identifier only."""
    if mode == "style":  # App. C.1: "A painting/cartoon in the style of [v] art"
        return f"{indefinite_article(class_name).capitalize()} {class_name} in the style of {token} art"
    return f"a photo of {indefinite_article(class_name)} {token} {class_name}"


def class_prompt(mode: str, class_name: str) -> str:
    """The template without its identifier: what the base model draws for prior preservation, as DreamBooth's
    "a photo of a dog" is its "a photo of a sks dog" without "sks"."""
    if mode == "style":
        return f"{indefinite_article(class_name).capitalize()} {class_name} in the style of art"
    return f"a photo of {indefinite_article(class_name)} {class_name}"


def _object_directions(case: int, mode: str, c: str) -> list[str]:
    keep_subject_plain = (
        f"Do not describe the {c} itself: never mention its colour, fur, hair, material, texture, pattern, "
        f"markings, breed, make, type or any other feature; refer to it only as \"the {c}\". "
        f"Say what the {c} is doing, its pose (e.g. sitting, lying on its side, standing, jumping) and where it is."
    )
    if case == 2:
        return [
            f"Then name the other objects and the background in the image by their class names only, "
            f"e.g. \"… next to a purse on a blanket in a room\".",
            "Do not add any adjectives or details to them: no colours, materials, textures or patterns.",
            keep_subject_plain,
        ]
    directions = [
        "Then describe every other object and the background in the image in detail: their colours, "
        "materials, textures, patterns, shapes and positions, e.g. \"… next to a black leather purse on a "
        "green fluffy blanket in front of a white brick wall\".",
    ]
    if case == 4:  # the ablation: the subject is specified too, which loses identity in training
        directions.append(f"Describe the {c} itself in the same detail: its colours, fur or material, "
                          f"texture, pattern, markings, breed or type and distinctive features.")
    elif mode == "expression":  # App. D.2: a strong expression would otherwise bind to the identifier
        directions.append(f"Describe the {c}'s facial expression, e.g. \"smiling with its mouth open\", "
                          f"\"frowning\", \"looking surprised\". Apart from its facial expression, "
                          + keep_subject_plain[0].lower() + keep_subject_plain[1:])
    else:
        directions.append(keep_subject_plain)
    return directions


def _style_directions(case: int, c: str) -> list[str]:
    # App. C.1: the style is the subject; everything depicted is an undesired object to describe.
    keep_style_plain = (
        f"Do not describe the style of the {c} itself: never mention brushstrokes, technique, medium, "
        "colour palette, lighting style, art movement, artist or the word style again."
    )
    if case == 2:
        return ["Then name what the image depicts by class names only, e.g. \"… of a house and a tree "
                "on a hill\", with no adjectives or details.", keep_style_plain]
    directions = ["Then describe what the image depicts in detail: each object, person, animal and the "
                  "scenery, with their colours, shapes, materials and positions."]
    if case == 4:
        directions.append(f"Describe the style of the {c} too: medium, brushstrokes, palette, technique.")
    else:
        directions.append(keep_style_plain)
    return directions


def instruction_text(case: int, mode: str, class_name: str) -> str:
    """The instruction for one image (Cases 2–4; Case 1 uses `template_caption`)."""
    c = class_name
    start = opening(mode, c)
    if mode == "style":
        lines = [f"Describe the image in one sentence. Start the sentence exactly with \"{start}\" "
                 f"and do not change those words.", *_style_directions(case, c)]
    else:
        lines = [f"Describe the image for a training caption. The main subject is a {c}. Start the sentence "
                 f"exactly with \"{start}\" and do not change those words or name the {c} in any other way.",
                 *_object_directions(case, mode, c)]
    return " ".join([*lines, _FORMAT])


def build_messages(case: int, mode: str, class_name: str, image_data_url: str) -> list[dict]:
    """The chat messages asking the VLM to describe one image: the instruction and the image."""
    return [{
        "role": "user",
        "content": [
            {"type": "text", "text": instruction_text(case, mode, class_name)},
            {"type": "image_url", "image_url": {"url": image_data_url}},
        ],
    }]


def correction_messages(answer: str, problems: list[str], case: int, mode: str, class_name: str) -> list[dict]:
    """The follow-up turn after a non-compliant answer: the answer itself, then what broke which rule."""
    listed = "\n".join(f"- {p}" for p in problems)
    text = (f"Your caption does not follow the instructions:\n{listed}\n"
            f"Write the caption again, starting exactly with \"{opening(mode, class_name)}\", "
            f"fixing every point above and following all the earlier instructions. {_FORMAT}")
    return [{"role": "assistant", "content": answer}, {"role": "user", "content": text}]
