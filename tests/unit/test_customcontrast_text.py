"""The encoder's word tokens through the text encoder (services/models/customcontrast/text.py), on a tiny CLIP text
encoder with the real CLIP tokenizer."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from persona.services.models.builders import CLIP_TOKENIZER_DIR
from persona.services.models.customcontrast.text import (
    placeholder_caption, placeholder_mask, text_states_per_layer)
from persona.services.runtime.errors import InvalidArgument


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=16,
                                        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=1)).eval()


def _ids(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=12, return_tensors="pt").input_ids


def test_the_caption_gets_one_slot_per_word_token_and_the_mask_finds_them(tokenizer):
    caption = placeholder_caption("a photo of a sks ring", "sks", 3)
    assert caption == "a photo of a sks sks sks ring"
    sks = tokenizer.convert_tokens_to_ids("sks</w>")
    mask = placeholder_mask(_ids(tokenizer, [caption]), sks, 3)
    assert mask[0].nonzero().flatten().tolist() == [5, 6, 7]  # after <bos> a photo of a
    with pytest.raises(InvalidArgument, match="must hold the placeholder 'sks' once"):
        placeholder_caption("a photo of a ring", "sks", 3)
    with pytest.raises(InvalidArgument, match=r"hold the placeholder token \d+ \[3\] times"):
        placeholder_mask(_ids(tokenizer, [caption]), sks, 4)


def test_the_placeholders_own_embedding_gives_the_plain_text_states(tokenizer, text_encoder):
    ids = _ids(tokenizer, [placeholder_caption("a photo of a sks ring", "sks", 2)] * 2)
    sks = tokenizer.convert_tokens_to_ids("sks</w>")
    mask = placeholder_mask(ids, sks, 2)
    own = text_encoder.get_input_embeddings().weight[sks].detach()
    tokens = own.expand(2, 3, 2, -1)  # (B, L_x, N_t, d_word)
    with torch.no_grad():
        states = text_states_per_layer(text_encoder, ids, mask, tokens)
        plain = text_encoder(ids)[0]
    assert len(states) == 3 and all(torch.allclose(s, plain, atol=1e-5) for s in states)


def test_each_layer_sees_its_own_tokens_and_gradients_reach_them(tokenizer, text_encoder):
    ids = _ids(tokenizer, [placeholder_caption("a photo of a sks dog", "sks", 2)])
    mask = placeholder_mask(ids, tokenizer.convert_tokens_to_ids("sks</w>"), 2)
    tokens = torch.randn(1, 2, 2, 16, requires_grad=True)
    first, second = text_states_per_layer(text_encoder, ids, mask, tokens)
    assert torch.allclose(first[:, :5], second[:, :5], atol=1e-6)  # causal: positions before the slots agree
    assert not torch.allclose(first[:, 5:], second[:, 5:], atol=1e-4)
    (first * torch.randn_like(first)).sum().backward()  # (a plain sum of LayerNorm outputs has no gradient)
    assert tokens.grad[:, 0].abs().sum() > 0 and tokens.grad[:, 1].abs().sum() == 0
    with pytest.raises(InvalidArgument, match="`input_ids`"):
        text_states_per_layer(text_encoder, ids, mask, torch.randn(2, 2, 2, 16))
