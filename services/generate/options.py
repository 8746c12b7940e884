"""Every setting of a Generate request, declared once (runtime/options.py's Option): name, type, default, bounds and
help. The servicer maps GenerateRequest's fields by these names, the domain checks each against its bounds, and
`persona-cli generate` makes its options from them (client/declared_options.py); tests/unit/test_generate_options.py
checks the table, the proto and the CLI agree. Adding a setting is one `Option(...)` here plus its GenerateRequest
field (and the sampling code that uses it)."""
from __future__ import annotations

from persona.services.models.p3s.weights import drawing_options
from persona.services.runtime.options import Option

from . import sampling

MAX_IMAGES_PER_PROMPT = 16
# Seeds of one request run from seed to seed + this (the most images any setting allows).
MAX_IMAGES_PER_REQUEST = 64
MAX_PROMPT_CHARS = 1000

SETTINGS: tuple[Option, ...] = (
    Option("images_per_prompt", int, 1, "Images per prompt, 1–16.", low=1, high=MAX_IMAGES_PER_PROMPT,
           flag="--num-images", short="-n"),
    Option("seed", int, 0, "Seed of the first image; image k uses seed + k.", low=0,
           high=2**63 - 1 - MAX_IMAGES_PER_REQUEST),
    Option("steps", int, sampling.DEFAULT_STEPS, f"Denoising steps, 1–{sampling.MAX_STEPS}.", low=1,
           high=sampling.MAX_STEPS),
    Option("guidance_scale", float, sampling.DEFAULT_GUIDANCE, "Classifier-free guidance scale; ≤ 1 turns guidance "
           "off.", low=0.0, high=50.0, flag="--guidance", example="7.5"),
    Option("scheduler", str, sampling.DEFAULT_SCHEDULER, "dpmpp (DPM-Solver++ 2M, good in 20–25 steps), ddim or "
           "euler.", choices=tuple(sampling.SCHEDULERS)),
    Option("negative_prompt", str, "", "Negative prompt, for every prompt.", high=MAX_PROMPT_CHARS,
           flag="--negative"),
    # Multiples of 8 up to sampling.MAX_SIDE, checked with the model's native size as the default (domain._side).
    Option("width", int, None, "Pixels, a multiple of 8.", default_text="the concept's native size"),
    Option("height", int, None, "Pixels, a multiple of 8.", default_text="the concept's native size"),
    # A p3s concept's drawing (models/p3s/condition.py); set for any other model they are refused by name.
    *drawing_options(),
    Option("p3s_reference", int, None, "p3s concepts only: which of the subject's photos (0 = the first uploaded) "
           "conditions the image.", low=0, high=1000, default_text="0, the first photo"),
)
# The settings that only a p3s concept takes.
P3S_SETTINGS = tuple(option.name for option in SETTINGS if option.name.startswith("p3s_"))
BY_NAME: dict[str, Option] = {option.name: option for option in SETTINGS}
