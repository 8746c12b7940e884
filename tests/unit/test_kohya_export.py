"""Kohya export of a LoRA: key layout, alphas and header, exact round trip through diffusers, clear errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from persona.services.runtime.errors import InvalidArgument, NotFound
from persona.services.models.kohya import export_kohya_lora, to_kohya_state_dict

# Different rank/alpha per model, so a mixed-up alpha shows in the scale.
UNET_RANK, UNET_ALPHA = 4, 8
TE_RANK, TE_ALPHA = 2, 1
KOHYA_KEY = re.compile(r"^(lora_unet|lora_te)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def base(tiny_model) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def diffusers_lora(base, tmp_path_factory) -> Path:
    """A non-zero LoRA on the UNet and text encoder, saved as the lora method saves it (plus a text encoder)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _pipe(base)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=UNET_RANK, lora_alpha=UNET_ALPHA, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=TE_RANK, lora_alpha=TE_ALPHA, init_lora_weights="gaussian",
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    # peft starts B at zero (an identity adapter); random B makes the LoRA change the outputs.
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.2)
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        out, weight_name="pytorch_lora_weights.safetensors", safe_serialization=True,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def kohya_lora(diffusers_lora, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kohya") / "sub" / "sks_dog.safetensors"
    assert export_kohya_lora(diffusers_lora, out, "sd15", title="sks dog") == out
    return out


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_keys_alphas_and_header_follow_kohya(diffusers_lora, kohya_lora):
    source, _ = _read(diffusers_lora)
    tensors, header = _read(kohya_lora)
    assert not [k for k in tensors if not KOHYA_KEY.match(k)]
    modules = {k.split(".")[0] for k in tensors}
    assert len(tensors) == 3 * len(modules) == 3 * len(source) // 2
    assert all(f"{m}{end}" in tensors for m in modules for end in (".lora_down.weight", ".lora_up.weight", ".alpha"))

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    out0 = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert {q, te_q, out0} <= modules
    # Weights are copied as they are.
    assert torch.equal(tensors[f"{q}.lora_down.weight"],
                       source["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"])
    assert tensors[f"{q}.lora_down.weight"].shape[0] == UNET_RANK
    assert tensors[f"{te_q}.lora_up.weight"].shape[1] == TE_RANK
    for m in modules:
        alpha = tensors[f"{m}.alpha"]
        assert alpha.dim() == 0 and alpha.dtype == torch.float32
        assert alpha.item() == (UNET_ALPHA if m.startswith("lora_unet_") else TE_ALPHA), m

    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_dim"] == "Dynamic" and header["ss_network_alpha"] == "Dynamic"  # unet 4/8, te 2/1
    assert header["ss_base_model_version"] == "sd_v1" and header["ss_v2"] == "False"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert header["ss_output_name"] == "sks dog"
    assert "lora_adapter_metadata" not in header
    # No temporary file left beside the export.
    assert [p.name for p in kohya_lora.parent.iterdir()] == [kohya_lora.name]


def test_uniform_rank_and_alpha_go_in_the_header(tmp_path):
    sd = {"unet.mid_block.attentions.0.proj_in.lora.down.weight": torch.randn(4, 8),
          "unet.mid_block.attentions.0.proj_in.lora.up.weight": torch.randn(8, 4)}
    src = tmp_path / "in.safetensors"
    save_file(sd, src)
    tensors, header = _read(export_kohya_lora(src, tmp_path / "out.safetensors", "sd21-base"))
    # No adapter metadata: alpha = rank, the scale diffusers loads such a file at.
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"].item() == 4
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "4")
    assert header["ss_base_model_version"] == "sd_v2" and header["ss_v2"] == "True"
    assert header["ss_network_train_unet_only"] == "True"
    assert to_kohya_state_dict(sd, 2.5)["lora_unet_mid_block_attentions_0_proj_in.alpha"].item() == 2.5


