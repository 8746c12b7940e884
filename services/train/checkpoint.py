"""Resumable training state: what the loop writes every `checkpoint_every` steps (atomically) and reads back
when a job resumes, and the fingerprint that keeps a checkpoint to the run that wrote it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from persona.services.runtime.errors import FailedPrecondition

from .config import TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


class TrainingState:
    """Everything a resumed run needs to continue exactly where the interrupted one stopped."""

    def __init__(self, params, optimizer, lr_scheduler, scaler, generator):
        self.params, self.optimizer, self.lr_scheduler = params, optimizer, lr_scheduler
        self.scaler, self.generator = scaler, generator

    def save(self, path: Path, fingerprint: str, step: int, losses: list[float]) -> None:
        """Writes the state to a temporary file and renames it over `path`: a crash leaves the old or the new."""
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        payload = {
            "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "step": step, "losses": list(losses),
            "params": [p.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "generator": self.generator.get_state(),
        }
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def load(self, path: Path, fingerprint: str) -> tuple[int, list[float]]:
        """Restores the state from `path`; returns (step, losses so far)."""
        import torch

        payload = torch.load(path, map_location="cpu", weights_only=False)
        if payload.get("format") != CHECKPOINT_FORMAT or payload.get("fingerprint") != fingerprint:
            raise FailedPrecondition(
                f"checkpoint {path} was written by a run with other settings or images: delete it to start over")
        with torch.no_grad():
            for param, saved in zip(self.params, payload["params"], strict=True):
                param.copy_(saved.to(param.device, param.dtype))
        self.optimizer.load_state_dict(payload["optimizer"])
        self.lr_scheduler.load_state_dict(payload["lr_scheduler"])
        if self.scaler is not None and payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        self.generator.set_state(payload["generator"])
        return payload["step"], list(payload["losses"])


def run_fingerprint(config: TrainConfig, examples: list, n_instance: int, masks: Sequence[Any] = (),
                 parent_embedding: tuple[str, Any] | None = None) -> str:
    """Identifies a run's settings and data (masks, a parent's embedding too), so a checkpoint is only resumed by
    the run that wrote it."""
    from dataclasses import asdict

    settings = {k: v for k, v in asdict(config).items()
                if k not in ("device", "checkpoint_every", "validation_every", "validation_prompts", "validation_steps")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(str(n_instance).encode())
    for image, caption in examples:
        digest.update(caption.encode())
        digest.update(image.convert("RGB").tobytes())
    for mask in masks:
        digest.update(b"-" if mask is None else np.packbits(np.asarray(mask, dtype=bool)).tobytes())
    if parent_embedding is not None:
        digest.update(parent_embedding[0].encode())
        digest.update(parent_embedding[1].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
