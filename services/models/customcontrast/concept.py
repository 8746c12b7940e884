"""A "customcontrast" concept on disk and how it attaches to a UNet: what drawing a subject with a trained encoder
needs, computed once from its photos (no fine-tuning; train's services/train/customcontrast/concept.py writes it).

    CONCEPT WEIGHTS/
      customcontrast_tokens.safetensors     timesteps (R,), image_tokens (R, L_x, N_img, d_cross), text_tokens
                                            (R, L_x, N_t, d_word) unless the encoder has no textual Q-Former; its
                                            metadata: format, λ, N_t, the encoder id and the base model's hash
      customcontrast_visual_kv.safetensors  the encoder's visual K'/V' (Eq. 3's W'_k, W'_v), as files.py keeps them:
                                            the same bytes for every concept of one encoder, so the content-addressed
                                            artifact store keeps them once

The table has R rows (default 50) at timesteps spread evenly over the base model's training schedule; a sampler's
step at timestep t uses the nearest row (`nearest_rows`), so any scheduler and step count draws from one table.
In a prompt the concept's identifier stands where the subject goes; it becomes N_t placeholder slots
(`slot_prompt`), which the word tokens fill (conditioning.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    import torch

    from .build import SubjectTokens

# torch loads with the first concept, not when generate's modules are imported (its server starts without it).

TOKENS_FILE = "customcontrast_tokens.safetensors"
VISUAL_KV_FILE = "customcontrast_visual_kv.safetensors"
FORMAT = "persona.customcontrast"
FORMAT_VERSION = 1
DEFAULT_ROWS = 50  # the table's rows: one per step of a 50-step DDIM schedule over 1000 training timesteps


@dataclass(frozen=True)
class ConceptTokens:
    """What a customcontrast concept holds: the subject's token table, the encoder's visual K'/V' (the processors'
    state dict), λ, N_t, the identifier that stands for the subject in prompts, and where they came from."""

    table: SubjectTokens
    visual_kv: dict[str, torch.Tensor]
    scale: float
    num_text_tokens: int
    identifier: str
    encoder_id: str
    base_model_sha256: str


def table_timesteps(num_train_timesteps: int = 1000, rows: int = DEFAULT_ROWS) -> torch.Tensor:
    """`rows` timesteps spread evenly over [0, T−1] (int64, ascending, distinct)."""
    import torch

    if not 1 <= rows <= num_train_timesteps:
        raise InvalidArgument(f"`rows` is {rows}: between 1 and the schedule's {num_train_timesteps} timesteps")
    return torch.linspace(0, num_train_timesteps - 1, rows).round().long().unique()


def save_concept(folder: str | Path, tokens: ConceptTokens) -> list[Path]:
    """Writes both files into `folder` (created); returns their paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = {"timesteps": tokens.table.timesteps.cpu(), "image_tokens": tokens.table.image_tokens.cpu()}
    if tokens.table.text_tokens is not None:
        table["text_tokens"] = tokens.table.text_tokens.cpu()
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "scale": repr(float(tokens.scale)),
                "num_text_tokens": str(tokens.num_text_tokens), "identifier": tokens.identifier,
                "encoder": tokens.encoder_id,
                "base_model_sha256": tokens.base_model_sha256}
    save_file({k: v.detach().contiguous().float() for k, v in table.items()}, str(folder / TOKENS_FILE),
              metadata=metadata)
    save_file({k: v.detach().contiguous().cpu() for k, v in tokens.visual_kv.items()}, str(folder / VISUAL_KV_FILE))
    return [folder / TOKENS_FILE, folder / VISUAL_KV_FILE]


