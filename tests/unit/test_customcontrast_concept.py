"""A customcontrast concept's files (models/customcontrast/concept.py) round-trip exactly, the visual K'/V' file is
the same bytes for every concept of one encoder, and the drawing mapping: a sampler's timestep takes the nearest
row of the table, the identifier becomes N_t placeholder slots (named once, else refused), and the tokens attach to
a UNet for a draw and come off again."""
from __future__ import annotations

import pytest
import torch

from persona.services.models.customcontrast.attention import install_decoupled_processors
from persona.services.models.customcontrast.build import SubjectTokens
from persona.services.models.customcontrast.concept import (TOKENS_FILE, VISUAL_KV_FILE, AttachedTokens, ConceptTokens,
                                                            load_concept, nearest_rows, save_concept, slot_prompt,
                                                            table_timesteps)
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument


def _tokens(text: bool = True, identifier: str = "sks") -> ConceptTokens:
    generator = torch.Generator().manual_seed(0)
    steps = table_timesteps(1000, 5)
    table = SubjectTokens(steps, torch.randn(5, 3, 2, 4, generator=generator) if text else None,
                          torch.randn(5, 3, 2, 6, generator=generator))
    visual_kv = {"0.to_k_image.weight": torch.randn(6, 6, generator=generator),
                 "0.to_v_image.weight": torch.randn(6, 6, generator=generator)}
    return ConceptTokens(table, visual_kv, 0.7, 2, identifier, "enc_0123", "ab" * 32)


def test_table_timesteps_spread_over_the_schedule():
    assert table_timesteps(1000, 5).tolist() == [0, 250, 500, 749, 999]
    assert len(table_timesteps()) == 50 and table_timesteps()[-1] == 999
    with pytest.raises(InvalidArgument, match="`rows` is 0"):
        table_timesteps(1000, 0)


@pytest.mark.parametrize("text", [True, False])
def test_the_concept_files_round_trip(tmp_path, text):
    tokens = _tokens(text, identifier="zwx")
    paths = save_concept(tmp_path / "c", tokens)
    assert [p.name for p in paths] == [TOKENS_FILE, VISUAL_KV_FILE]
    back = load_concept(tmp_path / "c")
    assert torch.equal(back.table.timesteps, tokens.table.timesteps)
    assert torch.equal(back.table.image_tokens, tokens.table.image_tokens)
    assert (back.table.text_tokens is None) == (not text)
    if text:
        assert torch.equal(back.table.text_tokens, tokens.table.text_tokens)
    assert back.visual_kv.keys() == tokens.visual_kv.keys()
    assert all(torch.equal(back.visual_kv[k], v) for k, v in tokens.visual_kv.items())
    assert (back.scale, back.num_text_tokens, back.identifier, back.encoder_id, back.base_model_sha256) == (
        0.7, 2, "zwx", "enc_0123", "ab" * 32)


def test_the_visual_kv_file_is_the_same_bytes_for_every_concept_of_an_encoder(tmp_path):
    one, other = _tokens(), _tokens(identifier="zwx")
    save_concept(tmp_path / "a", one)
    save_concept(tmp_path / "b", ConceptTokens(SubjectTokens(one.table.timesteps, None, one.table.image_tokens * 2),
                                               other.visual_kv, 1.0, 2, "zwx", "enc_0123", "ab" * 32))
    assert (tmp_path / "a" / VISUAL_KV_FILE).read_bytes() == (tmp_path / "b" / VISUAL_KV_FILE).read_bytes()


def test_a_missing_file_is_refused_naming_it(tmp_path):
    save_concept(tmp_path / "c", _tokens())
    (tmp_path / "c" / VISUAL_KV_FILE).unlink()
    with pytest.raises(FailedPrecondition, match=VISUAL_KV_FILE):
        load_concept(tmp_path / "c")


def test_each_sampler_timestep_takes_the_nearest_row():
    table = _tokens().table  # rows at 0, 250, 500, 749, 999
    mapped = nearest_rows(table, torch.tensor([999, 801, 624, 375.5, 100, 1]))
    assert mapped.timesteps.tolist() == [999, 801, 624, 375, 100, 1]
    for t, row in zip([999, 801, 624, 375, 100, 1], [4, 3, 2, 2, 0, 0]):
        text, image = mapped.at(t)
        assert torch.equal(image, table.image_tokens[row]) and torch.equal(text, table.text_tokens[row])


def test_the_identifier_becomes_the_placeholder_slots_once():
    assert slot_prompt("a sks dog on the beach", "sks", 2) == "a sks sks dog on the beach"
    assert slot_prompt("a zwx dog, zwxy", "zwx", 3) == "a sks sks sks dog, zwxy"
    with pytest.raises(InvalidArgument, match=r"`prompts` 'a dog' names the concept's identifier 'sks' 0 times"):
        slot_prompt("a dog", "sks", 2)
    with pytest.raises(InvalidArgument, match="2 times"):
        slot_prompt("a sks dog and a sks cat", "sks", 2)
    with pytest.raises(InvalidArgument, match="keeps for its subject's slots"):
        slot_prompt("a zwx dog beside a sks", "zwx", 2)


def test_the_tokens_attach_to_a_unet_for_a_draw_and_come_off(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=8)
    own = {name: type(p) for name, p in unet.attn_processors.items()}
    _, processors = install_decoupled_processors(unet)
    visual_kv = {k: torch.full_like(v, 0.5) for k, v in processors.state_dict().items()}
    unet.set_attn_processor({name: cls() for name, cls in own.items()})
    tokens = ConceptTokens(_tokens().table, visual_kv, 0.3, 2, "sks", "enc_0123", "")
    attached = AttachedTokens(unet, tokens)
    assert all(p.scale == 0.3 and bool((p.to_k_image.weight == 0.5).all()) for p in attached.processors)
    attached.remove()
    assert {name: type(p) for name, p in unet.attn_processors.items()} == own
    with pytest.raises(FailedPrecondition, match="another base model"):
        AttachedTokens(unet, ConceptTokens(_tokens().table, {"0.to_k_image.weight": torch.zeros(2, 2)}, 1.0, 2,
                                           "sks", "", ""))
    assert {name: type(p) for name, p in unet.attn_processors.items()} == own
