"""CoRe, context regularisation (Wu et al., AAAI 2025, arXiv:2408.15914): the words around a new token `S*` should
mean what they mean around its class word, and draw the UNet's attention as they do there; that holds only if
`S*`'s text embedding sits where the encoder expects a word of that kind, so the regularisers train the embedding
to fit in. No image is needed: each step draws one regularisation prompt ("the {} on the beach") and compares it
with `S*` (the concept prompt) and with the class word (the reference prompt, encoded without gradient).

    L_emb  = 1/N Σ_{i∈C} [1 − cos(E(v_i), E(v'_i))]                          (the embedding term, `core_emb`)
    L_attn = 1/L Σ_l 1/N Σ_{i∈C} [μ(M_{l,i}) − μ(M'_{l,i})]²                  (the attention term, `core_attn`)
    v_s ← v_s / ‖v_s‖ · ‖v_{s−1}‖   for core_rescale_start ≤ s ≤ core_rescale_end (after the optimiser step)

E(·): the text encoder's output vector (last hidden state, what the UNet is conditioned on) at a position; v_i /
v'_i: position i of the concept / reference prompt; C: the context positions (N of them); M_{l,i}: context token
i's cross-attention map in the l-th of the UNet's L cross-attention layers (16 on SD-1.5/2.1), averaged over
heads; μ: the mean of a map over its pixels; v_s: `S*`'s input embedding row after optimiser step s.

Readings chosen where the thesis text (../shared/papers/002, extracted from a PDF) is ambiguous or differs from the
CoRe reference code (github.com/pangy9/CoRe, `train.py`/`utils.py`; read, not copied):

- Prompts. `S*` stands in the class word's place ("the sks on the beach" / "the dog on the beach"), as in the paper
  and the reference (persona's captions say "sks dog", but CoRe's concept prompt has `S*` alone).
- Context positions C: every real token except BOS, the identifier (resp. the class word) and padding; the EOS
  token is kept. The CLIP text encoder is causal, so BOS and the words before `S*` get identical outputs under both
  prompts: they add 0 to L_emb and only scale the mean (the reference keeps BOS). EOS is kept because it is where
  the whole prompt is summarised, because a template ending in `{}` would otherwise have no context after `S*` to
  regularise, and because the reference keeps it too.
- Alignment. Positions before `S*` are the same in both prompts; positions after it are matched in order, shifted
  by the difference in token count when the class word is several tokens ("teddy bear") — the reference does the
  same; `prompt_pair` checks that the aligned tokens are equal.
- L_emb's cosine is per position over the hidden dimension, as the equation writes it. (The reference takes
  `cosine_similarity(..., dim=1)` of (1, N, D) tensors, i.e. across tokens per hidden channel; its weight 1.5e-4 is
  kept here.)
- L_attn: the thesis says both "the squared difference between the mean values of attention maps" (the equation)
  and "16 pairs of attention maps ... averaged and their mean squared error"; the reference reduces each map to its
  mean over heads and pixels per layer, squares the difference per context token, averages over tokens and then
  over layers. Persona follows the reference, whose weight 0.05 was tuned on that quantity: μ is the map's mean
  (the share of attention the token gets), not a pixel-by-pixel MSE. The maps come from one UNet forward per prompt
  on one noisy latent of the step (the first of the batch, detached, at its timestep); the reference sums the term
  over its 6 latents, so its effective weight per latent is 6 × 0.05.
- Rescaling: as the thesis writes it, every step s in the inclusive window is rescaled to the norm
  after step s−1 (so from the first rescale on, the norm stays at its value from before the window). The reference
  records the norm at step `start` and rescales from `start + 1`: one step later, otherwise the same.

Variants (`core_variant`, of the embedding term; the thesis describes them without equations):

- "cosine" — L_emb above (the default, CoRe's).
- "pairwise" — L_pair = mean over pairs i ≠ j in C of |cos(E(v_i), E(v_j)) − cos(E(v'_i), E(v'_j))|: the context
  tokens' pairwise similarity matrices under the two prompts, compared entry by entry.
- "hinge" — L_hinge = max(0, 1 − cos(E(v_k), E(v'_k)) − m) at the identifier's own position k (its last token) and
  the class word's (its last token): `S*` may drift from its class by a margin m (HINGE_MARGIN, 0.1: free while cos
  ≥ 0.9; the thesis gives no value), then is pulled back.

Defaults (TrainConfig; all from the reference's `bash_script/train.sh`, stage 1, SD-2.1-base): core_emb_weight
1.5e-4, core_attn_weight 0.05, rescale window 120–180; the reference trains 300 steps at learning rate 5e-3
(constant, batch 6) — pass `learning_rate 5e-3 steps 300` with method `ti` to match it; persona's ti defaults stay.
A weight of 0 skips its term (and, for the attention term, both UNet passes).

Two-stage strategy: CoRe's stage 1 is this regulariser with method `ti`; stage 2 fine-tunes the UNet with the
learned embedding frozen (reference: lr 2e-6, 1 000 steps, batch 4, DreamBooth loss). Persona does not chain the two
yet: stage 2 is a following dreambooth (or lora) run on a base model into which the stage-1 embedding was loaded,
without `train_text_encoder` — not implemented here.

The terms only have something to move when the text side trains (`ti`, `custom_diffusion`, or `train_text_encoder`);
`prepare` refuses core otherwise. With methods whose UNet weights train too (dreambooth, lora and custom_diffusion's
K/V), the attention term's gradient also reaches those weights, as any loss term's does; CoRe's stage 1 trains the
embedding alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from persona.services.runtime.errors import InvalidArgument
from persona.services.subjects.domain import LIVE_CLASSES

from ..options import CORE_VARIANTS
from .base import Regularizer, RegularizerInputs

# The hinge variant's margin on 1 − cos: no penalty while the identifier's output keeps cos ≥ 0.9 to its class's.
HINGE_MARGIN = 0.1

# Regularisation prompts, `{}` standing for `S*` or the class word (persona's own; the reference ships animate,
# inanimate and universal prompt files, picked by hand). "the {}" (not "a {}") so the article never differs between
# the two prompts ("an apple" / "a sks"). Animate subjects also act, wear and feel; inanimate ones are placed and
# depicted.
ANIMATE_PROMPTS = (
    "a photo of the {} on the beach",
    "the {} running through a field of flowers",
    "the {} wearing a red hat",
    "the {} wearing sunglasses on a sunny day",
    "the {} sleeping on a sofa",
    "the {} swimming in a clear lake",
    "the {} jumping over a wooden fence",
    "the {} dressed as a chef in a kitchen",
    "the {} looking up at the night sky",
    "the {} playing in the snow",
    "the {} with a happy expression",
    "the {} sitting in a boat at sunset",
    "a watercolor painting of the {}",
    "a pencil sketch of the {} in a park",
    "the {} on a busy city street at night",
    "the {} in the desert",
)
INANIMATE_PROMPTS = (
    "a photo of the {} on the beach",
    "the {} on a wooden table",
    "the {} floating in a swimming pool",
    "the {} on top of a snowy mountain",
    "the {} on a shelf in a library",
    "the {} under a street lamp at night",
    "the {} in the jungle",
    "the {} next to a cup of coffee",
    "the {} on the surface of the moon",
    "the {} on green grass with flowers around it",
    "the {} in a shop window",
    "the {} half buried in sand",
    "the {} with a city in the background",
    "a watercolor painting of the {}",
    "a pencil sketch of the {}",
    "a red {}",
)
# Classes that get the animate prompts besides DreamBench's live subjects (subjects.domain.LIVE_CLASSES).
ANIMATE_CLASSES = frozenset({
    "person", "man", "woman", "boy", "girl", "child", "baby", "puppy", "kitten", "bird", "parrot", "owl", "duck",
    "horse", "cow", "sheep", "goat", "pig", "rabbit", "hamster", "monkey", "fox", "wolf", "bear", "lion", "tiger",
})


def regularization_prompts(class_name: str) -> tuple[str, ...]:
    """The prompt templates for a subject of class `class_name`: animate for people and animals, else inanimate."""
    name = class_name.strip().lower()
    return ANIMATE_PROMPTS if name in LIVE_CLASSES or name in ANIMATE_CLASSES else INANIMATE_PROMPTS


def embedding_loss(concept_out, class_out, context_mask, variant: str = "cosine", margin: float = HINGE_MARGIN):
    """The embedding term between the text encoder's outputs (..., T, D) of the concept and the reference prompt,
    aligned by position (row t of `class_out` is the reference's counterpart of row t of `concept_out`), over the
    positions where `context_mask` (..., T) or (T,) is True:

        cosine:   mean_i [1 − cos(a_i, b_i)]
        pairwise: mean_{i≠j} |cos(a_i, a_j) − cos(b_i, b_j)|
        hinge:    mean_i max(0, 1 − cos(a_i, b_i) − margin)

    No selected position (or fewer than two for pairwise): 0, still connected to `concept_out`'s graph."""
    import torch
    import torch.nn.functional as F

    if variant not in CORE_VARIANTS:
        raise ValueError(f"variant {variant!r}: use one of {', '.join(CORE_VARIANTS)}")
    a, b = concept_out.float(), class_out.float()
    mask = torch.as_tensor(context_mask, device=a.device).bool().expand(a.shape[:-1])
    zero = a.sum() * 0.0
    if variant == "pairwise":
        a_n, b_n = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        difference = (a_n @ a_n.transpose(-1, -2) - b_n @ b_n.transpose(-1, -2)).abs()
        eye = torch.eye(a.shape[-2], dtype=torch.bool, device=a.device)
        pairs = mask[..., :, None] & mask[..., None, :] & ~eye
        return difference[pairs].mean() if pairs.any() else zero
    distance = 1.0 - F.cosine_similarity(a, b, dim=-1)
    if variant == "hinge":
        distance = (distance - margin).clamp_min(0.0)
    return distance[mask].mean() if mask.any() else zero


def attention_loss(concept_maps: Sequence[Any], class_maps: Sequence[Any]):
    """The attention term from per-layer maps: element l of each sequence is an (N, ...) tensor, the N context
    tokens' cross-attention maps in layer l (heads averaged; any pixel layout). Each map is reduced to its mean μ,

        mean_l mean_i [μ(M_{l,i}) − μ(M'_{l,i})]²

    No context token: 0."""
    import torch

    if len(concept_maps) != len(class_maps) or not concept_maps:
        raise ValueError(f"attention maps of {len(concept_maps)} and {len(class_maps)} layers: need the same, ≥ 1")
    means = torch.stack([m.float().flatten(1).mean(1) for m in concept_maps])  # (L, N)
    reference = torch.stack([m.float().flatten(1).mean(1) for m in class_maps]).to(means.device)
    if means.shape != reference.shape:
        raise ValueError(f"attention maps of {tuple(means.shape)} and {tuple(reference.shape)} (layers, tokens)")
    if means.shape[1] == 0:
        return means.sum() * 0.0
    return (means - reference).pow(2).mean()


def rescale_embedding(row, target_norm):
    """`row` (..., D) scaled to L2 norm `target_norm` (a number, or one per row), direction kept."""
    import torch

    target = torch.as_tensor(target_norm, dtype=row.dtype, device=row.device)
    if target.dim():
        target = target.unsqueeze(-1)
    return row / row.norm(dim=-1, keepdim=True).clamp_min(1e-12) * target


@dataclass(frozen=True)
class PromptPair:
    """One regularisation template tokenised both ways, with its positions aligned."""

    template: str
    concept_ids: list[int]
    class_ids: list[int]
    # Context positions in the concept prompt, and the reference prompt's position for each (same order).
    concept_context: list[int]
    class_context: list[int]
    # The identifier's last position, and the class word's last position (the hinge variant's pair).
    concept_last: int
    class_last: int


def prompt_pair(tokenizer, template: str, identifier: str, class_word: str) -> PromptPair:
    """Tokenises `template` with `identifier` and with `class_word` (padded to the tokenizer's length) and aligns
    them: the tokens before the placeholder are the same, those after it are matched in order through EOS."""
    concept_ids = _ids(tokenizer, template.format(identifier))
    class_ids = _ids(tokenizer, template.format(class_word))
    identifier_ids = tokenizer(identifier, add_special_tokens=False).input_ids
    class_word_ids = tokenizer(class_word, add_special_tokens=False).input_ids
    start = _find(concept_ids, identifier_ids, template, identifier)
    if class_ids[start:start + len(class_word_ids)] != class_word_ids:
        raise ValueError(f"the template {template!r} does not put {class_word!r} where it puts {identifier!r}")
    concept_eos, class_eos = _eos(concept_ids, tokenizer, template), _eos(class_ids, tokenizer, template)
    after = list(range(start + len(identifier_ids), concept_eos + 1))
    shift = len(class_word_ids) - len(identifier_ids)
    concept_context = list(range(1, start)) + after
    class_context = list(range(1, start)) + [p + shift for p in after]
    if class_eos != concept_eos + shift or [concept_ids[p] for p in concept_context] != \
            [class_ids[p] for p in class_context]:
        raise ValueError(f"the context of {template!r} differs between {identifier!r} and {class_word!r}")
    return PromptPair(template, concept_ids, class_ids, concept_context, class_context,
                      start + len(identifier_ids) - 1, start + len(class_word_ids) - 1)


def _ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length).input_ids


