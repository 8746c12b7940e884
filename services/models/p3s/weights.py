"""P3S's timestep-based weight scheduler (Eq. 9–10): the factor ε_t that scales the injected features f at step t."""
from __future__ import annotations

from dataclasses import dataclass

# "decreasing": Eq. 10 as printed, ε_t = 1 − α (t/T)^k + β, which falls as t grows: a small weight in the early
# (noisy, large-t) steps where the layout forms, a large one in the late steps where detail forms (the paper's
# choice). "increasing": its mirror, ε_t = 1 − α (1 − t/T)^k + β, the opposite trend of §IV-C's Table III.
# "constant": ε_t = constant, a fixed control weight (Fig. 5).
SCHEDULES = ("decreasing", "increasing", "constant")


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
