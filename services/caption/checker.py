"""Checks a VLM answer against the SID rules and inserts the identifier: pure functions, no I/O.

The answer is never trusted: it is cleaned, the identifier is inserted before the class word, and
for Cases 1–3 any colour, material, texture, pattern, breed (or, outside expression mode,
expression) word attached to the subject is reported, since SID keeps the subject's details in
the identifier (Tab. 1). "Attached" is a word-window heuristic, not a parser: words before a
mention up to its determiner ("a fluffy white dog"), and after it through "with", "'s", "its",
"is"… when they qualify a body part or stand as a predicate ("dog with brown fur", "dog's golden
coat"). A new noun phrase ("next to a black leather purse") ends the window, so other objects may
be described freely. A sentence opening with "It"/"Its" is read as the subject too ("It has brown
fur").

SID names the subject only as "[v] class": other names are repaired where the meaning is kept —
a name ("named Max") and an apposition ("a dog, a corgi,") are dropped, a definite other name
("the puppy", "the corgi") becomes "the dog" (and is then checked as the dog) — and an answer that
does not open as instructed is re-opened when only its framing differs ("A dog lying…", "This is
a photo of a dog…"). Case 3 must describe something besides the subject (a detail word: colour,
material, texture, pattern, shape or size); Case 2 must not, materials included. What cannot be
repaired is a problem, and the caller asks the VLM again (bounded by PERSONA_VLM_ATTEMPTS).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CHARS = 1000  # longer answers are rambling or broken, not captions
CLIP_TOKEN_LIMIT = 77  # the text encoder's window in training: longer captions are cut, not rejected

COLOURS = frozenset(
    "black white brown golden gold tan beige cream grey gray silver red orange yellow green blue purple "
    "violet pink magenta teal turquoise navy maroon burgundy ivory copper bronze rust ginger chestnut "
    "chocolate fawn sandy blond blonde auburn caramel multicolored multicoloured colorful colourful "
    "brownish reddish yellowish greyish grayish whitish blackish dark pale".split())
MATERIALS = frozenset(
    "leather wooden wood plastic metal metallic steel ceramic porcelain glass fabric cotton wool woolen "
    "woollen knitted knit plush velvet denim silk rubber stone paper cardboard suede fleece nylon "
    "polyester".split())
TEXTURES = frozenset(
    "fluffy furry fuzzy shaggy curly wavy wiry silky smooth soft rough glossy shiny matte sleek velvety "
    "woolly wooly scruffy hairy haired coarse feathery scaly bumpy grainy".split())
PATTERNS = frozenset(
    "spotted striped stripy plaid checkered chequered patterned floral dotted polka speckled mottled "
    "brindle tabby merle piebald dappled tricolor tricolour calico tortoiseshell marbled camouflage "
    "harlequin".split())
BREEDS = frozenset(
    "corgi retriever labrador poodle terrier husky beagle bulldog shepherd spaniel chihuahua dachshund "
    "pug shiba inu akita collie sheepdog schnauzer rottweiler doberman dalmatian greyhound whippet "
    "maltese pomeranian samoyed malamute mastiff pinscher setter hound shih tzu yorkie yorkshire westie "
    "bichon cavalier havanese vizsla weimaraner newfoundland bernese cockapoo labradoodle goldendoodle "
    "papillon siamese persian ragdoll sphynx bengal coon burmese abyssinian birman shorthair "
    "longhair".split())
EXPRESSIONS = frozenset(
    "smiling grinning frowning happy sad angry surprised laughing crying pouting scowling smirking "
    "serious playful cheerful joyful excited sleepy grumpy worried scared fearful shocked annoyed".split())
STYLE_WORDS = frozenset(
    "brushstroke brushstrokes brushwork impasto palette watercolor watercolors watercolour "
    "watercolours gouache acrylic acrylics impressionist impressionistic impressionism expressionist "
    "expressionism cubist cubism surrealist surrealism pointillism pointillist stylized stylised "
    "painterly sketchy linework lineart cel anime manga minimalist minimalistic abstract photorealistic "
    "hyperrealistic renaissance baroque nouveau technique style styled".split())
STYLE_PAIRS = frozenset({("brush", "strokes"), ("oil", "paint"), ("oil", "painting"), ("oil", "on"),
                         ("color", "palette"), ("colour", "palette"), ("pop", "art"), ("line", "art")})

SHAPES = frozenset("round square rectangular oval circular triangular tall short large small big tiny huge long wide "
                   "narrow thick thin".split())
# Other names a caption may give the subject, by the class's last word (breeds are in BREEDS).
SYNONYMS = {
    "dog": "puppy pup puppies doggy doggie canine hound pooch pet animal".split(),
    "cat": "kitten kitty feline pet animal".split(),
    "animal": "plushie plush teddy toy".split(),  # stuffed animal
    "plushie": "plush teddy toy".split(),
    "bear": "teddy plushie plush toy".split(),
    "toy": "figure figurine plushie".split(),
    "backpack": "bag rucksack knapsack".split(),
    "sneaker": "shoe shoes trainer sneakers footwear".split(),
    "boot": "shoe shoes boots footwear".split(),
    "sunglasses": "glasses shades eyewear".split(),
    "vase": "pot jar vessel".split(),
    "car": "vehicle toy".split(),
}
# The subject's own parts: attribute words qualifying these after a mention describe the subject.
PARTS = frozenset(
    "fur coat hair eyes eye ears ear nose tail paws paw feathers skin markings spots patches stripes face "
    "muzzle snout whiskers mane body legs head chest belly tongue teeth straps strap handle handles zipper "
    "pockets pocket surface finish glaze lid rim base wheels soles sole laces buttons trim lenses lens "
    "frame petals stem leaves".split())
DETERMINERS = frozenset("a an the this that these those another some two three several many one".split())
INDEFINITE = frozenset("a an another some two three several many one".split())
POSSESSIVES = frozenset("its his her their 's".split())
COPULAS = frozenset("is are was looks appears seems made".split())
BOUNDARIES = frozenset(
    "on in at next beside near by under behind against among between over above below inside onto into "
    "from to toward towards while as around across through along outside underneath beneath atop".split())
_SENTENCE_END = frozenset(".;:!?")
_WORD_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|'s|[.,;:!?]")
_REFUSAL_RE = re.compile(r"^(?:i'?m sorry|i am sorry|sorry|i cannot|i can'?t|i'?m unable|as an ai)\b", re.I)
_PREFACE_RE = re.compile(r"^(?:(?:sure|certainly|okay|ok)[,.!]?\s*)?(?:here(?:'s| is)[^:\n]{0,40}:|"
                         r"(?:caption|description)\s*:)\s*", re.I)
_CLIP_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", re.I)


@dataclass(frozen=True)
class Verdict:
    """The checked answer: the caption to store (identifier inserted), or the rules it broke."""

    text: str
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def clean(answer: str) -> str:
    """Strips markdown, quotes, prefaces ("Caption: …") and line breaks; collapses whitespace."""
    text = answer.replace("’", "'").replace("‘", "'").replace("*", "").replace("__", "").replace("`", "")
    text = " ".join(line.strip().lstrip("#>- ").strip() for line in text.splitlines())
    text = re.sub(r"[\"“”]", "", " ".join(text.split()))
    text = _PREFACE_RE.sub("", text).strip()
    while len(text) > 1 and text[0] == text[-1] == "'":
        text = text[1:-1].strip()
    return text


def clip_tokens_at_least(text: str) -> int:
    """A lower bound on CLIP's token count: its pre-tokenizer's pieces plus start and end tokens."""
    return len(_CLIP_RE.findall(text)) + 2


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower().replace("’", "'"))


def _parts(word: str) -> list[str]:
    return [word, *word.split("-")] if "-" in word else [word]


def _category(word: str, allowed_expression: bool) -> str | None:
    lexicons = [("colour", COLOURS), ("material", MATERIALS), ("texture", TEXTURES), ("pattern", PATTERNS),
                ("breed", BREEDS)]
    if not allowed_expression:
        lexicons.append(("expression", EXPRESSIONS))
    for part in _parts(word):
        for name, words in lexicons:
            if part in words:
                return name
    return None


def _mentions(words: list[str], class_words: list[str]) -> list[tuple[int, int]]:
    n = len(class_words)
    return [(i, i + n - 1) for i in range(len(words) - n + 1) if words[i:i + n] == class_words]


def _qualifies_part(words: list[str], k: int) -> bool:
    """True when words[k] (an attribute) qualifies a body part within the next few words."""
    for word in words[k + 1:k + 5]:
        if word in PARTS:
            return True
        if word in _SENTENCE_END or word in BOUNDARIES or word in DETERMINERS:
            return False
    return False


def _pronoun_mentions(words: list[str]) -> list[tuple[int, int]]:
    """"It"/"Its" opening a sentence (or a clause after ";"): in a caption, the subject."""
    return [(k, k) for k, w in enumerate(words) if w in ("it", "its") and k and words[k - 1] in _SENTENCE_END]


def subject_descriptions(text: str, class_name: str, token: str,
                         allow_expression: bool = False) -> list[tuple[str, str]]:
    """Attribute words attached to the subject, as (word, category) pairs in text order."""
    words, class_words, token = _words(text), _words(class_name), token.lower()
    found: dict[int, tuple[str, str]] = {}
    mentions = sorted(_mentions(words, class_words) + _pronoun_mentions(words))
    for number, (start, end) in enumerate(mentions):
        before: list[int] = []
        other_entity = False
        for k in range(start - 1, max(-1, start - 7), -1):  # back to the mention's determiner
            word = words[k]
            if word == token or word == ",":
                continue
            if word in DETERMINERS:
                # a later "a dog" / "another dog" is a second dog, not the subject
                other_entity = number > 0 and word in INDEFINITE
                break
            if word in _SENTENCE_END or word in BOUNDARIES or word in POSSESSIVES:
                break
            before.append(k)
        if other_entity:
            continue
        for k in before:
            category = _category(words[k], allow_expression)
            if category:
                found[k] = (words[k], category)
        predicate = False
        for k in range(end + 1, min(len(words), end + 12)):  # forward through "with", "'s", "its", "is"
            word = words[k]
            if word in _SENTENCE_END or word in BOUNDARIES:
                break
            if word in DETERMINERS and not _qualifies_part(words, k):
                break  # a new object ("… and a black purse"), unless it is a part ("with a fluffy tail")
            if word in COPULAS:
                predicate = True
                continue
            category = _category(word, allow_expression)
            if category and (predicate or _qualifies_part(words, k)):
                found[k] = (word, category)
    return [found[k] for k in sorted(found)]


def style_descriptions(text: str, token: str) -> list[str]:
    """Words that describe the style itself, outside the required "in the style of [v] art"."""
    rest = re.sub(rf"\bin the style of {re.escape(token)} art\b", " ", text, flags=re.I)
    words = _words(rest)
    hits = [w for w in words if any(p in STYLE_WORDS for p in _parts(w))]
    hits += [f"{prev} {w}" for prev, w in zip(words, words[1:]) if (prev, w) in STYLE_PAIRS]
    return list(dict.fromkeys(hits))


def insert_identifier(text: str, mode: str, class_name: str, token: str) -> str | None:
    """Puts the identifier before the class word (style: before "art"); None when there is no place for it.

    Answers where the VLM already wrote the identifier are kept as they are.
    """
    if mode == "style":
        pattern = re.compile(rf"\bin the style of\s+(?:({re.escape(token)})\s+)?art\b", re.I)
        replacement = f"in the style of {token} art"
    else:
        words = r"\s+".join(re.escape(w) for w in class_name.split())
        pattern = re.compile(rf"(?:\b({re.escape(token)})\s+)?\b({words})\b", re.I)
        replacement = None
    match = pattern.search(text)
    if match is None:
        return None
    if match.group(1):
        return text
    new = replacement or f"{token} {match.group(2)}"
    return text[:match.start()] + new + text[match.end():]


def other_names(class_name: str) -> list[str]:
    """Words that would name the subject otherwise: the class's synonyms and, for animals, breeds."""
    head = _words(class_name)[-1] if _words(class_name) else ""
    names = list(SYNONYMS.get(head, ()))
    if head in ("dog", "cat", "puppy", "kitten"):
        names += sorted(BREEDS)
    return [n for n in names if n not in _words(class_name)]


