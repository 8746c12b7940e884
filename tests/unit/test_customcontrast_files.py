"""A CustomContrast encoder saved and loaded (services/models/customcontrast/files.py): the same tokens after the
round trip, the K'/V' back in the UNet, and an encoder of another base model refused."""
from __future__ import annotations

import json

import pytest
import torch

from diffusers import UNet2DConditionModel

from persona.services.models.customcontrast.attention import install_decoupled_processors
from persona.services.models.customcontrast.encoder import MFIEncoder, MFIEncoderConfig
from persona.services.models.customcontrast.files import EncoderMeta, load_encoder, save_encoder
from persona.services.runtime.errors import InvalidArgument

BASE = "ab" * 32


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)


def _config(layers: int) -> MFIEncoderConfig:
    return MFIEncoderConfig(clip_width=24, word_width=32, cross_attention_width=32, num_cross_attention_layers=layers,
                            width=16, heads=4, num_layers=1, num_visual_tokens=3, num_text_tokens=2, contrast_width=8)


def test_an_encoder_round_trips_with_its_k_v(tmp_path):
    torch.manual_seed(0)
    _, processors = install_decoupled_processors(_tiny_unet(), scale=0.5)
    with torch.no_grad():
        processors[0].to_k_image.weight.add_(1.0)
    config = _config(len(processors))
    encoder = MFIEncoder(config).eval()
    save_encoder(tmp_path / "enc", encoder, processors, EncoderMeta(config, BASE, "openai/clip-vit-large-patch14", 0.5))

    _, fresh = install_decoupled_processors(_tiny_unet())
    loaded, meta = load_encoder(tmp_path / "enc", BASE, fresh)
    states, t = [torch.randn(2, 5, 24) for _ in range(4)], torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(states, t).image_tokens, encoder(states, t).image_tokens)
    assert torch.equal(fresh[0].to_k_image.weight, processors[0].to_k_image.weight)
    assert fresh[0].scale == 0.5 and meta.image_encoder == "openai/clip-vit-large-patch14"
    assert not list(tmp_path.joinpath("enc").glob(".*.tmp"))


def test_an_encoder_of_another_base_model_or_a_bad_folder_is_refused(tmp_path):
    _, processors = install_decoupled_processors(_tiny_unet())
    config = _config(len(processors))
    save_encoder(tmp_path / "enc", MFIEncoder(config), processors, EncoderMeta(config, BASE, "clip"))
    with pytest.raises(InvalidArgument, match="was trained on base model abababababab…, not on this one"):
        load_encoder(tmp_path / "enc", "cd" * 32, processors)
    with pytest.raises(InvalidArgument, match="holds no mfi_encoder.json"):
        load_encoder(tmp_path, BASE, processors)
    meta = tmp_path / "enc" / "mfi_encoder.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 9}))
    with pytest.raises(InvalidArgument, match="is format 9"):
        load_encoder(tmp_path / "enc", BASE, processors)
