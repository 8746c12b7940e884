"""The text side of injection: the encoder's per-layer word tokens through the text encoder (CustomContrast §3.2,
"the first N_t features of T are respectively fed into the text cross-attention layers after passing through the
text encoder").

The caption carries the placeholder word N_t times where the subject goes (`placeholder_caption`: "a photo of a
<v> <v> <v> <v> ring"); for each cross-attention layer l the placeholder's rows of the token embeddings are replaced
by T^l's N_t tokens, and the text encoder's output is layer l's text states c_t^l (Eq. 3). All layers go through the
text encoder as one batch of B·L_x captions. The rows are swapped by a forward hook on the token-embedding table,
so the text encoder's own forward (position embeddings, causal mask, pooled output) runs unchanged.
"""
from __future__ import annotations

import torch

from persona.services.runtime.errors import InvalidArgument

# The word whose slots the encoder's word tokens fill, in training captions and (standing in for a concept's
# identifier) in the prompts a customcontrast concept is drawn with; one CLIP token ("sks</w>").
PLACEHOLDER = "sks"


def placeholder_caption(caption: str, placeholder: str, num_tokens: int) -> str:
    """"a photo of a <v> ring" → "a photo of a <v> <v> <v> <v> ring" for N_t = 4: one slot per word token."""
    if caption.count(placeholder) != 1:
        raise InvalidArgument(f"`caption` {caption!r} must hold the placeholder {placeholder!r} once, where the "
                              "subject goes, e.g. 'a photo of a <v> dog'")
    return caption.replace(placeholder, " ".join([placeholder] * num_tokens))


def placeholder_mask(input_ids: torch.Tensor, placeholder_id: int, num_tokens: int) -> torch.Tensor:
    """(B, S) bool: where the placeholder's token sits; each caption must hold it exactly `num_tokens` times."""
    mask = input_ids == placeholder_id
    counts = mask.sum(dim=1)
    if not bool((counts == num_tokens).all()):
        raise InvalidArgument(f"`input_ids` hold the placeholder token {placeholder_id} {counts.tolist()} times per "
                              f"caption; the encoder gives {num_tokens} word tokens: build the captions with "
                              "placeholder_caption()")
    return mask


def text_states_per_layer(text_encoder, input_ids: torch.Tensor, mask: torch.Tensor,
                          text_tokens: torch.Tensor) -> list[torch.Tensor]:
    """Layer l's text states c_t^l for every cross-attention layer: input_ids (B, S), mask (B, S) from
    `placeholder_mask`, text_tokens (B, L_x, N_t, d_word) from the MFI encoder → L_x tensors (B, S, d_cross)."""
    batch, layers, count, width = text_tokens.shape
    if mask.shape != input_ids.shape or input_ids.shape[0] != batch:
        raise InvalidArgument(f"`input_ids` {tuple(input_ids.shape)} and their mask {tuple(mask.shape)} must be one "
                              f"(batch, length) shape for the {batch} images the text tokens were made for")
    ids = input_ids[:, None].expand(-1, layers, -1).flatten(0, 1)
    slots = mask[:, None].expand(-1, layers, -1).flatten(0, 1)
    rows = text_tokens.flatten(0, 2)  # (B·L_x·N_t, d_word), in the order slots are visited (row-major)

    def swap(_module, _inputs, embedded):
        embedded = embedded.clone()
        embedded[slots] = rows.to(embedded.dtype)
        return embedded

    handle = text_encoder.get_input_embeddings().register_forward_hook(swap)
    try:
        states = text_encoder(ids)[0]
    finally:
        handle.remove()
    return list(states.unflatten(0, (batch, layers)).unbind(dim=1))


def placeholder_ids(tokenizer, captions: list[str], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions that hold PLACEHOLDER `num_tokens` times each (`placeholder_caption`) → (input_ids (B, S), their
    placeholder mask (B, S)), padded and truncated as diffusers' pipeline tokenises."""
    input_ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    return input_ids, placeholder_mask(input_ids, tokenizer.convert_tokens_to_ids(f"{PLACEHOLDER}</w>"), num_tokens)