def repair_names(text: str, class_name: str) -> tuple[str, list[str]]:
    """Drops a personal name ("named Max") and an apposition giving another name ("a dog, a corgi,"), and turns
    a definite other name ("the puppy") into the class ("the dog"); returns the text and what was repaired."""
    repairs: list[str] = []
    name = re.compile(r"(,\s*)?\b(?:named|called|whose name is)\s+[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)?(\s*,)?")
    for match in list(name.finditer(text))[::-1]:
        repairs.append(f"dropped {match.group(0).strip(' ,')!r}")
        text = text[:match.start()] + " " + text[match.end():]
    others = other_names(class_name)
    if others:
        alternatives = "|".join(re.escape(o) for o in sorted(others, key=len, reverse=True))
        cls = r"\s+".join(re.escape(w) for w in class_name.split())
        apposition = re.compile(
            rf"\b({cls})\s*(?:,|\()\s*(?:an?|the)\s+(?:[\w-]+\s+){{0,3}}?(?:{alternatives})\s*(?:,|\))", re.I)
        for match in list(apposition.finditer(text))[::-1]:
            repairs.append(f"dropped {text[match.end(1):match.end()].strip(' ,()')!r}")
            text = text[:match.end(1)] + " " + text[match.end():]
        definite = re.compile(rf"\b(the|this|that)\s+({alternatives})\b", re.I)
        for match in list(definite.finditer(text))[::-1]:
            introduced = rf"\b(?:{'|'.join(INDEFINITE)})\s+(?:[\w-]+\s+){{0,3}}?{re.escape(match.group(2))}\b"
            if re.search(introduced, text[:match.start()], re.I):
                continue  # "next to a leather bag; the bag is brown": another object, not the subject
            repairs.append(f"replaced {match.group(0)!r} with '{match.group(1)} {class_name}'")
            text = text[:match.start()] + f"{match.group(1)} {class_name}" + text[match.end():]
    text = re.sub(r"\s+([,.;:!?])", r"\1", " ".join(text.split()))
    return re.sub(r",\s*,", ",", text), repairs[::-1]


