"""What a StartTraining request means, as pure functions: the regularisers in effect, the subject's mode, the text
each photo trains with (and the warning when SID captions are missing), and the TrainConfig a concept's options
make. TrainDomain (domain.py) checks a request with these and runs the job."""
from __future__ import annotations

from dataclasses import dataclass

from persona.services.models.concepts import Concept, TrainingCaption
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

from ..caption import instructions
from ..subjects.domain import Subject, indefinite_article
from .config import TrainConfig
from .methods import METHODS
from .methods.p3s.config import P3SConfig
from .options import BY_NAME, DATA_OPTIONS

# Regularisers each method can use. Textual inversion learns one embedding from the photos alone, so
# prior preservation (a UNet-side term) has nothing to protect there. Custom Diffusion regularises with real
# images of the class in the paper; prior preservation's generated class images are the closest we have.
# SVDiff's paper trains with prior preservation, as DreamBooth.
# Methods whose own weights include the text side (a token row): what SPL and CoRe act on. dreambooth and lora
# qualify with train_text_encoder.
TEXT_SIDE_METHODS = ("ti", "custom_diffusion", "svdiff")
REGULARIZERS = {"prior": ("dreambooth", "lora", "custom_diffusion", "svdiff"),
                "mask": tuple(METHODS),
                "spl": (*TEXT_SIDE_METHODS, "dreambooth", "lora"),
                "core": (*TEXT_SIDE_METHODS, "dreambooth", "lora")}
# On unless a request turns them off with "none"; named regularisers add to them.
DEFAULT_REGULARIZERS = ("prior",)
NO_REGULARIZERS = "none"
# "class" is Case 1; "caseN" trains on stored captions of SID case N only.
CAPTION_SOURCES = ("sid", "class", "case1", "case2", "case3", "case4")


@dataclass(frozen=True)
class TrainRequest:
    """StartTraining's fields, as plain values; `options` holds only what the caller set."""

    subject_id: str
    base_model: str = ""
    method: str = ""
    regularizers: tuple[str, ...] = ()
    captions: str = ""
    options: dict | None = None
    display_name: str = ""
    # A READY ti concept of the same subject and base model to continue from (CoRe's stage 2); "" for none.
    parent_concept_id: str = ""
    # object | style | expression; "": the mode of the subject's stored captions, else object.
    mode: str = ""
    # method customcontrast: the id of one of the tenant's trained CustomContrast encoders; "" otherwise.
    encoder: str = ""


def regularizers_in_effect(requested, method: str) -> list[str]:
    """The regularisers in effect: the defaults where they apply to `method` (prior preservation: SID captions
    need it, see DESIGN) plus those named. Naming one adds it; "none" first clears the defaults, so turning prior
    preservation off is always explicit (["none"], or ["none", "mask"] for the masked loss alone)."""
    names = [r.strip().lower() for r in requested if r.strip()]
    cleared = NO_REGULARIZERS in names
    names = [name for name in names if name != NO_REGULARIZERS]
    for name in names:
        if name not in REGULARIZERS:
            raise InvalidArgument(f"`regularizers` has {name!r}: use {', '.join(REGULARIZERS)} or none")
        if method not in REGULARIZERS[name]:
            raise InvalidArgument(f"`regularizers` {name!r} cannot be used with `method` {method!r}: it works with "
                                  f"{', '.join(REGULARIZERS[name])}; drop it or change the method")
    both = [name for name in names if cleared and name in DEFAULT_REGULARIZERS]
    if both:
        raise InvalidArgument(f"`regularizers` has both none and {', '.join(both)}: none turns the defaults off; "
                              "drop one of them")
    defaults = [] if cleared else [name for name in DEFAULT_REGULARIZERS if method in REGULARIZERS[name]]
    return list(dict.fromkeys(defaults + names))


def mode_of(requested: str, stored_captions) -> str:
    """The subject's mode: the one requested, else the one its stored captions were written in (a person's
    caption has none), else object."""
    mode = requested.strip().lower()
    if mode:
        if mode not in instructions.MODES:
            raise InvalidArgument(f"`mode` is {requested!r}: use one of {', '.join(instructions.MODES)}")
        return mode
    written = {c.mode for c in stored_captions if c.mode}
    return written.pop() if len(written) == 1 else instructions.DEFAULT_MODE


def validation_prompt(mode: str, subject: Subject) -> str:
    if mode == "style":
        return (f"{indefinite_article(subject.class_name).capitalize()} {subject.class_name} of a lighthouse by the "
                f"sea in the style of {subject.token} art")
    return f"a {subject.token} {subject.class_name} on the beach"


