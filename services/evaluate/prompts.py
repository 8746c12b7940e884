"""Evaluation prompt sets: DreamBench's 25 object and 25 live-subject prompts, or a user's file, each prompt tagged
reconstruction or editing (CustomContrast's split of R-* and E-* scores).

Kinds. A *reconstruction* prompt only re-places the subject unchanged ("a sks dog on the beach", "… with a
city in the background"); an *editing* prompt changes the subject itself: a property ("a red sks dog",
"a cube shaped sks dog"), an accessory or outfit ("… wearing a santa hat", "… in a chef outfit") or its style.
DreamBench's prompts carry their kind in the table below: objects 20 reconstruction + 5 editing, live
subjects 10 + 15.

A user's prompt file, one prompt per line:

    # comments and blank lines are skipped
    a {} on the beach                    {} is "<token> <class>", e.g. "sks dog"
    R: a {token} {class} in the snow     {token} and {class} separately ({0} and {1} as in DreamBench's file)
    E: a {} made of lego                 R: / E: (any case) set the kind

A line without a prefix gets its kind from `infer_kind`: editing when words other than "of" stand
between the last article and the subject ("a red {}"), when the subject is followed by "wearing …" or
"in … outfit/costume/…", or when the prompt names a style; reconstruction otherwise. On DreamBench's
prompts this rule agrees with the table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from persona.services.runtime.errors import InvalidArgument
from persona.services.subjects.domain import LIVE_CLASSES

from .metrics import EDITING, RECONSTRUCTION

DREAMBENCH = "dreambench"
DREAMBENCH_OBJECT = "dreambench-object"
DREAMBENCH_LIVE = "dreambench-live"
BUILTIN_SETS = (DREAMBENCH, DREAMBENCH_OBJECT, DREAMBENCH_LIVE)
# DreamBench's live subjects (LIVE_CLASSES) get its live prompts; every other class gets the object prompts.

_R, _E = RECONSTRUCTION, EDITING
# ../shared/data/dreambench/prompts_and_classes.txt, `{}` standing for "<token> <class>".
_RECONTEXTUALISATION = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_PROPERTY = (
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)
DREAMBENCH_OBJECT_PROMPTS: tuple[tuple[str, str], ...] = (
    *((t, _R) for t in _RECONTEXTUALISATION),
    *((t, _R) for t in (
        "a {} with a wheat field in the background",
        "a {} with a tree and autumn leaves in the background",
        "a {} with the Eiffel Tower in the background",
        "a {} floating on top of water",
        "a {} floating in an ocean of milk",
        "a {} on top of green grass with sunflowers around it",
        "a {} on top of a mirror",
        "a {} on top of the sidewalk in a crowded street",
        "a {} on top of a dirt road",
        "a {} on top of a white rug",
    )),
    *((t, _E) for t in _PROPERTY),
)
DREAMBENCH_LIVE_PROMPTS: tuple[tuple[str, str], ...] = (
    *((t, _R) for t in _RECONTEXTUALISATION),
    # Accessorisation: the subject is changed by what it wears.
    *((t, _E) for t in (
        "a {} wearing a red hat",
        "a {} wearing a santa hat",
        "a {} wearing a rainbow scarf",
        "a {} wearing a black top hat and a monocle",
        "a {} in a chef outfit",
        "a {} in a firefighter outfit",
        "a {} in a police outfit",
        "a {} wearing pink glasses",
        "a {} wearing a yellow shirt",
        "a {} in a purple wizard outfit",
    )),
    *((t, _E) for t in _PROPERTY),
)

# Placeholders a template may hold; `{}` is the subject as "<token> <class>".
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NAMES = {"": "subject", "0": "token", "1": "class", "token": "token", "class": "class"}
_PREFIX = re.compile(r"^([RrEe])\s*:\s*")
_ARTICLES = {"a", "an", "the"}
_OUTFIT_WORDS = {"outfit", "costume", "uniform", "dress", "suit", "clothes", "armor", "armour"}


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt, filled in for a subject."""

    # The prompt to generate from, e.g. "a sks dog on the beach".
    text: str
    # "reconstruction" (the subject only re-placed) or "editing" (the subject changed).
    kind: str


