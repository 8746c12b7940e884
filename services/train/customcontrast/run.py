"""A CustomContrast encoder training run over a multi-view dataset: steps of `step.loss_terms`, AdamW on the
encoder and the visual K'/V' only, checkpoints from which a resumed run ends with the weights an uninterrupted one
would have (train's `TrainingState`), progress per step. The train service's job wraps it; nothing here knows gRPC.

Each step's batch is drawn from its own RNG seeded by (seed, step), so a resumed run draws the batches the
interrupted one would have without saving a sampler's state; the noise and timesteps come from the torch generator
the checkpoint keeps.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from persona.services.models.customcontrast.build import CustomContrastModels
from persona.services.runtime.errors import InvalidArgument

from ..checkpoint import CHECKPOINT_FILE, TrainingState
from .multiview import MultiViewDataset, sample_batch
from .step import LossSwitches, load_batch, loss_terms

# Paper §4.1: learning rate 3e-5 (200k iterations on 6 A100s).
LEARNING_RATE = 3e-5


@dataclass(frozen=True)
class EncoderTrainingOptions:
    steps: int = 1000
    batch_size: int = 4  # distinct subjects per step; at most the dataset's subject count
    learning_rate: float = LEARNING_RATE
    resolution: int = 512  # the VAE's input side (the base model's native resolution)
    seed: int = 0
    checkpoint_every: int = 100
    switches: LossSwitches = field(default_factory=LossSwitches)

    def check(self, dataset: MultiViewDataset) -> None:
        for name in ("steps", "batch_size", "resolution", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"`{name}` is {getattr(self, name)}: it must be at least 1")
        if not self.learning_rate > 0:
            raise InvalidArgument(f"`learning_rate` is {self.learning_rate}: it must be positive, e.g. 3e-5")
        if not 2 <= self.batch_size <= len(dataset.subjects):
            raise InvalidArgument(f"`batch_size` {self.batch_size} must be between 2 and the dataset's "
                                  f"{len(dataset.subjects)} subjects: each sample of a batch is a different subject")


@dataclass
class EncoderTrainingResult:
    steps: int  # steps done, resumed ones included
    losses: list[dict[str, float]]  # per step, each term of `loss_terms` (steps before a resume: the total only)
    stopped: bool  # True when `should_stop` ended the run early (its checkpoint is written)


def run_fingerprint(models: CustomContrastModels, dataset: MultiViewDataset, options: EncoderTrainingOptions) -> str:
    """What a checkpoint must match to be resumed: the options (but the step count and checkpoint interval: a run
    may be resumed to go further), the encoder's shape and the dataset's files."""
    kept = {k: v for k, v in asdict(options).items() if k not in ("steps", "checkpoint_every")}
    record = {"options": kept, "encoder": asdict(models.encoder.config),
              "views": [[s.name, [str(v.image) for v in s.views]] for s in dataset.subjects]}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def train_encoder(models: CustomContrastModels, dataset: MultiViewDataset, options: EncoderTrainingOptions,
                  work_dir: str | Path, on_step: Callable[[int, dict[str, float]], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> EncoderTrainingResult:
    """Trains `models.encoder` and `models.processors` in place; resumes from `work_dir`'s checkpoint when there is
    one of the same run."""
    options.check(dataset)
    options.switches.check(models.encoder)
    params = models.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=options.learning_rate)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    generator = torch.Generator().manual_seed(options.seed)
    state = TrainingState(params, optimizer, lr_scheduler, None, generator)
    checkpoint = Path(work_dir) / CHECKPOINT_FILE
    fingerprint = run_fingerprint(models, dataset, options)
    start, totals = (state.load(checkpoint, fingerprint) if checkpoint.is_file() else (0, []))
    losses: list[dict[str, float]] = [{"total": value} for value in totals]
    models.encoder.train()
    # The image encoder's own input side (32 for the built-in tiny, 224 for ViT-L/14, whatever a local folder's config
    # says): a CLIP fed another size fails on its position embeddings. Concepts read it the same way.
    clip_size = models.image_encoder.config.image_size

    for step in range(start, options.steps):
        rng = random.Random(f"{options.seed}:{step}")
        samples = [(reference, positive, dataset.subjects[i].class_name)
                   for reference, positive, i in sample_batch(dataset, options.batch_size, rng)]
        batch = load_batch(samples, models.tokenizer, models.encoder.config.num_text_tokens, options.resolution,
                           clip_size)
        terms = loss_terms(models, batch, options.switches, generator)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        lr_scheduler.step()
        losses.append({name: float(value.detach()) for name, value in terms.items()})
        done = step + 1
        if on_step is not None:
            on_step(done, losses[-1])
        stopping = should_stop is not None and should_stop()
        if done % options.checkpoint_every == 0 or done == options.steps or stopping:
            state.save(checkpoint, fingerprint, done, [entry["total"] for entry in losses])
        if stopping and done < options.steps:
            return EncoderTrainingResult(done, losses, stopped=True)
    return EncoderTrainingResult(options.steps, losses, stopped=False)
