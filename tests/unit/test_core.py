"""CoRe (regularizers/core.py): each equation against hand-computed values on small tensors (L_emb, its pairwise and
hinge variants, L_attn on 2×2 maps, the rescaling), the prompt alignment on the real CLIP tokenizer, the attention
capture (same numbers as the fused processors, gradients to the embedding and to Custom Diffusion's K/V, processors
put back), and the plugin through 30 textual-inversion steps of the tiny model: terms reported every step, finite,
L_emb small; the rescale window keeps the token's norm; refused without a text side."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from PIL import Image

from persona.services.runtime.errors import InvalidArgument
from persona.services.train.config import TrainConfig
from persona.services.train.loop import train
from persona.services.train.regularizers import REGULARIZER_PLUGINS, RegularizerInputs
from persona.services.train.regularizers.core import (ANIMATE_PROMPTS, HINGE_MARGIN, INANIMATE_PROMPTS,
                                                      CoreRegularizer, attention_loss, embedding_loss, prompt_pair,
                                                      regularization_prompts, rescale_embedding)

# Positions: BOS, a context token, the identifier / class word, a context token.
CONCEPT = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 4.0]]])
CLASS = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [4.0, 3.0]]])
CONTEXT = torch.tensor([False, True, False, True])


def test_embedding_loss_is_the_mean_of_one_minus_cosine_over_context_tokens():
    # Position 1: cos([1,0],[1,1]) = 1/√2; position 3: cos([3,4],[4,3]) = 24/25. BOS and the identifier (cos 0)
    # are left out.
    expected = ((1 - 1 / math.sqrt(2)) + (1 - 24 / 25)) / 2
    assert embedding_loss(CONCEPT, CLASS, CONTEXT).item() == pytest.approx(expected)
    assert embedding_loss(CLASS, CLASS, CONTEXT).item() == pytest.approx(0.0, abs=1e-7)
    # No context position: 0, not NaN.
    assert embedding_loss(CONCEPT, CLASS, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_hinge_variant_forgives_drift_within_the_margin():
    # 1 − cos: 0.2929 at position 1 (0.1929 past the margin 0.1), 0.04 at position 3 (within it).
    assert HINGE_MARGIN == 0.1
    expected = ((1 - 1 / math.sqrt(2) - 0.1) + 0.0) / 2
    assert embedding_loss(CONCEPT, CLASS, CONTEXT, variant="hinge").item() == pytest.approx(expected)
    assert embedding_loss(CONCEPT, CLASS, CONTEXT, variant="hinge", margin=0.5).item() == 0.0


def test_pairwise_variant_compares_the_similarity_matrices():
    # Context pair (1, 3): cos([1,0],[3,4]) = 3/5 under the concept prompt, cos([1,1],[4,3]) = 7/(5√2) under the
    # class prompt; both ordered pairs give the same |difference|.
    expected = abs(3 / 5 - 7 / (5 * math.sqrt(2)))
    assert embedding_loss(CONCEPT, CLASS, CONTEXT, variant="pairwise").item() == pytest.approx(expected)
    # A single context token has no pair.
    one = torch.tensor([False, True, False, False])
    assert embedding_loss(CONCEPT, CLASS, one, variant="pairwise").item() == 0.0
    with pytest.raises(ValueError, match="variant"):
        embedding_loss(CONCEPT, CLASS, CONTEXT, variant="l2")


def test_attention_loss_squares_the_difference_of_each_maps_mean():
    # Layer 1 (2×2 maps): token A's means 0.2 vs 0.1 → 0.01; token B's maps differ but both average 0.2 → 0.
    layer1 = torch.tensor([[[0.1, 0.3], [0.2, 0.2]], [[0.4, 0.4], [0.0, 0.0]]])
    layer1_ref = torch.tensor([[[0.0, 0.2], [0.1, 0.1]], [[0.2, 0.2], [0.2, 0.2]]])
    assert attention_loss([layer1], [layer1_ref]).item() == pytest.approx(0.01 / 2)
    # Layer 2 (1×1 maps, another resolution): (0.5 − 0.3)² and 0 → 0.02; the layers are averaged.
    layer2, layer2_ref = torch.tensor([[[0.5]], [[0.3]]]), torch.tensor([[[0.3]], [[0.3]]])
    assert attention_loss([layer1, layer2], [layer1_ref, layer2_ref]).item() == pytest.approx((0.005 + 0.02) / 2)
    assert attention_loss([layer1[:0]], [layer1_ref[:0]]).item() == 0.0
    with pytest.raises(ValueError, match="layers"):
        attention_loss([layer1], [])


def test_rescale_embedding_keeps_the_direction_at_the_target_norm():
    assert rescale_embedding(torch.tensor([3.0, 4.0]), 10.0).tolist() == pytest.approx([6.0, 8.0])
    rows = rescale_embedding(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([5.0, 1.0]))
    assert rows.tolist() == [pytest.approx([3.0, 4.0]), pytest.approx([0.0, 1.0])]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    tokenizer.add_tokens("sks")
    return tokenizer


def test_prompts_are_aligned_around_the_identifier(tokenizer):
    pair = prompt_pair(tokenizer, "the {} on the beach", "sks", "dog")
    # BOS the sks on the beach EOS: context = "the", "on the beach" and EOS, at the same positions in both.
    assert pair.concept_context == pair.class_context == [1, 3, 4, 5, 6]
    assert pair.concept_ids[6] == tokenizer.eos_token_id and pair.concept_last == pair.class_last == 2
    # A two-token class word shifts what follows it by one.
    teddy = prompt_pair(tokenizer, "the {} on the beach", "sks", "teddy bear")
    assert teddy.concept_context == [1, 3, 4, 5, 6] and teddy.class_context == [1, 4, 5, 6, 7]
    assert (teddy.concept_last, teddy.class_last) == (2, 3)
    # A template ending in the identifier (BOS a pencil sketch of the sks EOS) still has EOS as context.
    assert prompt_pair(tokenizer, "a pencil sketch of the {}", "sks", "dog").concept_context == [1, 2, 3, 4, 5, 7]
    with pytest.raises(ValueError, match="not in the tokenised template"):
        prompt_pair(tokenizer, "the beach", "sks", "dog")


def test_prompt_sets_follow_the_class():
    assert regularization_prompts("dog") == regularization_prompts("Woman") == ANIMATE_PROMPTS
    assert regularization_prompts("teapot") == regularization_prompts("teddy bear") == INANIMATE_PROMPTS
    assert all(t.count("{}") == 1 for t in ANIMATE_PROMPTS + INANIMATE_PROMPTS)


def test_core_settings_are_validated():
    with pytest.raises(InvalidArgument, match="`core_attn_weight`"):
        TrainConfig(core_attn_weight=-1).validate()
    with pytest.raises(InvalidArgument, match="`core_rescale_end`.*`core_rescale_start`"):
        TrainConfig(core_rescale_start=50, core_rescale_end=10).validate()
    with pytest.raises(InvalidArgument, match="`core_variant`"):
        TrainConfig(core_variant="l1").validate()
    TrainConfig(core_rescale_end=0, core_variant="hinge").validate()  # 0: no rescaling


def _ti_regularizer(tiny_model, config):
    """A CoreRegularizer prepared on the tiny model with textual inversion's token, outside the loop."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from persona.services.train.methods import Components, TextualInversionMethod

    components = Components(base_model_dir=tiny_model,
                            tokenizer=CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer"),
                            text_encoder=CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder"),
                            vae=AutoencoderKL.from_pretrained(tiny_model, subfolder="vae"),
                            unet=UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"),
                            noise_scheduler=None)
    method = TextualInversionMethod()
    method.prepare(components, config)
    regularizer = CoreRegularizer(config)
    regularizer.prepare(RegularizerInputs(components, method, torch.device("cpu"), 32, 16, 1, 0, [None],
                                          contextlib.nullcontext))
    return regularizer, components, method


