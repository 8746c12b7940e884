"""Reporting a training job: its PROGRESS events (step, loss terms, it/s, ETA, validation images) and the seconds
each stage took."""
from __future__ import annotations

import time

from persona.services.runtime.jobs import JobContext

# Progress events are written at most this often (plus the first and last step): a fast GPU run
# should not spend its time in SQLite.
EVENT_INTERVAL_S = 0.5


class Stopwatch:
    """Seconds per stage of one job, in the order they ran: the job result's `stage_seconds`, which persona-cli
    prints as where the time went."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, stage: str) -> None:
        """Charges the time since the previous lap (or the start) to `stage`."""
        now = time.monotonic()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 3)
        self._last = now


class TrainingProgress:
    """Turns loop callbacks into job PROGRESS events (common.proto's JobProgress): step, each loss term, it/s, ETA,
    validation images."""

    def __init__(self, ctx: JobContext, steps: int, stage: str = "train"):
        self.ctx, self.steps, self.stage = ctx, steps, stage
        self.started = time.perf_counter()
        self.first_step: int | None = None
        self.last_event = 0.0

    def step(self, step: int, losses: dict, it_per_s: float) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.started = step, now - 1.0 / max(it_per_s, 1e-9)
        if step not in (self.first_step, self.steps) and now - self.last_event < EVENT_INTERVAL_S:
            return
        self.last_event = now
        rate = (step - self.first_step + 1) / max(now - self.started, 1e-9)
        eta = (self.steps - step) / rate
        terms = {k: round(v, 6) for k, v in losses.items()}
        # `losses` fills JobProgress.losses; the same terms at the top level are for clients that read the Struct.
        self.ctx.progress(step / self.steps, f"step {step}/{self.steps} loss {losses['loss']:.4f}",
                          stage=self.stage, step=step, steps=self.steps, it_per_s=round(rate, 3), eta_s=round(eta, 1),
                          losses=terms, **terms)

    def validation(self, step: int, artifact_ids: list[str]) -> None:
        self.ctx.progress(step / self.steps, f"validation images at step {step}", stage="validation", step=step,
                          steps=self.steps, validation_image_ids=artifact_ids)