def load_concept(folder: str | Path) -> ConceptTokens:
    """The concept in `folder` (as `save_concept` wrote it); FAILED_PRECONDITION naming what is wrong."""
    from safetensors import safe_open

    from .build import SubjectTokens

    folder = Path(folder)
    paths = folder / TOKENS_FILE, folder / VISUAL_KV_FILE
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FailedPrecondition(f"the customcontrast concept in {folder} lacks {', '.join(missing)}: make it again "
                                 "with `persona-cli train SUBJECT --method customcontrast --encoder ENCODER`")
    with safe_open(str(paths[0]), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise FailedPrecondition(f"{paths[0]} is not a customcontrast concept this persona reads (format "
                                     f"{meta.get('format')!r} {meta.get('format_version')!r}): make it again")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(paths[1]), framework="pt") as f:
        visual_kv = {k: f.get_tensor(k) for k in f.keys()}
    table = SubjectTokens(tensors["timesteps"], tensors.get("text_tokens"), tensors["image_tokens"])
    return ConceptTokens(table, visual_kv, float(meta["scale"]), int(meta["num_text_tokens"]), meta["identifier"],
                         meta.get("encoder", ""), meta.get("base_model_sha256", ""))


def read_prompt_slots(tokens_file: str | Path) -> tuple[str, int]:
    """(identifier, N_t) of a concept's tokens file, from its metadata alone (no tensor read): what a caller that
    tokenises prompts for the concept needs (`slot_prompt`). FAILED_PRECONDITION when it is not one."""
    from safetensors import safe_open

    with safe_open(str(tokens_file), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or "identifier" not in meta or "num_text_tokens" not in meta:
        raise FailedPrecondition(f"{tokens_file} is not a customcontrast concept this persona reads: make it again")
    return meta["identifier"], int(meta["num_text_tokens"])


def nearest_rows(table: SubjectTokens, timesteps) -> SubjectTokens:
    """A table for a sampler's `timesteps`: for each, the stored row of the nearest timestep (ties: the earlier
    row). Its timesteps are `timesteps` as integers (int(t), what `SubjectTokens.at` looks up)."""
    import torch

    from .build import SubjectTokens

    wanted = torch.as_tensor(timesteps).detach().cpu().to(torch.float64).flatten()
    stored = table.timesteps.to(torch.float64)
    rows = (wanted[:, None] - stored[None, :]).abs().argmin(dim=1)
    text = None if table.text_tokens is None else table.text_tokens[rows]
    return SubjectTokens(wanted.long(), text, table.image_tokens[rows])


def slot_prompt(prompt: str, identifier: str, num_tokens: int, field: str = "prompts") -> str:
    """The prompt with the concept's identifier (once, as a word) replaced by `num_tokens` placeholder slots:
    "a sks dog on the beach" → "a sks sks dog on the beach" for N_t = 2."""
    from .text import PLACEHOLDER, placeholder_caption

    pattern = re.compile(rf"(?<![\w<]){re.escape(identifier)}(?![\w>])")
    found = len(pattern.findall(prompt))
    if found != 1:
        raise InvalidArgument(f"`{field}` {prompt!r} names the concept's identifier {identifier!r} {found} times: a "
                              f"customcontrast concept draws its subject where the identifier stands, so name it once, "
                              f"e.g. 'a {identifier} dog on the beach'")
    if identifier != PLACEHOLDER and re.search(rf"(?<!\w){PLACEHOLDER}(?!\w)", prompt):
        raise InvalidArgument(f"`{field}` {prompt!r} holds the word {PLACEHOLDER!r}, which a customcontrast concept "
                              "keeps for its subject's slots: leave it out")
    return placeholder_caption(pattern.sub(PLACEHOLDER, prompt), PLACEHOLDER, num_tokens)


class AttachedTokens:
    """A concept's visual K'/V' installed on a diffusers UNet (Eq. 3's parallel cross-attention); `remove` puts the
    UNet's own processors back, so the modules are the plain base model again."""

    def __init__(self, unet, tokens: ConceptTokens):
        from .attention import install_decoupled_processors

        self.unet = unet
        self._own = dict(unet.attn_processors)
        self.injection, processors = install_decoupled_processors(unet, tokens.scale)
        self.processors = processors
        try:
            processors.load_state_dict(tokens.visual_kv)
        except RuntimeError as error:
            self.remove()
            raise FailedPrecondition(f"the concept's visual K'/V' do not fit this UNet ({str(error)[:200]}): the "
                                     "concept was made on another base model; make it again") from None
        processors.to(device=unet.device, dtype=unet.dtype)  # the file's K'/V' onto the UNet's device and precision

    def remove(self) -> None:
        self.unet.set_attn_processor(self._own)
