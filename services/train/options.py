"""Every training option, declared once (runtime/options.py's Option): name, type, default, bounds and help.

What is derived from this table: the defaults a concept records (`DEFAULT_OPTIONS`), the range and choice
checks and their messages (`check_option`), the servicer's TrainingOptions ↔ dict mapping, the TrainConfig
fields' defaults (config.py) and the `persona-cli train` options with their --help (client/commands/train.py).
Adding a knob is one `Option(...)` here plus its TrainingOptions field in protos/persona/v1/train.proto (and
`config.py` reads it when the loop uses it); tests/unit/test_train_options.py checks the three agree.

This module imports nothing heavy: the CLI reads it to build its options.
"""
from __future__ import annotations

from typing import Any

from persona.services.models.p3s.weights import INJECTION_LAMBDA, WEIGHT_OPTIONS
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.options import Option

MAX_STEPS = 100_000
# Photos per step when the request gives none: all of a subject's photos up to this many (4 is diffusers'
# train_dreambooth*.py --train_batch_size). One photo per step let the photos' background leak alike with class-only
# and SID captions on the toy world; four per step let SID's described background leave the token.
DEFAULT_BATCH_SIZE = 4
# Learning rate used when a request (or TrainConfig.learning_rate) leaves it unset, per method. DreamBooth moves every
# UNet weight, so it takes the smallest step (diffusers train_dreambooth.py: 5e-6); LoRA trains few fresh weights
# (train_dreambooth_lora.py: 1e-4); textual inversion one embedding row (textual_inversion.py: 5e-4); Custom
# Diffusion the cross-attention K/V and a token row (train_custom_diffusion.py: 1e-5 per image, the paper's 8e-5
# at batch 8); SVDiff one shift per singular value (svdiff-pytorch's train_svdiff.py: 1e-3); P3S its condition
# branch (the paper's §IV-A: 1e-5).
DEFAULT_LEARNING_RATES = {"dreambooth": 5e-6, "lora": 1e-4, "ti": 5e-4, "custom_diffusion": 1e-5, "svdiff": 1e-3,
                          "p3s": 1e-5}
MAX_CLASS_IMAGES = 1000
# Class-image steps on the built-in `tiny` base model when the request names none (TrainDomain._options): its random
# weights draw noise at any step count, and 100 images at 30 steps were most of the README's laptop flow.
TINY_CLASS_IMAGE_STEPS = 10
# Photos per step on `tiny` when the request gives none: random weights learn nothing from a bigger batch, and the
# laptop flow's 50 steps stay a few seconds (4 photos + 4 class images per step cost about 4x).
TINY_BATCH_SIZE = 1
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# diffusers.optimization.SchedulerType values.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
# CoRe's embedding term (regularizers/core.py): per context token (the paper's), pairwise similarities, or a hinge
# between the identifier and the class word.
CORE_VARIANTS = ("cosine", "pairwise", "hinge")
# P3S's choices, spelled here so that the CLI imports nothing heavy; tests/unit/test_train_options.py checks they
# are the method's own (methods/p3s/consistency.LAYERS, fill.FILLS and fill.REGIONS; the weight schedules' options come from
# models/p3s/weights.py, which imports nothing heavy either).
P3S_CONSISTENCY_LAYERS = ("last", "all")
P3S_FILLS = ("colour", "blur", "inpaint")
P3S_REGIONS = ("outside_mask", "negative_clicks")


