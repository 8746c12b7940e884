"""CustomContrast's training losses: CSCL (Eq. 4), MACL (Eq. 5–7), the location loss (Eq. 8) and the total (Eq. 9).

The paper's equation images were lost in the text version; each function's docstring gives the formula read from
the prose and the choices made where the prose leaves one open. All are pure functions of tensors.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from persona.services.runtime.errors import InvalidArgument

# Eq. 9's weights (paper §4.1): λ1 on the contrastive terms, λ2 on the location loss.
CONTRASTIVE_WEIGHT = 1e-2
LOCATION_WEIGHT = 1e-3
# Neither temperature survives in the text; CLIP's 0.07 for both (reading).
CSCL_TEMPERATURE = 0.07
MACL_TEMPERATURE = 0.07
# Real-subject similarities below this are clamped before MACL divides by them.
MIN_APPEARANCE_SIMILARITY = 0.05


def cscl_loss(visual_cls: torch.Tensor, textual_cls: torch.Tensor,
              temperature: float = CSCL_TEMPERATURE) -> torch.Tensor:
    """Crossmodal Semantic Contrastive Learning, Eq. 4: each image's visual CLS token and its own textual CLS token
    are a positive pair, every other sample of the batch a negative (in both directions, CLIP's symmetric InfoNCE):

        s(a, b) = exp(cos(a, b) / τ)
        L = -1/(2B) Σ_i [ log s(v_i, t_i) / Σ_j s(v_i, t_j)  +  log s(t_i, v_i) / Σ_j s(t_i, v_j) ]

    visual_cls, textual_cls: (B, D) with B ≥ 2."""
    _check_batch("visual_cls", visual_cls, "textual_cls", textual_cls)
    logits = _cosine_matrix(visual_cls, textual_cls) / temperature  # [i, j] = cos(v_i, t_j)/τ
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def appearance_similarity(subject_features: torch.Tensor) -> torch.Tensor:
    """S of Eq. 7: S_ij = cos(E(x_i^seg), E(x_j^seg)) over the CLIP image embeddings (B, D) of the segmented
    subjects (any appearance encoder will do: DINOv2, SigLIP)."""
    return _cosine_matrix(subject_features, subject_features)


def macl_loss(anchors: torch.Tensor, positives: torch.Tensor, appearance: torch.Tensor,
              subject_ids: torch.Tensor | None = None, temperature: float = MACL_TEMPERATURE) -> torch.Tensor:
    """Multiscale Appearance Contrastive Learning, Eq. 7, in the P+ space of Eq. 5 (one set of tokens per
    cross-attention layer).

    anchors: (B, L, ...) each sample's tokens at each of L cross-attention layers (the textual Q-Former's text
    tokens; flattened per layer), positives: the same for another view of the same subject (§3.3: "frames different
    from the reference images"), appearance: (B, B) the real subjects' similarity S (`appearance_similarity`),
    subject_ids: (B,) optional; samples of the same subject are left out of each other's negatives.

    Reading of Eq. 7 (its image lost): with c^l_{ik} = cos(a_i^l, a_k^l), the appearance scaling factor of a negative
    is w_ik = 1 / max(S_ik, ε), and

        ℓ_i^l = -log [ exp(c(a_i^l, p_i^l)/τ) / ( exp(c(a_i^l, p_i^l)/τ) + Σ_{k ∈ N(i)} exp(w_ik · c^l_{ik}/τ) ) ]
        L = mean over i and l of ℓ_i^l

    Why this keeps Eq. 6's order: the negatives' logits are pushed down until they balance, w_ik · c_ik ≈ const, i.e.
    c_ik ∝ S_ik, so learned similarities rise and fall with the real subjects' (a pair of look-alike subjects is
    divided by a large S and pulled apart less; a dissimilar pair is amplified and pushed apart harder), while the
    positive term pulls views of one subject together (intra-consistency)."""
    if anchors.shape != positives.shape or anchors.ndim < 2:
        raise InvalidArgument(f"`positives` has shape {tuple(positives.shape)}, `anchors` {tuple(anchors.shape)}: "
                              "both must be (batch, layers, ...) of one shape")
    batch = anchors.shape[0]
    if batch < 2:
        raise InvalidArgument("MACL needs at least 2 samples in a batch: the negatives are the other samples")
    if appearance.shape != (batch, batch):
        raise InvalidArgument(f"`appearance` has shape {tuple(appearance.shape)}; it must be ({batch}, {batch})")
    a = F.normalize(anchors.flatten(2), dim=-1).transpose(0, 1)  # (L, B, D)
    p = F.normalize(positives.flatten(2), dim=-1).transpose(0, 1)
    positive_logits = (a * p).sum(-1) / temperature  # (L, B)
    scale = 1.0 / appearance.clamp(min=MIN_APPEARANCE_SIMILARITY)
    negative_logits = (a @ a.transpose(1, 2)) * scale / temperature  # (L, B, B)
    excluded = torch.eye(batch, dtype=torch.bool, device=anchors.device)
    if subject_ids is not None:
        excluded = excluded | (subject_ids[:, None] == subject_ids[None, :])
    negative_logits = negative_logits.masked_fill(excluded, float("-inf"))
    logits = torch.cat([positive_logits[..., None], negative_logits], dim=-1)  # positive at index 0
    return -(positive_logits - torch.logsumexp(logits, dim=-1)).mean()


def location_loss(attention_map: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Eq. 8, FastComposer's balanced localisation loss: the mean attention on the background minus the mean
    attention on the subject,

        L = mean_b [ Σ A⊙(1−M) / Σ (1−M)  −  Σ A⊙M / Σ M ]

    attention_map: (B, H, W) the global map A (`global_attention_map`, in the model library: inference reads it
    too), mask: (B, H, W) the subject mask M in [0, 1]
    at the same size."""
    if attention_map.shape != mask.shape:
        raise InvalidArgument(f"`mask` has shape {tuple(mask.shape)}, the attention map {tuple(attention_map.shape)}: "
                              "resize the mask to the map (`global_attention_map(size=...)`)")
    a, m = attention_map.flatten(1), mask.flatten(1).to(attention_map.dtype)
    background = (a * (1 - m)).sum(-1) / ((1 - m).sum(-1) + eps)
    subject = (a * m).sum(-1) / (m.sum(-1) + eps)
    return (background - subject).mean()


def total_loss(diffusion: torch.Tensor, cscl: torch.Tensor | None = None, macl: torch.Tensor | None = None,
               location: torch.Tensor | None = None, contrastive_weight: float = CONTRASTIVE_WEIGHT,
               location_weight: float = LOCATION_WEIGHT) -> torch.Tensor:
    """Eq. 9: L = L_diffusion + λ1 (L_CSCL + L_MACL) + λ2 L_location with λ1 = 1e-2, λ2 = 1e-3 (reading: the paper
    names two weights for three terms; the contrastive pair shares λ1 and the location loss takes λ2, FastComposer's
    own weight for it). A term left out (None: an ablation) adds nothing."""
    total = diffusion
    for term, weight in ((cscl, contrastive_weight), (macl, contrastive_weight), (location, location_weight)):
        if term is not None:
            total = total + weight * term
    return total


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _check_batch(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise InvalidArgument(f"`{name_a}` {tuple(a.shape)} and `{name_b}` {tuple(b.shape)} must both be (batch, dim)")
    if a.shape[0] < 2:
        raise InvalidArgument(f"`{name_a}` holds {a.shape[0]} sample: contrastive losses need a batch of at least 2")