def repair_opening(text: str, opening: str, class_name: str, token: str) -> str | None:
    """`text` opened exactly with `opening` ("a photo of a dog") when only the framing before the subject differs:
    none ("A dog lying…") or another "… photo of" ("This is a close-up photo of the dog…"); None when it cannot be
    (something else comes first, or a word between the article and the class)."""
    frame = opening.lower().rsplit(" of ", 1)[0] + " of "  # "a photo of ": the words before the subject
    if text.lower().startswith(frame):
        return text  # what follows is the subject's own check (a word before the class is a description)
    cls = r"\s+".join(re.escape(w) for w in class_name.split())
    match = re.match(rf"^((?:[\w'-]+,?\s+){{0,8}}?)(?:a|an|the|one)\s+(?:{re.escape(token)}\s+)?{cls}\b", text, re.I)
    if match is None:
        return None
    framing = match.group(1).lower().replace(",", " ").split()
    if framing and not (framing[-1] == "of" and {"photo", "image", "picture", "photograph", "shot"} & set(framing)):
        return None
    return opening + text[match.end():]


def _quoted(words) -> str:
    return ", ".join(f"'{w}'" for w in words)


def check(answer: str, case: int, mode: str, class_name: str, token: str, opening: str) -> Verdict:
    """Checks one VLM answer for (case, mode); `opening` is what the instruction told it to start with."""
    text = clean(answer)
    if not text:
        return Verdict(text, (f"the answer is empty: reply with one sentence starting with \"{opening}\"",))
    if _REFUSAL_RE.match(text):
        return Verdict(text, (f"the answer is a refusal, not a caption: describe the image in one sentence "
                              f"starting with \"{opening}\"",))
    if len(text) > MAX_CHARS:
        return Verdict(text, (f"the answer is {len(text)} characters; at most {MAX_CHARS}: write one sentence",))
    problems: list[str] = []
    repairs: list[str] = []
    opened = text.lower().startswith(opening.lower().rsplit(" art", 1)[0])
    if mode != "style":
        text, repairs = repair_names(text, class_name)
        reopened = repair_opening(text, opening, class_name, token)
        opened = reopened is not None
        if opened and reopened != text:
            repairs.append(f"re-opened with {opening!r}")
            text = reopened
    inserted = insert_identifier(text, mode, class_name, token)
    if inserted is None:
        where = "\"in the style of art\"" if mode == "style" else f"the class word '{class_name}'"
        problems.append(f"it does not contain {where}: start exactly with \"{opening}\"")
    else:
        text = inserted
        if not opened:
            problems.append(f"it does not open as instructed: start exactly with \"{opening}\" and name the "
                            f"{class_name} in no other way")
    if mode == "style" and not re.search(rf"\b{re.escape(class_name)}\b", text, re.I):
        problems.append(f"it does not name the {class_name}: start exactly with \"{opening}\"")
    if mode == "style" and case != 4:
        words = style_descriptions(text, token)
        if words:
            problems.append(f"it describes the style itself: {_quoted(words)}; describe only what the "
                            f"{class_name} depicts, never how it is drawn or painted")
    attached = subject_descriptions(text, class_name, token, allow_expression=mode == "expression") \
        if mode != "style" else []
    if mode != "style" and case != 4:
        if attached:
            kinds = ", ".join(dict.fromkeys(c for _, c in attached))
            allowed = " apart from its facial expression" if mode == "expression" else ""
            problems.append(f"it describes the {class_name} itself: {_quoted(w for w, _ in attached)} ({kinds}); "
                            f"say nothing about the {class_name}'s appearance{allowed}, only what it does and "
                            f"where, and describe the other objects instead")
    if case == 2:
        details = [w for w in _words(text) if any(p in COLOURS | MATERIALS | TEXTURES | PATTERNS for p in _parts(w))
                   and w not in ("dark", "pale")]
        if details:
            problems.append(f"it gives details of objects: {_quoted(dict.fromkeys(details))}; name the other "
                            "objects by their class only, without adjectives")
    if case == 3 and mode != "style":
        own = {w for w, _ in attached}
        details = [w for w in _words(text) if w not in own
                   and any(p in COLOURS | MATERIALS | TEXTURES | PATTERNS | SHAPES for p in _parts(w))]
        if not details:
            problems.append(f"it gives no detail of anything but the {class_name}: describe the other objects and "
                            "the background in detail (colours, materials, textures, patterns, shapes, positions)")
    warnings = [f"repaired: {r} (SID names the subject only as '{token} {class_name}')" for r in repairs]
    count = clip_tokens_at_least(text)
    if count > CLIP_TOKEN_LIMIT:
        warnings.append(f"the caption is at least {count} CLIP tokens; training keeps the first "
                        f"{CLIP_TOKEN_LIMIT}: shorten it with SetCaption if its end matters")
    return Verdict(text, tuple(problems), tuple(warnings))