def test_attention_capture_keeps_the_numbers_and_the_gradient(tiny_model):
    config = TrainConfig(method="ti", token="sks", initializer_token="dog", class_name="dog", regularizers=("core",))
    regularizer, components, method = _ti_regularizer(tiny_model, config)
    unet, token_id = components.unet, method.placeholder.token_id
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    step = {"noisy": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
            "timesteps": torch.tensor([500]), "step": 1}
    # The new token starts as the class word's embedding: both prompts are the same sentence, both terms 0.
    terms = regularizer.loss_terms(torch.tensor([0]), step)
    assert terms["core_emb"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["core_attn"][0].item() == pytest.approx(0.0, abs=1e-12)
    assert (terms["core_emb"][1], terms["core_attn"][1]) == (1.5e-4, 0.05)
    # The capturing pass computes what the fused processors compute.
    text = components.text_encoder(regularizer.concept_ids[:1])[0]
    with torch.no_grad():
        fused = unet(step["noisy"], step["timesteps"], text).sample
        maps = regularizer._attention_maps(text, step["noisy"], step["timesteps"])
        assert {name: type(p) for name, p in unet.attn_processors.items()} == before
        plain = unet(step["noisy"], step["timesteps"], text).sample
    assert len(maps) == 4 and maps[0].shape == (16 * 16, 77)  # the tiny UNet's 4 cross-attention layers
    assert torch.allclose(maps[0].sum(-1), torch.ones(256), atol=1e-5)  # softmax over the tokens
    assert torch.allclose(fused, plain, atol=1e-5)
    # Moved away from the class word, the token gets a gradient from the attention term alone.
    with torch.no_grad():
        method.placeholder.weight[token_id] += 0.5 * torch.randn(method.placeholder.weight.shape[1])
    value, _ = regularizer.loss_terms(torch.tensor([0]), step)["core_attn"]
    value.backward()
    assert value.item() > 0 and method.placeholder.weight.grad[token_id].abs().sum() > 0


def test_custom_diffusion_processors_keep_their_trained_key_and_value(tiny_model):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    config = TrainConfig(method="ti", token="sks", initializer_token="dog", class_name="dog", regularizers=("core",))
    regularizer, components, _ = _ti_regularizer(tiny_model, config)
    unet = components.unet
    modules = dict(unet.named_modules())
    processors = {}
    for name in unet.attn_processors:
        attn = modules[name.removesuffix(".processor")]
        if not attn.is_cross_attention:
            processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
            continue
        processor = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False,
                                                    hidden_size=attn.to_k.out_features,
                                                    cross_attention_dim=attn.to_k.in_features)
        processor.to_k_custom_diffusion.weight.data = attn.to_k.weight.data * 1.5  # differs from the layer's
        processor.to_v_custom_diffusion.weight.data = attn.to_v.weight.data.clone()
        processors[name] = processor
    unet.set_attn_processor(processors)
    noisy, timesteps = torch.randn(1, 4, 16, 16), torch.tensor([300])
    text = components.text_encoder(regularizer.concept_ids[:1])[0].detach()
    with torch.no_grad():
        fused = unet(noisy, timesteps, text).sample
    maps = regularizer._attention_maps(text, noisy, timesteps)
    with torch.no_grad():
        captured = unet(noisy, timesteps, text).sample
    assert torch.allclose(fused, captured, atol=1e-5)  # processors put back
    sum(m[:, 2].sum() for m in maps).backward()
    cross = [p for p in unet.attn_processors.values() if p.train_kv]
    assert all(p.to_k_custom_diffusion.weight.grad is not None for p in cross)