def _find(ids: list[int], wanted: list[int], template: str, identifier: str) -> int:
    for start in range(1, len(ids) - len(wanted) + 1):
        if ids[start:start + len(wanted)] == wanted:
            return start
    raise ValueError(f"{identifier!r} is not in the tokenised template {template!r}")


def _eos(ids: list[int], tokenizer, template: str) -> int:
    if tokenizer.eos_token_id not in ids[1:]:
        raise ValueError(f"the template {template!r} is too long for the tokenizer ({tokenizer.model_max_length})")
    return ids.index(tokenizer.eos_token_id, 1)


class CoreRegularizer(Regularizer):
    name = "core"

    def prepare(self, inputs: RegularizerInputs) -> list[str]:
        import torch

        super().prepare(inputs)
        config = self.config
        if not inputs.method.trains_text_encoder:
            raise InvalidArgument(
                f"`regularizers` core trains the new token's text embedding, but `method` {config.method!r} "
                "trains no text weights here: use method ti or custom_diffusion (or train_text_encoder with "
                "dreambooth or lora), or drop core")
        tokenizer = inputs.components.tokenizer
        self.pairs = [prompt_pair(tokenizer, template, config.token, config.class_name)
                      for template in regularization_prompts(config.class_name)]
        device = inputs.device
        self.concept_ids = torch.tensor([p.concept_ids for p in self.pairs], device=device)
        self.class_ids = torch.tensor([p.class_ids for p in self.pairs], device=device)
        # The identifier's rows of the input embedding matrix (one per token: `tokenizer.convert_tokens_to_ids`
        # would map a word already in the vocabulary, e.g. "sks" as "sks</w>", to the unknown token).
        self.rows = torch.tensor(tokenizer(config.token, add_special_tokens=False).input_ids, device=device)
        self.previous_norms = None
        self.calls = 0
        self.plain_processors: dict[int, Any] = {}
        if config.core_rescale_end and config.core_rescale_start > config.steps:
            return [f"core: the rescale window (steps {config.core_rescale_start}–{config.core_rescale_end}) starts "
                    f"after the run's last step ({config.steps}): the embedding is never rescaled"]
        return []

    def loss_terms(self, batch, step_inputs=None):
        import numpy as np
        import torch

        config, components = self.config, self.inputs.components
        # ‖v_{s−1}‖: the identifier's norm before this step's update, for the rescaling after it.
        self.previous_norms = self._embedding_rows().detach().norm(dim=-1)
        # One prompt per step, drawn from (seed, step): the same run draws the same prompts, resumed or not.
        self.calls += 1
        step = step_inputs.get("step", self.calls) if step_inputs else self.calls
        index = int(np.random.default_rng([config.seed, step]).integers(len(self.pairs)))
        pair = self.pairs[index]
        with self.inputs.autocast():
            concept_text = components.text_encoder(self.concept_ids[index:index + 1])[0]
        with torch.no_grad(), self.inputs.autocast():
            class_text = components.text_encoder(self.class_ids[index:index + 1])[0]
        terms = {}
        if config.core_emb_weight:
            terms["core_emb"] = (self._embedding_term(pair, concept_text, class_text), config.core_emb_weight)
        if config.core_attn_weight:
            if not step_inputs or "noisy" not in step_inputs:
                raise ValueError("core's attention term needs the step's noisy latents: loss_terms(batch, "
                                 "{'noisy': ..., 'timesteps': ...})")
            noisy, timesteps = step_inputs["noisy"][:1].detach(), step_inputs["timesteps"][:1]
            concept_maps = self._attention_maps(concept_text, noisy, timesteps)
            with torch.no_grad():
                class_maps = self._attention_maps(class_text, noisy, timesteps)
            value = attention_loss([m[:, pair.concept_context].transpose(0, 1) for m in concept_maps],
                                   [m[:, pair.class_context].transpose(0, 1) for m in class_maps])
            terms["core_attn"] = (value, config.core_attn_weight)
        return terms

    def after_optimizer_step(self, step: int) -> None:
        import torch

        start, end = self.config.core_rescale_start, self.config.core_rescale_end
        if not end or not start <= step <= end or self.previous_norms is None:
            return
        weight = self.inputs.components.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.rows] = rescale_embedding(weight[self.rows], self.previous_norms.to(weight.device))

    def _embedding_rows(self):
        return self.inputs.components.text_encoder.get_input_embeddings().weight[self.rows]

    def _embedding_term(self, pair: PromptPair, concept_text, class_text):
        """The configured variant, with the reference's outputs moved to the concept prompt's positions."""
        import torch

        length = concept_text.shape[1]
        aligned = torch.arange(length, device=concept_text.device)
        mask = torch.zeros(length, dtype=torch.bool, device=concept_text.device)
        if self.config.core_variant == "hinge":
            aligned[pair.concept_last], mask[pair.concept_last] = pair.class_last, True
        else:
            aligned[pair.concept_context] = torch.tensor(pair.class_context, device=aligned.device)
            mask[pair.concept_context] = True
        return embedding_loss(concept_text, class_text[:, aligned], mask, self.config.core_variant)

    def _attention_maps(self, text, noisy, timesteps) -> list:
        """One UNet forward conditioned on `text` (1, T, D); per cross-attention layer, its (P, T) attention
        probabilities (pixels × tokens, heads averaged), with their graph. The layers' processors are swapped for
        ones that materialise the probabilities (diffusers' AttnProcessor; a Custom Diffusion processor keeps its
        own K/V) and put back afterwards; gradient checkpointing is paused meanwhile (its recomputation in
        backward would otherwise run the other processors)."""
        unet = self.inputs.components.unet
        maps: list = []
        original = unet.attn_processors
        unet.set_attn_processor({name: _CapturingProcessor(self._plain(processor), maps)
                                 for name, processor in original.items()})
        checkpointing = unet.is_gradient_checkpointing
        if checkpointing:
            unet.disable_gradient_checkpointing()
        try:
            with self.inputs.autocast():
                unet(noisy, timesteps, text.to(noisy.device))
        finally:
            unet.set_attn_processor(original)
            if checkpointing:
                unet.enable_gradient_checkpointing()
        if not maps:
            raise ValueError("core: the UNet has no cross-attention layer to regularise")
        return maps

    def _plain(self, processor):
        """The processor computing the same attention through `attn.get_attention_scores` (cached per processor)."""
        from diffusers.models.attention_processor import (AttnProcessor, AttnProcessor2_0,
                                                          CustomDiffusionAttnProcessor,
                                                          CustomDiffusionAttnProcessor2_0)

        if type(processor) is AttnProcessor2_0:
            return AttnProcessor()
        if type(processor) is CustomDiffusionAttnProcessor2_0:
            key = id(processor)
            if key not in self.plain_processors:
                # Built without weights of its own, then given the fused processor's: the same K/V modules train.
                plain = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
                plain.train_kv, plain.train_q_out = processor.train_kv, processor.train_q_out
                for name in ("to_k_custom_diffusion", "to_v_custom_diffusion", "to_q_custom_diffusion",
                             "to_out_custom_diffusion"):
                    if hasattr(processor, name):
                        setattr(plain, name, getattr(processor, name))
                self.plain_processors[key] = (processor, plain)  # the processor kept alive: its id stays unique
            return self.plain_processors[key][1]
        return processor


class _CapturingProcessor:
    """Runs `inner`; for cross-attention, hands the attention probabilities it computes to `maps` as (P, T), heads
    and the batch (one latent) averaged."""

    def __init__(self, inner, maps: list):
        self.inner, self.maps = inner, maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is None:  # self-attention: nothing to record
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        scores, seen = attn.get_attention_scores, []

        def observed(query, key, mask=None):
            probs = scores(query, key, mask)
            seen.append(probs)
            return probs

        attn.get_attention_scores = observed
        try:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        finally:
            del attn.get_attention_scores  # back to the class's method
        if not seen:
            raise ValueError(f"core cannot observe the cross-attention of {type(self.inner).__name__}: it does not "
                             "compute attention probabilities through `get_attention_scores`")
        probs = seen[0]  # (batch · heads, pixels, tokens)
        self.maps.append(probs.float().mean(0))
        return out
