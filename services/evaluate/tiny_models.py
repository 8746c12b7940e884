"""Tiny random-weight CLIP and DINO models for tests: saved with save_pretrained so the real loading path runs.

Built from small configs in well under a second, seeded so every build is the same model. The CLIP one
carries the real CLIP tokenizer (shipped with the train service), so prompts tokenize as with
openai/clip-vit-base-patch32; both use 32 px inputs to stay fast on a CPU.
"""
from __future__ import annotations

from pathlib import Path

from persona.services.models.base_models import CLIP_TOKENIZER_DIR

# Input side and patch size of both tiny vision towers: 4x4 patches + CLS.
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
TINY_SEED = 0
# CLIP's and ImageNet's normalisation constants, as in the released processors.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


def tiny_clip(folder: Path) -> Path:
    """Saves a seeded tiny CLIPModel and its CLIPProcessor (real tokenizer) into `folder`; returns `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           hidden_act="quick_gelu"),
        projection_dim=16,
    )
    # fork_rng: seed the weights without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=_image_processor("clip"),
                              tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR))
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_dino(folder: Path) -> Path:
    """Saves a seeded tiny ViTModel (no pooler, like facebook/dino-vits16) and its image processor into `folder`."""
    import torch
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = ViTModel(config, add_pooling_layer=False)
    folder = Path(folder)
    model.save_pretrained(folder)
    _image_processor("vit").save_pretrained(folder)
    return folder


def _image_processor(kind: str):
    """The PIL image processor (what transformers 5 gives without torchvision anyway), named to avoid its warning."""
    if kind == "clip":
        try:
            from transformers import CLIPImageProcessorPil as cls
        except ImportError:  # transformers 4.x: the slow processor is the PIL one
            from transformers import CLIPImageProcessor as cls
        # Resize the short side, centre-crop: CLIP's own preprocessing at the tiny size.
        return cls(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE,
                                                                     "width": TINY_IMAGE_SIZE},
                   image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    try:
        from transformers import ViTImageProcessorPil as cls
    except ImportError:
        from transformers import ViTImageProcessor as cls
    return cls(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
               image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD)