def test_round_trip_through_diffusers_is_exact(base, diffusers_lora, kohya_lora):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.randint(0, 1000, (1, 16), generator=g)
    t = torch.tensor([500])

    def outputs(lora: Path | None):
        pipe = _pipe(base)
        if lora is not None:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        with torch.no_grad():
            hidden = pipe.text_encoder(ids)[0]
            return hidden, pipe.unet(latents, t, encoder_hidden_states=hidden).sample

    base_te, base_unet = outputs(None)
    d_te, d_unet = outputs(diffusers_lora)
    k_te, k_unet = outputs(kohya_lora)
    # Not vacuous: the LoRA changes both models well beyond the tolerance.
    assert (d_te - base_te).abs().max() > 1e-2
    assert (d_unet - base_unet).abs().max() > 1e-3
    torch.testing.assert_close(k_te, d_te, atol=1e-5, rtol=0)
    torch.testing.assert_close(k_unet, d_unet, atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors(tmp_path, kohya_lora):
    random_keys = tmp_path / "random.safetensors"
    save_file({"foo.weight": torch.randn(2, 2), "bar.bias": torch.randn(2)}, random_keys)
    with pytest.raises(InvalidArgument, match=r"not LoRA down/up matrices: `bar.bias`, `foo.weight`"):
        export_kohya_lora(random_keys, tmp_path / "out.safetensors")

    half = tmp_path / "half.safetensors"
    save_file({"unet.conv_in.lora.down.weight": torch.randn(2, 4)}, half)
    with pytest.raises(InvalidArgument, match=r"`unet.conv_in` has no up matrix"):
        export_kohya_lora(half, tmp_path / "out.safetensors")

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"text_encoder_2.x.lora.down.weight": torch.randn(2, 4),
               "text_encoder_2.x.lora.up.weight": torch.randn(4, 2)}, sdxl)
    with pytest.raises(InvalidArgument, match=r"text_encoder_2"):
        export_kohya_lora(sdxl, tmp_path / "out.safetensors")

    not_safetensors = tmp_path / "notes.safetensors"
    not_safetensors.write_text("hello")
    with pytest.raises(InvalidArgument, match=r"not a readable safetensors file"):
        export_kohya_lora(not_safetensors, tmp_path / "out.safetensors")

    with pytest.raises(InvalidArgument, match=r"already in the kohya layout"):
        export_kohya_lora(kohya_lora, tmp_path / "out.safetensors")
    with pytest.raises(NotFound, match=r"does not exist"):
        export_kohya_lora(tmp_path / "missing.safetensors", tmp_path / "out.safetensors")
    valid = tmp_path / "valid.safetensors"
    save_file({"unet.conv_in.lora.down.weight": torch.randn(2, 4),
               "unet.conv_in.lora.up.weight": torch.randn(4, 2)}, valid)
    with pytest.raises(InvalidArgument, match=r"`base_model_family` is 'sdxl'"):
        export_kohya_lora(valid, tmp_path / "out.safetensors", "sdxl")
    assert not (tmp_path / "out.safetensors").exists()


def test_alphas_follow_alpha_pattern_and_rslora(tmp_path):
    import json

    prefix = "unet.mid_block.attentions.0.transformer_blocks.0"
    sd = {}
    for module in ("attn2.to_k", "attn2.to_v"):
        sd[f"{prefix}.{module}.lora.down.weight"] = torch.randn(4, 8)
        sd[f"{prefix}.{module}.lora.up.weight"] = torch.randn(8, 4)
    kohya = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2"

    def export(config: dict) -> dict[str, torch.Tensor]:
        src = tmp_path / "in.safetensors"
        header = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}
        save_file(sd, src, metadata=header)
        return _read(export_kohya_lora(src, tmp_path / "out.safetensors"))[0]

    tensors = export({"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn2.to_k": 2}})
    assert tensors[f"{kohya}_to_k.alpha"].item() == 2 and tensors[f"{kohya}_to_v.alpha"].item() == 8
    # rsLoRA's scale alpha / sqrt(r) = 8 / 2 is kohya's alpha / r with alpha 16.
    tensors = export({"r": 4, "lora_alpha": 8, "use_rslora": True})
    assert tensors[f"{kohya}_to_v.alpha"].item() == 16
    with pytest.raises(InvalidArgument, match=r"DoRA"):
        export({"r": 4, "lora_alpha": 8, "use_dora": True})


SHARED_CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "configs"


@pytest.mark.parametrize("prediction, version, v2, spec, side", [
    (None, "sd_v2", "True", "epsilon", 512),  # SD-2.1-base as its configs are: epsilon at 512
    ("v_prediction", "sd_v2_v", "True", "v", 768),  # SD 2.1 (768): its scheduler predicts v
])
def test_sd21_base_is_not_labelled_v_prediction_768(tmp_path, prediction, version, v2, spec, side):
    import json
    import shutil

    from persona.services.models.base_models import read_model_configs
    from persona.services.models.kohya import family_for

    configs = tmp_path / "sd21"
    shutil.copytree(SHARED_CONFIGS / "sd21-base", configs)
    if prediction:
        scheduler = configs / "scheduler" / "scheduler_config.json"
        scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": prediction}))
    read = read_model_configs(configs)
    family = family_for(read.family, read.prediction_type)
    sd = {"unet.mid_block.attentions.0.proj_in.lora.down.weight": torch.randn(4, 8),
          "unet.mid_block.attentions.0.proj_in.lora.up.weight": torch.randn(8, 4)}
    src = tmp_path / "in.safetensors"
    save_file(sd, src)
    _, header = _read(export_kohya_lora(src, tmp_path / "out.safetensors", family,
                                        prediction_type=read.prediction_type, base_model_name="sd21"))
    assert (header["ss_base_model_version"], header["ss_v2"], header["modelspec.prediction_type"]) == (
        version, v2, spec)
    assert (header["ss_resolution"], header["modelspec.resolution"]) == (f"({side}, {side})", f"{side}x{side}")
    assert header["ss_sd_model_name"] == "sd21"


def test_hashes_are_the_ones_sd_scripts_precomputes(kohya_lora):
    """sshs_model_hash: sha256 of the tensor data (after the header); sshs_legacy_hash: 64 KiB at 1 MiB of the file
    written with only the ss_* keys, as sd-scripts' precalculate_safetensors_hashes does."""
    import hashlib

    from safetensors.torch import save

    tensors, header = _read(kohya_lora)
    data = kohya_lora.read_bytes()
    assert header["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    training_only = save(tensors, {k: v for k, v in header.items() if k.startswith("ss_")})
    assert header["sshs_legacy_hash"] == hashlib.sha256(training_only[0x100000:0x110000]).hexdigest()[:8]
