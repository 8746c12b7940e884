"""A trained CustomContrast encoder on disk: the MFI encoder and the UNet's visual K'/V' in one safetensors file,
its shape and provenance in a JSON file beside it.

    ENCODER/
      mfi_encoder.safetensors   encoder.* (MFIEncoder) and visual_kv.<layer>.to_{k,v}_image.weight (Eq. 3's W'_k, W'_v)
      mfi_encoder.json          {"format": 1, "config": {MFIEncoderConfig}, "base_model_sha256": …,
                                 "image_encoder": …, "scale": λ}

The encoder only fits the base model it was trained on (its K'/V' are that UNet's cross-attention widths, its word
tokens that text encoder's embeddings), so loading checks the base model's content hash and refuses another one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from persona.services.runtime.errors import InvalidArgument

from .encoder import MFIEncoder, MFIEncoderConfig

WEIGHTS_FILE = "mfi_encoder.safetensors"
META_FILE = "mfi_encoder.json"
FORMAT = 1


@dataclass(frozen=True)
class EncoderMeta:
    config: MFIEncoderConfig
    base_model_sha256: str
    image_encoder: str  # the CLIP image encoder it reads (a hub id or folder), as the training run named it
    scale: float = 1.0  # λ of Eq. 3


def save_encoder(folder: str | Path, encoder: MFIEncoder, processors: nn.ModuleList, meta: EncoderMeta) -> Path:
    """Writes both files (each atomically: temp + rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"encoder.{k}": v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    tensors |= {f"visual_kv.{k}": v.detach().contiguous().cpu() for k, v in processors.state_dict().items()}
    temp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(temp))
    temp.replace(folder / WEIGHTS_FILE)
    record = {"format": FORMAT, "config": asdict(meta.config), "base_model_sha256": meta.base_model_sha256,
              "image_encoder": meta.image_encoder, "scale": meta.scale}
    temp = folder / f".{META_FILE}.tmp"
    temp.write_text(json.dumps(record, indent=1))
    temp.replace(folder / META_FILE)
    return folder


def read_encoder_meta(folder: str | Path) -> EncoderMeta:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise InvalidArgument(f"`encoder` {folder} holds no {META_FILE}: name a folder written by "
                              "`persona-cli encoder train`")
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            raise InvalidArgument(f"`encoder` {path} is format {record.get('format')!r}; this persona reads "
                                  f"format {FORMAT}")
        known = {f.name for f in fields(MFIEncoderConfig)}
        config = MFIEncoderConfig(**{k: v for k, v in record["config"].items() if k in known})
        return EncoderMeta(config, record["base_model_sha256"], record["image_encoder"], float(record["scale"]))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise InvalidArgument(f"`encoder` {path} is not a readable encoder record ({error!r}): write it again "
                              "with `persona-cli encoder train`") from None


def read_encoder(folder: str | Path, base_model_sha256: str) -> tuple[MFIEncoder, dict, EncoderMeta]:
    """The encoder of `folder` and its visual K'/V' (the processors' state dict, keys `<layer>.to_{k,v}_image.weight`),
    refused when it was trained on another base model than the one with this content hash."""
    meta = read_encoder_meta(folder)
    if meta.base_model_sha256 != base_model_sha256:
        raise InvalidArgument(f"`encoder` {folder} was trained on base model {meta.base_model_sha256[:12]}…, not on "
                              f"this one ({base_model_sha256[:12]}…): pass the encoder's base model (--base-model) "
                              "or an encoder trained on this one")
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    encoder = MFIEncoder(meta.config)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")})
    visual_kv = {k.removeprefix("visual_kv."): v for k, v in tensors.items() if k.startswith("visual_kv.")}
    return encoder, visual_kv, meta


def load_encoder(folder: str | Path, base_model_sha256: str, processors: nn.ModuleList) -> tuple[MFIEncoder,
                                                                                                 EncoderMeta]:
    """The encoder of `folder`, with its K'/V' loaded into `processors` (from `install_decoupled_processors` on the
    base model's UNet); refused when it was trained on another base model."""
    meta = read_encoder_meta(folder)
    if meta.config.num_cross_attention_layers != len(processors):
        raise InvalidArgument(f"`encoder` {folder} feeds {meta.config.num_cross_attention_layers} cross-attention "
                              f"layers, the UNet has {len(processors)}")
    encoder, visual_kv, meta = read_encoder(folder, base_model_sha256)
    processors.load_state_dict(visual_kv)
    for processor in processors:
        processor.scale = meta.scale
    return encoder, meta
