"""P3S's timestep-based weight scheduler (Eq. 9–10): the factor ε_t that scales the injected features f at step t;
and λ of Eq. 7, the share of f added to the values, declared here beside it as the other strength knob a request
may set."""
from __future__ import annotations

from dataclasses import dataclass, replace

from persona.services.runtime.options import Option

# "decreasing": Eq. 10 as printed, ε_t = 1 − α (t/T)^k + β, which falls as t grows: a small weight in the early
# (noisy, large-t) steps where the layout forms, a large one in the late steps where detail forms (the paper's
# choice). "increasing": its mirror, ε_t = 1 − α (1 − t/T)^k + β, the opposite trend of §IV-C's Table III.
# "constant": ε_t = constant, a fixed control weight (Fig. 5).
SCHEDULES = ("decreasing", "increasing", "constant")

# The schedule's knobs as request options, declared once: train/options.py takes them as they are (the paper's
# defaults); generate/options.py as `drawing_options()` (default: what the concept trained with).
WEIGHT_OPTIONS: tuple[Option, ...] = (
    Option("p3s_weight_schedule", str, "decreasing", "p3s: the timestep weight ε_t of the injected features (Eq. "
           "10): decreasing (1 − α (t/T)^k + β, the paper's), increasing (its mirror) or constant (1).",
           choices=SCHEDULES, loop=False),
    Option("p3s_weight_alpha", float, 0.5, "p3s: α of Eq. 10.", low=-1e3, high=1e3, default_text="0.5, the paper's",
           example="0.5", loop=False),
    Option("p3s_weight_beta", float, 0.2, "p3s: β of Eq. 10.", low=-1e3, high=1e3, default_text="0.2, the paper's",
           example="0.2", loop=False),
    Option("p3s_weight_k", float, 2.0, "p3s: the exponent k of Eq. 10, > 0.", low=0.0, high=1e3, low_open=True,
           default_text="2, the paper's", example="2", loop=False),
)
# λ of Eq. 7 (V' = W^V[z + λf, f]): not part of ε_t, but like it a strength of the injected features that a draw may
# change, so declared once here for train (the paper's default) and generate (default: the concept's).
INJECTION_LAMBDA = Option("p3s_injection_lambda", float, 0.2, "p3s: λ of Eq. 7, the share of the copy's features "
                          "added to each self-attention's values, 0–10.", low=0.0, high=10.0,
                          default_text="0.2, the paper's", example="0.2", loop=False)
# Option name → TimestepWeights field.
WEIGHT_FIELDS = {"p3s_weight_schedule": "schedule", "p3s_weight_alpha": "alpha", "p3s_weight_beta": "beta",
                 "p3s_weight_k": "k"}


@dataclass(frozen=True)
class TimestepWeights:
    """ε_t for a noise schedule of `num_train_timesteps` (T) steps; the paper's α = 0.5, β = 0.2, k = 2."""

    schedule: str = "decreasing"
    alpha: float = 0.5
    beta: float = 0.2
    k: float = 2.0
    # The weight of the "constant" schedule.
    constant: float = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        from persona.services.runtime.errors import InvalidArgument

        if self.schedule not in SCHEDULES:
            raise InvalidArgument(f"`p3s_weight_schedule` is {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.num_train_timesteps < 1:
            raise InvalidArgument(f"`num_train_timesteps` is {self.num_train_timesteps}: use a positive count")
        if self.k <= 0:
            raise InvalidArgument(f"`p3s_weight_k` is {self.k}: use an exponent > 0, e.g. 2")

    def __call__(self, timesteps):
        """ε_t for `timesteps` (a tensor of any shape, or a number), as float32 of the same shape."""
        import torch

        t = torch.as_tensor(timesteps, dtype=torch.float32) / self.num_train_timesteps
        if self.schedule == "constant":
            return torch.full_like(t, self.constant)
        progress = t if self.schedule == "decreasing" else 1.0 - t
        return 1.0 - self.alpha * progress ** self.k + self.beta


def drawing_options() -> tuple[Option, ...]:
    """WEIGHT_OPTIONS and INJECTION_LAMBDA for a Generate request: unset (None) means the concept's trained value."""
    return tuple(replace(o, default=None, default_text="the concept's, as trained",
                         help=o.help.replace("p3s:", "p3s concepts only:", 1))
                 for o in (*WEIGHT_OPTIONS, INJECTION_LAMBDA))


def drawing_lambda(settings: dict, override: float | None = None) -> float:
    """λ to draw with: `override` when set, else the concept's trained `injection_lambda` (else the paper's 0.2)."""
    if override is not None:
        return float(override)
    trained = settings.get("injection_lambda")
    return float(INJECTION_LAMBDA.default if trained is None else trained)


def trained_weights(settings: dict) -> TimestepWeights:
    """The ε_t schedule a concept trained with, from its saved settings (P3SConfig's fields; those missing take
    TimestepWeights' defaults, the paper's)."""
    fields = ("weight_schedule", "weight_alpha", "weight_beta", "weight_k", "weight_constant", "num_train_timesteps")
    values = {name.removeprefix("weight_"): settings[name] for name in fields if settings.get(name) is not None}
    return TimestepWeights(**values)


def drawing_weights(settings: dict, overrides: dict | None = None) -> TimestepWeights:
    """The schedule to draw with: the trained one (`trained_weights`) with each option of `overrides`
    ({"p3s_weight_alpha": 0.0, ...}; None values: unset) replacing its field. Only the schedule's shape changes:
    T and the constant stay the concept's."""
    changed = {WEIGHT_FIELDS[name]: value for name, value in (overrides or {}).items()
               if value is not None and value != ""}
    return replace(trained_weights(settings), **changed)
