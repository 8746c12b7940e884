"""TrainConfig: every knob of one training run, with its default, and `validate()` for bad values and conflicts.

The loop (loop.py) takes one; the train service builds it from a request's options. A field that is a request
option takes its default and its bounds from the option's declaration (options.py); the checks here are the
conflicts between fields and the fields no request sets (method, token, device, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

from persona.services.runtime.errors import InvalidArgument

from .methods import METHODS
from .methods.p3s.config import P3SConfig
from .options import DEFAULT_LEARNING_RATES, LR_SCHEDULERS, MIXED_PRECISIONS, OPTIONS, check_options, default
from .regularizers import REGULARIZER_PLUGINS

TRAINED_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run, with its default. `validate()` rejects bad values and conflicts.

    What each option field means, its default and its bounds: options.py (the field of the same name).
    """

    # Not request options: the method, the placeholder token and the subject's class noun (SPL's anchor
    # phrase "a photo of a <class>"), regulariser plugins beyond prior preservation (regularizers.REGULARIZER_PLUGINS)
    # and the device ("cpu", "cuda", "cuda:1", ...; None: cuda when available, else cpu).
    method: str = "lora"
    token: str = "sks"
    class_name: str = "dog"
    regularizers: tuple[str, ...] = ()
    device: str | None = None
    # dtype the trained weights are kept in: "fp32", or "bf16" (half the memory of what trains, coarser updates)
    # where the device has it (else a warning, fp32). Frozen weights use the compute dtype whatever this says.
    trained_dtype: str = "fp32"
    # AdamW weight decay (diffusers' default) and the DDIM steps of validation images.
    adam_weight_decay: float = 1e-2
    validation_steps: int = 20
    # The p3s method's hyper-parameters, the paper's defaults (methods/p3s/config.py); not request options yet.
    p3s: P3SConfig = P3SConfig()

    # Request options (options.py). None where the service decides per request; the loop's fallback is noted.
    steps: int = default("steps")
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATES[method]
    batch_size: int = 1  # the service's default: the subject's photos, up to DEFAULT_BATCH_SIZE (options.py)
    resolution: int | None = None  # None: the base model's native resolution
    seed: int = default("seed")
    train_text_encoder: bool = default("train_text_encoder")
    lora_rank: int = default("lora_rank")
    lora_alpha: float = default("lora_rank")  # the service's default: the rank
    lora_targets: tuple[str, ...] = default("lora_targets")
    initializer_token: str = "dog"  # the service's default: the class word
    mixed_precision: str = "no"  # the service's default: fp16 on CUDA, no elsewhere
    gradient_checkpointing: bool = default("gradient_checkpointing")
    min_snr_gamma: float | None = default("min_snr_gamma")
    lr_scheduler: str = default("lr_scheduler")
    lr_warmup_steps: int = default("lr_warmup_steps")
    use_8bit_adam: bool = default("use_8bit_adam")
    prior_loss_weight: float = default("prior_loss_weight")
    unmasked_weight: float = default("unmasked_weight")
    spl_weight: float = default("spl_weight")
    core_emb_weight: float = default("core_emb_weight")
    core_attn_weight: float = default("core_attn_weight")
    core_rescale_start: int = default("core_rescale_start")
    core_rescale_end: int = default("core_rescale_end")
    core_variant: str = default("core_variant")
    max_grad_norm: float = default("max_grad_norm")
    # Checkpoints need train(checkpoint_dir=...); validation images need train(on_validation=...).
    checkpoint_every: int = default("checkpoint_every")
    validation_every: int = default("validation_every")
    validation_prompts: tuple[str, ...] = ()

    @property
    def lr(self) -> float:
        """The learning rate in effect: learning_rate, or the method's default."""
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LEARNING_RATES.get(self.method, 1e-4)

    def validate(self) -> "TrainConfig":
        """Raises InvalidArgument naming the field (both fields for a conflict); returns self."""
        if self.method not in METHODS:
            raise InvalidArgument(f"`method` is {self.method!r}: use one of {', '.join(METHODS)}")
        # Each option's own bounds and choices, as declared.
        check_options({o.name: getattr(self, o.name) for o in OPTIONS if o.loop})
        if self.resolution is not None and self.resolution % 8:
            raise InvalidArgument(f"`resolution` is {self.resolution}: use a multiple of 8, e.g. 512")
        if not self.lora_targets:
            raise InvalidArgument("`lora_targets` is empty: name modules, e.g. to_q to_k to_v to_out.0")
        if self.train_text_encoder and self.method not in ("dreambooth", "lora"):
            raise InvalidArgument(
                f"`train_text_encoder` is for `method` dreambooth or lora, not {self.method!r}: "
                "turn train_text_encoder off or change the method")
        if self.method == "p3s":
            self.p3s.validate()
        if self.method == "ti" and not self.token.strip():
            raise InvalidArgument("`token` is empty: pass the placeholder word, e.g. sks")
        if self.method == "ti" and not self.initializer_token.strip():
            raise InvalidArgument("`initializer_token` is empty: pass the class word, e.g. dog")
        if self.mixed_precision not in MIXED_PRECISIONS:  # None passes check_options
            raise InvalidArgument(f"`mixed_precision` is {self.mixed_precision!r}: use one of no, fp16, bf16")
        if self.trained_dtype not in TRAINED_DTYPES:
            raise InvalidArgument(f"`trained_dtype` is {self.trained_dtype!r}: use one of {', '.join(TRAINED_DTYPES)}")
        if self.trained_dtype == "bf16" and self.mixed_precision != "bf16":
            raise InvalidArgument(f"`trained_dtype` bf16 needs `mixed_precision` bf16, not {self.mixed_precision!r}: "
                                  "set mixed_precision bf16, or keep trained_dtype fp32")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise InvalidArgument(f"`lr_scheduler` is {self.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}")
        if self.lr_warmup_steps > self.steps:
            raise InvalidArgument(f"`lr_warmup_steps` is {self.lr_warmup_steps}: use 0–`steps` ({self.steps})")
        unknown = [r for r in self.regularizers if r not in REGULARIZER_PLUGINS]
        if unknown:
            raise InvalidArgument(f"`regularizers` has {', '.join(unknown)}: use some of {', '.join(REGULARIZER_PLUGINS)}")
        if self.core_rescale_end and self.core_rescale_end < self.core_rescale_start:
            raise InvalidArgument(
                f"`core_rescale_end` ({self.core_rescale_end}) is before `core_rescale_start` "
                f"({self.core_rescale_start}): use an end at or after the start, or 0 to turn rescaling off")
        if self.validation_every and not self.validation_prompts:
            raise InvalidArgument("`validation_every` is set but `validation_prompts` is empty: give a prompt, "
                                  "e.g. 'a sks dog on the beach'")
        if not 1 <= self.validation_steps <= 200:
            raise InvalidArgument(f"`validation_steps` is {self.validation_steps}: use 1–200")
        if self.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise InvalidArgument(
                    "`use_8bit_adam` needs bitsandbytes, which is not installed: pip install bitsandbytes, "
                    "or turn use_8bit_adam off") from None
        return self
