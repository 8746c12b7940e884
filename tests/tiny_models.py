"""Tiny random-weight stand-ins of the models the mask and evaluate services load, for the tests.

The real models (openai/clip-vit-large-patch14, CIDAS/clipseg-rd64-refined, IDEA-Research/grounding-dino-tiny,
facebook/sam-vit-base, CLIP and DINO for the metrics) cannot be downloaded where persona is tested. These builders
save stand-ins with the same architectures, a few layers wide, with `save_pretrained`, so the services load them
through the very `from_pretrained` path they use for the real ones. Their weights are random and seeded (every
build is the same model): what they compute is arbitrary, only the shapes and the plumbing are meaningful. Each
builds and saves in well under a second on a CPU.

Processors are saved with small input sizes matching the tiny models (32–128 px instead of 224–1024), which keeps a
forward pass in milliseconds; the pre/post-processing code that runs is the real one. transformers 5 without
torchvision builds the `*Pil` image processors instead, with a warning; they save the same processor_config.json.
The CLIP-family stand-ins carry the real CLIP tokenizer shipped with the train service, so prompts tokenize as
with the released models. (The built-in `tiny` base model is a product feature: services/models/base_models.py.)
"""
from __future__ import annotations

import shutil
from pathlib import Path

# CLIP_TOKENIZER_DIR: the public openai/clip-vit-large-patch14 tokenizer shipped with persona (services/models);
# CLIPSeg tokenizes with it too. TINY_SEED: every tiny model's seed, so each build gives the same weights.
from persona.services.models.builders import CLIP_TOKENIZER_DIR, TINY_SEED

# --- mask: P3S's CLIP vision tower, CLIPSeg, GroundingDINO, SAM ---------------------------------------------------


def tiny_clip_vision(folder: str | Path) -> Path:
    """Saves a seeded random CLIP vision model (64 px input, 8 px patches: an 8×8 grid, hidden 32, 2 layers) and
    its image processor into `folder`: P3S's `ClipPatchFeatures(folder)` loads it offline."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIPVisionModel(CLIPVisionConfig(
            image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu"))
    model.save_pretrained(folder, safe_serialization=True)
    # CLIP's released normalisation; size and crop match the input so the processor alone would also fit.
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


# BERT special tokens plus the words GroundingDINO queries are made of: DreamBench's class names,
# the article and the period that ends each phrase. Anything else tokenizes to [UNK], which is harmless.
BERT_VOCAB = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "an", "the", "photo", "of",
    "dog", "cat", "backpack", "stuffed", "animal", "bowl", "can", "candle", "clock", "sneaker", "toy",
    "boot", "glasses", "cartoon", "teapot", "vase", "person", "face", "object",
)


def tiny_clipseg(folder: Path) -> Path:
    """Saves a random-weight CLIPSeg (64 px, 2 layers, real CLIP tokenizer) and its processor into `folder`.

    A stand-in for CIDAS/clipseg-rd64-refined in tests and offline demos; it segments nothing in particular.
    """
    import torch
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    folder = Path(folder)
    config = CLIPSegConfig(
        # The real CLIP vocabulary and context length, so the shipped tokenizer's ids fit.
        text_config=dict(vocab_size=49408, max_position_embeddings=77, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=1),
        vision_config=dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
        # The decoder reads the outputs of these vision layers, 0-based (the real model: 3, 6, 9 of 12).
        extract_layers=[0, 1],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIPSegForImageSegmentation(config).eval()
    # The real processor's normalisation, at the tiny model's input size.
    image_processor = ViTImageProcessor(size={"height": 64, "width": 64}, do_resize=True, do_normalize=True,
                                        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor = CLIPSegProcessor(image_processor=image_processor,
                                 tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR))
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    _copy_clip_vocab(folder)
    return folder


def tiny_grounding_dino(folder: Path) -> Path:
    """Saves a random-weight GroundingDINO (Swin + BERT, 2 decoder layers, 128 px) and its processor into `folder`.

    A stand-in for IDEA-Research/grounding-dino-tiny in tests and offline demos; its boxes are arbitrary. The
    BERT tokenizer is built from a small vocabulary (`BERT_VOCAB`) written into `folder`.
    """
    import torch
    from transformers import (BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(BERT_VOCAB) + "\n")
    # from_pretrained reads vocab.txt in transformers 4 and 5 alike (5's constructor no longer takes vocab_file).
    tokenizer = BertTokenizer.from_pretrained(folder, do_lower_case=True)
    config = GroundingDinoConfig(
        backbone_config=dict(model_type="swin", image_size=128, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                             num_heads=[1, 1, 1, 1], window_size=4, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=len(BERT_VOCAB), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
        d_model=32,  # GroupNorm(32, d_model) in the input projections
        num_queries=10,
        encoder_layers=1,
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        # At least two: the decoder's per-layer box refinement is only exercised with more than one layer.
        decoder_layers=2,
        decoder_ffn_dim=32,
        decoder_attention_heads=2,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = GroundingDinoForObjectDetection(config).eval()
    # 128 px: the fourth feature level (stride 64) must be at least 2x2, or its GroupNorm sees one value per group.
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def tiny_sam(folder: Path) -> Path:
    """Saves a random-weight SAM (64 px ViT, 2 layers) and its processor into `folder`.

    A stand-in for facebook/sam-vit-base in tests and offline demos; its masks are arbitrary.
    """
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    folder = Path(folder)
    # 64 px images in 16 px patches: a 4x4 image embedding, as the real 1024 px model has 64x64.
    config = SamConfig(
        vision_config=dict(image_size=64, patch_size=16, hidden_size=32, output_channels=16, num_hidden_layers=2,
                           num_attention_heads=2, window_size=2, global_attn_indexes=[1], mlp_dim=64,
                           # SAM's vision default (1e-10) gives near-zero weights and all-True masks.
                           num_pos_feats=8, initializer_range=0.02),
        prompt_encoder_config=dict(image_size=64, patch_size=16, hidden_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = SamModel(config).eval()
    image_processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    processor = SamProcessor(image_processor=image_processor)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def _copy_clip_vocab(folder: Path) -> None:
    # transformers 5 saves only tokenizer.json; 4.x's CLIPTokenizer reads vocab.json and merges.txt.
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).exists():
            shutil.copyfile(CLIP_TOKENIZER_DIR / name, folder / name)


# --- evaluate: CLIP and DINO for the metrics (32 px inputs) --------------------------------------------------------

# Input side and patch size of both tiny vision towers: 4x4 patches + CLS.
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
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
