"""Export of a LoRA from the diffusers/peft layout to the kohya sd-scripts layout (A1111, Forge, ComfyUI).

Our LoRA method saves `pytorch_lora_weights.safetensors` the way diffusers does: one key per matrix,
named by the module path, and the peft adapter config as JSON under the header key `lora_adapter_metadata`:

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight   [r, in]
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight     [out, r]
    header: lora_adapter_metadata = {"unet.r": 4, "unet.lora_alpha": 8, ...}

Most Stable Diffusion UIs only read the kohya layout, in which kohya trains SD 1.x/2.x on the diffusers UNet
and names each module by its diffusers path with every `.` turned into `_`, behind a prefix per model, and
keeps the scale (alpha / rank) as a scalar tensor per module instead of in a config:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  [r, in]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    [out, r]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             []  (float32)
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                  (text encoder)

Kohya's own metadata (`ss_*`, and the SAI `modelspec.*` keys sd-scripts also writes) goes in the header, all
values strings as safetensors requires. The weights are copied, not recomputed, so the export is exact:
diffusers `load_lora_weights` detects the layout (every key starts with `lora_unet_`/`lora_te_`), turns the
names back (`_convert_non_diffusers_lora_to_diffusers`) and applies alpha / rank, giving the same model as
the diffusers-layout file. The diffusers header is not carried over: diffusers would read it as the config
of the kohya keys.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from persona.services.runtime.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from torch import Tensor

# diffusers component -> kohya prefix. SD 1.x/2.x have one text encoder; SDXL's second (`text_encoder_2`,
# kohya `lora_te2_`) would also need the sgm block renumbering and is not exported.
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# Endings of a LoRA matrix in the layouts diffusers writes: diffusers (`convert_state_dict_to_diffusers`),
# its older text-encoder spelling, and plain peft (`get_peft_model_state_dict` saved as is).
_SUFFIXES = {
    ".lora.down.weight": DOWN,
    ".lora.up.weight": UP,
    ".lora_linear_layer.down.weight": DOWN,
    ".lora_linear_layer.up.weight": UP,
    ".lora_A.weight": DOWN,
    ".lora_B.weight": UP,
}
# Header key under which diffusers `save_lora_weights(..., *_lora_adapter_metadata=)` stores the peft config.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


# What kohya writes for each base model: ss_base_model_version as sd-scripts'
# model_util.get_model_version_str_for_sd1_sd2, modelspec.architecture as the SAI model spec.
# `tiny` (our test model) has the SD 1.x layout and text encoder, so tools that check the version accept it.
_FAMILIES = {
    "sd15": dict(version="sd_v1", architecture="stable-diffusion-v1", v2=False, prediction="epsilon", res=512),
    "sd21-base": dict(version="sd_v2", architecture="stable-diffusion-v2-512", v2=True, prediction="epsilon",
                      res=512),
    "sd21": dict(version="sd_v2_v", architecture="stable-diffusion-v2-768-v", v2=True, prediction="v_prediction",
                 res=768),
    "tiny": dict(version="sd_v1", architecture="stable-diffusion-v1", v2=False, prediction="epsilon", res=64),
}
FAMILIES = tuple(_FAMILIES)


def family_for(base_model_family: str, prediction_type: str) -> str:
    """The `_FAMILIES` entry of a base model from what its configs say (base_models.ModelConfigs): SD 2.x is
    the 768 px v-prediction model only when its scheduler predicts v; SD-2.1-base predicts epsilon at 512."""
    if base_model_family == "tiny":
        return "tiny"
    if base_model_family.startswith("sd2"):
        return "sd21" if prediction_type == "v_prediction" else "sd21-base"
    return "sd15"


def kohya_module_name(diffusers_module: str) -> str:
    """`unet.down_blocks.0...attn1.to_q` -> `lora_unet_down_blocks_0_..._attn1_to_q`, as sd-scripts names it."""
    component, _, path = diffusers_module.partition(".")
    if component not in PREFIXES or not path:
        raise InvalidArgument(
            f"LoRA module `{diffusers_module}` belongs to no known model: expected a name starting with "
            f"{' or '.join(p + '.' for p in PREFIXES)} (SD 1.x/2.x; SDXL's text_encoder_2 is not supported)")
    if component == "text_encoder" and not path.startswith("text_model."):
        # transformers >= 5 flattened CLIPTextModel (`encoder.layers…`, no `text_model.`); kohya, A1111 and
        # ComfyUI name the modules of the original CLIP checkpoint, which sit under `text_model.`.
        path = "text_model." + path
    return PREFIXES[component] + path.replace(".", "_")


def split_lora_keys(diffusers_state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Groups the matrices by module: {"unet.…to_q": {DOWN: A, UP: B}}; rejects anything that is not LoRA."""
    modules: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in diffusers_state_dict.items():
        for suffix, role in _SUFFIXES.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[role] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(f"`{k}`" for k in sorted(unknown)[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidArgument(
            f"{len(unknown)} key(s) are not LoRA down/up matrices: {shown}{more}; expected keys ending in "
            f"`.lora.down.weight`/`.lora.up.weight` (or peft `.lora_A.weight`/`.lora_B.weight`). "
            f"DoRA, LoRA biases and full weights have no kohya networks.lora equivalent")
    if not modules:
        raise InvalidArgument("the file holds no tensors: expected a LoRA saved by the lora method")
    for module, pair in modules.items():
        missing = [name for name, role in (("down", DOWN), ("up", UP)) if role not in pair]
        if missing:
            raise InvalidArgument(f"LoRA module `{module}` has no {missing[0]} matrix: the file is incomplete")
        down, up = pair[DOWN], pair[UP]
        if down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0]:
            raise InvalidArgument(
                f"LoRA module `{module}` has down {tuple(down.shape)} and up {tuple(up.shape)}: "
                f"the up matrix's second dimension must equal the down matrix's first (the rank)")
    return modules


def to_kohya_state_dict(
    diffusers_state_dict: Mapping[str, Tensor],
    alpha: float | None,
    *,
    module_alphas: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    """Renames a diffusers-layout LoRA to kohya keys and adds each module's `.alpha`.

    `alpha` is the peft `lora_alpha` (scale = alpha / rank); None means alpha = rank (scale 1), which is what
    a diffusers file without adapter metadata loads as. `module_alphas` overrides it per diffusers module
    path (e.g. `unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q`), for peft alpha_pattern.
    """
    import torch

    out: dict[str, Tensor] = {}
    for module, pair in sorted(split_lora_keys(diffusers_state_dict).items()):
        name = kohya_module_name(module)
        if name + DOWN in out:
            raise InvalidArgument(f"LoRA module `{module}` appears twice (in two layouts): keep one")
        rank = pair[DOWN].shape[0]
        value = (module_alphas or {}).get(module, alpha)
        value = float(rank if value is None else value)
        if not math.isfinite(value) or value <= 0:
            raise InvalidArgument(f"alpha of LoRA module `{module}` is {value}: use a positive number, e.g. the rank")
        out[name + DOWN] = pair[DOWN].contiguous()
        out[name + UP] = pair[UP].contiguous()
        # kohya keeps alpha as a 0-d float buffer; loaders read it with .item().
        out[name + ALPHA] = torch.tensor(value, dtype=torch.float32)
    return out


def read_adapter_metadata(header: Mapping[str, str] | None) -> dict[str, dict]:
    """The peft config per component ({"unet": {"r": 4, "lora_alpha": 8, ...}}) from a diffusers LoRA header."""
    raw = (header or {}).get(ADAPTER_METADATA_KEY)
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"header `{ADAPTER_METADATA_KEY}` is not JSON ({e}): the file was not written by "
                              f"diffusers save_lora_weights") from e
    if not isinstance(flat, dict):
        raise InvalidArgument(f"header `{ADAPTER_METADATA_KEY}` is not a JSON object: the file is damaged")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def module_alphas_from_metadata(modules: list[str], configs: Mapping[str, Mapping]) -> dict[str, float]:
    """Kohya alpha per module from the peft configs, so that kohya's alpha / rank equals peft's scale."""
    alphas: dict[str, float] = {}
    for module in modules:
        component, _, path = module.partition(".")
        config = configs.get(component)
        if not config:
            continue
        if config.get("use_dora"):
            raise InvalidArgument(f"the `{component}` adapter is DoRA (use_dora): kohya networks.lora has no "
                                  f"magnitude vector, so it cannot be exported")
        pattern = _match_pattern(config.get("alpha_pattern") or {}, path)
        alpha = (config.get("alpha_pattern") or {})[pattern] if pattern else config.get("lora_alpha")
        if alpha is None:
            continue
        if config.get("use_rslora"):
            # rsLoRA scales by alpha / sqrt(r); kohya always by alpha / r, so alpha becomes alpha * sqrt(r).
            pattern = _match_pattern(config.get("rank_pattern") or {}, path)
            rank = (config.get("rank_pattern") or {})[pattern] if pattern else config.get("r")
            alpha = float(alpha) * math.sqrt(float(rank))
        alphas[module] = float(alpha)
    return alphas


def _match_pattern(patterns: Mapping[str, object], path: str) -> str | None:
    # As peft.utils.other.get_pattern_key: a pattern names the module path's tail.
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", path):
            return pattern
    return None


def kohya_metadata(
    kohya_state_dict: Mapping[str, Tensor],
    base_model_family: str = "sd15",
    *,
    prediction_type: str | None = None,
    title: str | None = None,
    resolution: int | None = None,
    base_model_name: str = "",
) -> dict[str, str]:
    """The header sd-scripts writes for a LoRA, so UIs show rank/alpha/base model and filter by version.

    `resolution`: the side the LoRA was trained at (default: the family's); `base_model_name`: what it was trained
    on (`ss_sd_model_name`, as kohya's --pretrained_model_name_or_path)."""
    if base_model_family not in _FAMILIES:
        raise InvalidArgument(f"`base_model_family` is {base_model_family!r}: use one of {', '.join(FAMILIES)}")
    family = dict(_FAMILIES[base_model_family])
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise InvalidArgument(f"`prediction_type` is {prediction_type!r}: use epsilon or v_prediction")
        family["prediction"] = prediction_type
        if family["v2"]:
            family["version"] = "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"
    ranks = {v.shape[0] for k, v in kohya_state_dict.items() if k.endswith(DOWN)}
    alphas = {float(v) for k, v in kohya_state_dict.items() if k.endswith(ALPHA)}
    unet = any(k.startswith(PREFIXES["unet"]) for k in kohya_state_dict)
    te = any(k.startswith(PREFIXES["text_encoder"]) for k in kohya_state_dict)
    side = int(resolution or family["res"])
    return {
        "ss_network_module": "networks.lora",
        # resize_lora.py's spelling when modules differ.
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": _number(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": family["version"],
        "ss_v2": str(family["v2"]),
        "ss_network_train_unet_only": str(unet and not te),
        "ss_network_train_text_encoder_only": str(te and not unet),
        "ss_output_name": title or "",
        # sd-scripts writes the tuple of --resolution as Python prints it.
        "ss_resolution": f"({side}, {side})",
        "ss_sd_model_name": base_model_name,
        "ss_training_comment": "exported by persona from a diffusers/peft LoRA",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family['architecture']}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or "persona LoRA",
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": "v" if family["prediction"] == "v_prediction" else "epsilon",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }


def safetensors_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as sd-scripts precomputes them (train_util.
    precalculate_safetensors_hashes) for A1111's additional-networks and the UIs that index LoRAs by them: the file
    saved with only the `ss_*` keys, then sha256 of everything after its header (new) and the first 8 hex digits
    of sha256 of 64 KiB at 1 MiB (legacy)."""
    import hashlib

    from safetensors.torch import save

    data = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[header_end:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def export_kohya_lora(
    diffusers_lora_file: Path,
    out_file: Path,
    base_model_family: str = "sd15",
    *,
    prediction_type: str | None = None,
    title: str | None = None,
    resolution: int | None = None,
    base_model_name: str = "",
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes `diffusers_lora_file` (our lora method's output) as a kohya-layout LoRA at `out_file`.

    Alphas come from the peft config diffusers put in the header (lora_alpha, alpha_pattern, rsLoRA),
    or equal the rank when there is none, so the kohya file loads at the same scale. The file appears whole
    or not at all (written to a temporary sibling, then renamed), so a reader never sees half an export.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    source, out_file = Path(diffusers_lora_file), Path(out_file)
    if not source.is_file():
        raise NotFound(f"`diffusers_lora_file` {source} does not exist: pass the pytorch_lora_weights.safetensors "
                       f"that LoRA training wrote")
    if source.resolve() == out_file.resolve():
        raise InvalidArgument(f"`out_file` is the input file {source}: write the kohya file elsewhere")
    try:
        with safe_open(str(source), framework="pt", device="cpu") as f:
            header = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidArgument(f"`diffusers_lora_file` {source} is not a readable safetensors file ({e})") from e
    if tensors and all(k.startswith(tuple(PREFIXES.values()) + ("lora_te1_", "lora_te2_")) for k in tensors):
        raise InvalidArgument(f"`diffusers_lora_file` {source} is already in the kohya layout: use it as it is")

    configs = read_adapter_metadata(header)
    modules = list(split_lora_keys(tensors))
    state_dict = to_kohya_state_dict(tensors, None, module_alphas=module_alphas_from_metadata(modules, configs))
    metadata = kohya_metadata(state_dict, base_model_family, prediction_type=prediction_type, title=title,
                              resolution=resolution, base_model_name=base_model_name)
    metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    metadata.update(safetensors_hashes(state_dict, metadata))

    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata=metadata)
        os.replace(tmp, out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_file