def training_captions(subject: Subject, source: str, mode: str, stored_captions) -> list[TrainingCaption]:
    """The text each image trains with, recorded now so the run does not change when captions do."""
    template = instructions.template_caption(mode, subject.class_name, subject.token)
    stored = {c.image_id: c for c in stored_captions} if source != "class" else {}
    if source.startswith("case"):  # SID's ablation: every photo captioned with exactly this case
        case = int(source[4:])
        wrong = [i.index for i in subject.images
                 if not (stored.get(i.image_id) and stored[i.image_id].case == case
                         and not stored[i.image_id].failure)]
        if wrong:
            raise FailedPrecondition(
                f"`captions` {source} needs every photo captioned with SID case {case}; photo(s) "
                f"{', '.join(map(str, wrong))} are not: run `persona-cli caption {subject.subject_id} --case "
                f"{case}` first")
    result = []
    for image in subject.images:
        caption = stored.get(image.image_id)
        if caption is not None and caption.text and not caption.failure:
            result.append(TrainingCaption(image.image_id, caption.text, caption.source))
        else:
            result.append(TrainingCaption(image.image_id, template, "class"))
    return result


def caption_fallback_warning(concept: Concept) -> str:
    """With `captions` sid, the photos that had no stored caption and train on the Case 1 template: said at the
    start of every run, so a subject never captioned does not silently train as Case 1."""
    if concept.captions != "sid":
        return ""
    fallen = [i for i, c in enumerate(concept.training_captions) if c.source == "class"]
    if not fallen:
        return ""
    which = "none of the photos has a stored caption" if len(fallen) == len(concept.training_captions) else \
        f"photo(s) {', '.join(map(str, fallen))} of {len(concept.training_captions)} have no stored caption"
    return (f"captions sid: {which}, so they train on the Case 1 template "
            f"{concept.training_captions[fallen[0]].text!r}, not SID: caption them first with `persona-cli caption "
            f"{concept.subject_id}` (a VLM is needed for SID), or pass --captions class to choose the template")


def sid_without_prior_warning(concept: Concept) -> str:
    """Described captions (SID) trained with prior preservation turned off: said at the start of every run, because
    the detailed words then drift the whole model and the photos' background and nearby objects leak more than with
    class-only captions (toy world README; notes/quality-18.md)."""
    templates = {instructions.template_caption(mode, concept.class_name, concept.token).lower()
                 for mode in instructions.MODES}
    described = any(" ".join(c.text.lower().split()) not in templates for c in concept.training_captions)
    if not described or "prior" in concept.regularizers or concept.method not in REGULARIZERS["prior"]:
        return ""
    return (f"captions {concept.captions} without prior preservation: described captions drift the whole model "
            "without it, and the photos' background and nearby objects leak more than with class-only captions "
            "(toy world: nearby-object leakage 0.059 vs 0.021); keep prior preservation on (drop --reg none / "
            "--no-prior), or train on --captions class")


def train_config(options: dict, method: str, token: str, regularizers, class_name: str,
                 device: str | None, p3s_clip_model: str | None = None) -> TrainConfig:
    """The loop's TrainConfig from a concept's options (every default filled in); not validated. `p3s_clip_model`:
    the CLIP vision model p3s's RNGR encoder attends to (the server's mask model; None: P3SConfig's)."""
    values = {k: v for k, v in options.items() if k in BY_NAME and k not in DATA_OPTIONS}
    values["lora_targets"] = tuple(values["lora_targets"])
    values["validation_prompts"] = tuple(values["validation_prompts"])
    # Prior preservation is the loop's own (class images in the batch); the rest are loop plugins.
    plugins = tuple(r for r in regularizers if r != "prior")
    return TrainConfig(method=method, token=token, device=device, regularizers=plugins,
                       class_name=class_name, p3s=p3s_config(options, p3s_clip_model), **values)


# Request option -> P3SConfig field.
P3S_OPTION_FIELDS = {"p3s_injection_lambda": "injection_lambda", "p3s_weight_schedule": "weight_schedule",
                     "p3s_weight_alpha": "weight_alpha", "p3s_weight_beta": "weight_beta", "p3s_weight_k": "weight_k",
                     "p3s_consistency_weight": "consistency_weight",
                     "p3s_consistency_layers": "consistency_layers", "p3s_fill": "fill",
                     "p3s_region": "region", "p3s_inpainting_model": "inpainting_model"}


def p3s_config(options: dict, clip_model: str | None = None) -> P3SConfig:
    """P3SConfig from a concept's p3s_* options (those it lacks, e.g. a concept stored before they existed, keep
    the paper's defaults)."""
    values = {field: options[name] for name, field in P3S_OPTION_FIELDS.items() if options.get(name) is not None}
    if clip_model:
        values["clip_model"] = clip_model
    return P3SConfig(**values)