OPTIONS: tuple[Option, ...] = (
    Option("steps", int, 400, "Optimiser steps, 1–100000.", low=1, high=MAX_STEPS),
    Option("learning_rate", float, None, "Learning rate, > 0.", low=0.0, high=1.0, low_open=True, flag="--lr",
           default_text=", ".join(f"{m} {lr:.0e}".replace("e-0", "e-") for m, lr in DEFAULT_LEARNING_RATES.items()),
           example="1e-4"),
    Option("batch_size", int, None, "Subject photos per step (as many class images are added with --reg prior). "
           "On the toy world SID + prior leaked 6.9x less background than Case 1 with all 4 photos per step over "
           "400 steps (DreamBooth), and as much with 1 photo per step, even over as many photo passes "
           "(notes/quality-18.md §7, §10); diffusers' DreamBooth scripts train 4 per step too.", low=1,
           default_text=f"the subject's photos, up to {DEFAULT_BATCH_SIZE} ({TINY_BATCH_SIZE} on tiny)", example="4"),
    Option("resolution", int, None, "Training image side in pixels, a multiple of 8.", low=8,
           default_text="the base model's: 512 for SD 1.5, 64 for tiny", example="512"),
    Option("seed", int, 0, "Seed of initialisation, image order, noise and timesteps."),
    Option("train_text_encoder", bool, False, "Also train the text encoder (all of it for dreambooth, LoRA adapters "
           "for lora; not for ti, custom_diffusion or svdiff)."),
    Option("lora_rank", int, 4, "lora: adapter rank, ≥ 1.", low=1, flag="--rank", example="4"),
    Option("lora_alpha", float, None, "lora: alpha; the adapter's scale is alpha / rank.", low=0.0, high=1e4,
           low_open=True, flag="--alpha", default_text="the rank", example="the rank"),
    Option("lora_targets", list, ("to_q", "to_k", "to_v", "to_out.0"),
           "lora: a UNet module name that gets adapters; repeat for several.", flag="--lora-target"),
    Option("initializer_token", str, None, "ti, custom_diffusion, svdiff: the word the new token's embedding "
           "starts from.", default_text="the class word"),
    Option("mixed_precision", str, None, "no, fp16 or bf16 autocast where the device supports it (else fp32, with "
           "a warning).", choices=MIXED_PRECISIONS, default_text="fp16 on CUDA, no elsewhere"),
    Option("gradient_checkpointing", bool, False, "Recompute activations in the backward pass: less memory, "
           "slower."),
    Option("min_snr_gamma", float, None, "Min-SNR loss weighting gamma (Hang et al. 2023), e.g. 5.0.", low=0.0,
           high=1e3, low_open=True, default_text="off", example="5.0"),
    Option("lr_scheduler", str, "constant", f"Learning-rate schedule: {', '.join(LR_SCHEDULERS)}.",
           choices=LR_SCHEDULERS),
    Option("lr_warmup_steps", int, 0, "Warmup steps of the learning-rate schedule, 0–steps.", low=0),
    Option("use_8bit_adam", bool, False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes where it trains)."),
    Option("prior_loss_weight", float, 1.0, "--reg prior: weight of the class images' loss beside the photos' "
           "(0–1000).", low=0.0, high=1e3, flag="--prior-weight", default_text="1.0, DreamBooth's", example="1.0"),
    Option("num_class_images", int, 100, "--reg prior: class images drawn by the base model, 1–1000.", low=1,
           high=MAX_CLASS_IMAGES, example="100 (DreamBooth uses 100–200)", loop=False),
    Option("class_prompt", str, None, "--reg prior: the prompt the class images are drawn from.",
           default_text="\"a photo of a CLASS\"", loop=False),
    Option("checkpoint_every", int, 100, "Write a resumable checkpoint every N steps; 0: only when cancelled.",
           low=0),
    Option("validation_every", int, 0, "Draw validation images every N steps and at the end; 0: never.", low=0),
    Option("validation_prompts", list, None, "Prompt of the validation images; repeat for several.",
           flag="--validation-prompt", default_text="\"a TOKEN CLASS on the beach\""),
    Option("max_grad_norm", float, 1.0, "Gradient clipping norm; 0: no clipping.", low=0.0, high=1e6),
    Option("epochs", int, None, "Passes over the photos instead of --steps (steps = epochs × photos / batch size).",
           low=1, loop=False),
    Option("class_image_steps", int, 30, "--reg prior: sampling steps per class image, 1–200.", low=1, high=200,
           default_text=f"30; {TINY_CLASS_IMAGE_STEPS} on the built-in tiny model", example="30", loop=False),
    Option("class_image_guidance", float, 7.5, "--reg prior: classifier-free guidance of the class images, 1–30.",
           low=1.0, high=30.0, default_text="7.5, diffusers' DreamBooth", example="6", loop=False),
    Option("unmasked_weight", float, 0.1, "--reg mask: loss weight of pixels outside the subject, 0–1 (0: the "
           "subject only).", low=0.0, high=1.0, default_text="0.1, OneTrainer's"),
    Option("spl_weight", float, 1.0, "--reg spl: weight of the semantic preservation loss.", low=0.0, high=1e3,
           default_text="1.0, ClassDiffusion's", example="1.0"),
    Option("core_emb_weight", float, 1.5e-4, "--reg core: weight of CoRe's embedding term.", low=0.0, high=1e3,
           default_text="1.5e-4, the CoRe code's", example="1.5e-4"),
    Option("core_attn_weight", float, 0.05, "--reg core: weight of CoRe's attention term.", low=0.0, high=1e3,
           default_text="0.05, the CoRe code's", example="0.05"),
    Option("core_variant", str, "cosine", "--reg core: cosine (per context token, the paper's), pairwise or hinge.",
           choices=CORE_VARIANTS),
    Option("core_rescale_start", int, 120, "--reg core: first step in which the token's embedding is rescaled to "
           "its previous norm.", low=1, example="120"),
    Option("core_rescale_end", int, 180, "--reg core: last step of the rescaling (inclusive); 0: no rescaling.",
           low=0),
    # P3S-Diffusion (--method p3s; methods/p3s/config.py's P3SConfig, the paper's defaults). Not TrainConfig
    # fields themselves: request.train_config gathers them into TrainConfig.p3s.
    INJECTION_LAMBDA,  # λ of Eq. 7 (models/p3s/weights.py: generate takes it too)
    *WEIGHT_OPTIONS,  # the weight schedule's four (models/p3s/weights.py: generate takes them too)
    Option("p3s_consistency_weight", float, 0.1, "p3s: γ of the attention-consistency loss (Eq. 15), 0–1000; 0 "
           "turns it off.", low=0.0, high=1e3, default_text="0.1, the paper's", example="0.1", loop=False),
    Option("p3s_consistency_layers", str, "last", "p3s: cross-attention layers the consistency loss compares: "
           "last (the paper's) or all.", choices=P3S_CONSISTENCY_LAYERS, loop=False),
    Option("p3s_fill", str, "colour", "p3s: how each photo's removal region (--p3s-region) is filled (Eq. 3): "
           "colour (the complement of the subject's mean colour), blur, or inpaint with --p3s-inpainting-model.",
           choices=P3S_FILLS, loop=False),
    Option("p3s_region", str, "outside_mask", "p3s: which pixels of each photo --p3s-fill removes (Eq. 3): "
           "outside_mask (everything outside its subject mask) or negative_clicks (only the mask service's segment "
           "of its negative clicks, minus the subject: the paper's).", choices=P3S_REGIONS, loop=False),
    Option("p3s_inpainting_model", str, None, "p3s: the Stable Diffusion inpainting pipeline (hub id in the "
           "server's cache, or folder) of --p3s-fill inpaint.", high=500, default_text="none", loop=False),
)
BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
# StartTrainingRequest.encoder: not a TrainingOptions field (nothing is fine-tuned with it), declared here so that
# the CLI's --encoder and its help come from one place.
ENCODER = Option("encoder", str, None, "customcontrast only, and required with it: the CustomContrast encoder (an id "
                 "from `persona-cli encoder list`, trained with `persona-cli encoder train` on the same base model) "
                 "that makes the concept from the subject's photos in one pass, with no fine-tuning step: no "
                 "--steps, --lr, --reg or --parent apply. The concept has no ONNX export: `persona-cli generate` "
                 "draws it in-process, and Triton with torch components (PERSONA_TRITON_COMPONENT_BACKEND=torch).",
                 default_text="none", example="enc_5b0e…", loop=False)
# What a concept records for an option left unset, where that does not depend on the request (the rest are
# filled per request: learning rate per method, resolution per base model, ...).
DEFAULT_OPTIONS: dict[str, Any] = {o.name: list(o.default) if o.type is list else o.default
                                   for o in OPTIONS if o.default is not None}
# Options that are not TrainConfig fields: those that shape the data, not the loop, and p3s's (TrainConfig.p3s).
DATA_OPTIONS = tuple(o.name for o in OPTIONS if not o.loop)


def default(name: str) -> Any:
    """The declared default of option `name` (a tuple for a list option): TrainConfig's field defaults."""
    value = BY_NAME[name].default
    return tuple(value) if isinstance(value, list) else value


def check_options(values: dict) -> None:
    """Checks every declared option in `values` against its bounds and choices (the first bad one raises)."""
    for name, value in values.items():
        if name in BY_NAME:
            BY_NAME[name].check(value)


def check_known(names) -> None:
    unknown = set(names) - set(BY_NAME)
    if unknown:
        raise InvalidArgument(f"unknown option(s) {', '.join(sorted(unknown))}: see TrainingOptions")