@pytest.fixture(scope="module")
def photos(dreambench):
    return [(Image.open(p).convert("RGB"), "a photo of sks dog")
            for p in sorted((dreambench / "dog").glob("*.jpg"))[:2]]


def test_core_trains_textual_inversion_with_bounded_terms_and_rescales_in_its_window(tiny_model, photos, tmp_path,
                                                                                      monkeypatch):
    """30 steps; rescale window 10–20. A recording subclass notes the token row's norm after each step."""
    norms: dict[int, float] = {}

    class Recording(CoreRegularizer):
        def after_optimizer_step(self, step):
            super().after_optimizer_step(step)
            norms[step] = self._embedding_rows().detach().norm().item()

    monkeypatch.setitem(REGULARIZER_PLUGINS, "core", Recording)
    reported = []
    config = TrainConfig(method="ti", steps=30, resolution=32, learning_rate=1e-1, token="sks",
                         initializer_token="dog", class_name="dog", regularizers=("core",),
                         core_rescale_start=10, core_rescale_end=20)
    result = train(tiny_model, photos, config, tmp_path / "core",
                   on_step=lambda step, losses, speed: reported.append(losses))
    assert len(reported) == 30 and all({"core_emb", "core_attn"} <= set(r) for r in reported)
    assert all(math.isfinite(v) for r in reported for v in r.values())
    emb = [r["core_emb"] for r in reported]
    assert all(-1e-6 <= v <= 2 for v in emb)  # 1 − cos is bounded (up to float rounding at cos = 1)
    # The token starts as the class word, so the context starts unchanged; CoRe keeps it close.
    assert emb[0] < 1e-5 and max(emb) < 0.5
    assert all(r["core_attn"] >= 0 for r in reported)
    assert all(r["loss"] == pytest.approx(r["instance"] + 1.5e-4 * r["core_emb"] + 0.05 * r["core_attn"], rel=1e-5)
               for r in reported)
    # In the window the norm stays at its value from step 9; outside it the token moves freely (lr 0.1).
    assert all(norms[s] == pytest.approx(norms[9], rel=1e-5) for s in range(10, 21))
    assert norms[8] != pytest.approx(norms[9], rel=1e-4) and norms[21] != pytest.approx(norms[20], rel=1e-4)
    assert not result.warnings


def test_core_needs_a_method_that_trains_the_text_side(tiny_model, photos, tmp_path):
    config = TrainConfig(method="lora", steps=2, resolution=32, regularizers=("core",))
    with pytest.raises(InvalidArgument, match="`regularizers` core.*`method` 'lora'"):
        train(tiny_model, photos, config, tmp_path / "lora")