def prompt_set(name_or_path: str, class_name: str, token: str) -> list[EvalPrompt]:
    """The prompts of a built-in set (dreambench, dreambench-object, dreambench-live) or a file, filled in.

    `dreambench` picks the live-subject prompts for DreamBench's live classes (dog, cat) and the object
    prompts for every other class.
    """
    class_name, token = _check_subject(class_name, token)
    name = (name_or_path or "").strip()
    if not name:
        raise InvalidArgument(
            f"`prompts` is empty: pass {DREAMBENCH} (or {DREAMBENCH_OBJECT}, {DREAMBENCH_LIVE}) or a prompt file")
    if name in BUILTIN_SETS:
        live = class_name.lower() in LIVE_CLASSES if name == DREAMBENCH else name == DREAMBENCH_LIVE
        table = DREAMBENCH_LIVE_PROMPTS if live else DREAMBENCH_OBJECT_PROMPTS
        return [EvalPrompt(text=_fill(t, class_name, token), kind=kind) for t, kind in table]
    path = Path(name).expanduser()
    if not path.is_file():
        raise InvalidArgument(
            f"`prompts` {name!r} is neither a built-in set ({', '.join(BUILTIN_SETS)}) nor a file: "
            "check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"`prompts` file {name!r} cannot be read as UTF-8 text ({e})") from None
    return parse_prompts(text, class_name, token, source=name)


def parse_prompts(text: str, class_name: str, token: str, source: str = "prompts") -> list[EvalPrompt]:
    """Prompts from the text of a prompt file (format in the module docstring), filled in for the subject."""
    class_name, token = _check_subject(class_name, token)
    prompts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        prefix = _PREFIX.match(line)
        template = line[prefix.end():].strip() if prefix else line
        where = f"`prompts` line {number} of {source}"
        if not template:
            raise InvalidArgument(f"{where} has a kind prefix but no prompt: write e.g. `R: a {{}} on the beach`")
        _check_template(template, where)
        if prefix:
            kind = _R if prefix.group(1).upper() == "R" else _E
        else:
            kind = infer_kind(template)
        prompts.append(EvalPrompt(text=_fill(template, class_name, token), kind=kind))
    if not prompts:
        raise InvalidArgument(
            f"`prompts` {source} holds no prompt (only blank lines or # comments): write one prompt per line, "
            "e.g. `a {} on the beach`")
    return prompts


def infer_kind(template: str) -> str:
    """Editing or reconstruction for a template with placeholders, by the rule in the module docstring."""
    spans = list(_PLACEHOLDER.finditer(template))
    if not spans:
        return _R
    before = template[:spans[0].start()].lower().split()
    after = template[spans[-1].end():].lower().split()
    # Words between the last article and the subject describe the subject: "a red {}", "a cube shaped {}"
    # (but not "a photo of {}").
    if any(w in _ARTICLES for w in before):
        last_article = max(i for i, w in enumerate(before) if w in _ARTICLES)
        between = before[last_article + 1:]
        if between and "of" not in between:
            return _E
    # What the subject wears or is dressed in.
    if after and after[0] in ("wearing", "dressed"):
        return _E
    if after and after[0] == "in" and any(w.strip(",.") in _OUTFIT_WORDS for w in after[1:]):
        return _E
    if "style" in (w.strip(",.") for w in before + after):
        return _E
    return _R


def _check_subject(class_name: str, token: str) -> tuple[str, str]:
    class_name, token = (class_name or "").strip(), (token or "").strip()
    if not class_name:
        raise InvalidArgument("`class_name` is empty: pass the subject's class, e.g. dog")
    if not token:
        raise InvalidArgument("`token` is empty: pass the subject's identifier, e.g. sks")
    return class_name, token


def _check_template(template: str, where: str) -> None:
    # Braces left after the placeholders are unmatched ones, e.g. "a {token dog".
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise InvalidArgument(f"{where} ({template!r}) has an unmatched brace: use {{}}, or {{token}} and {{class}}")
    names = [m.group(1).strip() for m in _PLACEHOLDER.finditer(template)]
    unknown = [n for n in names if n not in _NAMES]
    if unknown:
        raise InvalidArgument(f"{where} has the placeholder {{{unknown[0]}}}: use {{}}, or {{token}} and {{class}}")
    if not names:
        raise InvalidArgument(
            f"{where} ({template!r}) names no subject: write `{{}}` (token and class) or `{{token}} {{class}}` where "
            "the subject goes, e.g. `a {} on the beach`")


def _fill(template: str, class_name: str, token: str) -> str:
    values = {"subject": f"{token} {class_name}", "token": token, "class": class_name}
    return _PLACEHOLDER.sub(lambda m: values[_NAMES[m.group(1).strip()]], template)
