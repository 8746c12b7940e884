"""Evaluation metrics of subject-driven generation: DreamBench, SID, P3S and CustomContrast, each defined once.

Every metric is a pure function over L2-normalised embeddings (numpy arrays or CPU tensors, one row per
image or text); the embedders that make those rows (`ClipEmbedder`, `DinoEmbedder`) and the segment helpers
that cut reference photos by their subject masks sit beside them. Keeping the arithmetic apart from the
models lets the unit tests check every formula against hand-computed values, and lets the evaluate domain
embed each reference once and reuse it for every prompt.

Readings chosen where the papers leave room:

- DreamBench (Ruiz et al. 2023). CLIP-I and DINO are the mean cosine over *all* generated x reference
  pairs (`clip_i`, `dino`); DINO uses the CLS token of DINO ViT-S/16 (`facebook/dino-vits16`), CLIP uses
  ViT-B/32 (`openai/clip-vit-base-patch32`). CLIP-T is the mean cosine between each generated image and its
  prompt, reported as the **raw cosine** in [-1, 1] as DreamBench does — neither x100 nor CLIPScore's
  2.5·max(cos, 0).
- SID (Kim et al. 2024), Eq. 1-3, with G the generated images, R the reference photos, s(r) the subject mask
  and Avg the mean over all N x M (reference, generated) pairs:
    SA  = Avg cos(f_i(r_n ⊙ s(r_n)),       f_i(g_m))                     `subject_alignment`
    NSD = 1 - Avg cos(f_i(r_n ⊙ (1 - s(r_n))), f_i(g_m))                 `non_subject_disentanglement`
    TA  = Avg cos(f_t(p without [v]),       f_i(g_m))                    `text_alignment`
  Only the *references* are segmented; the generated images enter whole, as the equations write them.
  `r ⊙ s(r)` multiplies the pixels by a 0/1 mask, so what is masked out becomes **black** (0, 0, 0): that is
  the fill of both segment helpers. `subject_segment` also crops to the mask's bounding box, pads it to a
  square centred on the subject and resizes it (224 px, CLIP's input): CLIP's processor resizes the short
  side and centre-crops, which would cut an off-centre subject out of a non-square photo; the crop makes the
  subject fill the view as it does in the generated images. `crop=False` gives the literal full-frame
  `r ⊙ s(r)`. The non-subject segment stays full-frame: its layout is what leaks. TA uses the prompt with
  the identifier token removed (`strip_identifier`); it is CLIP-T over that text, so it calls `clip_t`.
- P3S (CLIP-Iv, DINO-v): the variance of the per-generated-image scores, each image's score being its mean
  cosine to the references (`per_image_scores`). **Population** variance (divide by n, numpy's default):
  the images generated are the whole set being described, not a sample to estimate from, and one image
  gives 0 rather than undefined. variance([1, 3]) = 1.
- CustomContrast (R-CI/E-CI/R-DI/E-DI): CLIP-I / DINO between subject segments of generated and reference
  images (embed `subject_segment`s of both, then `clip_i` / `dino`), averaged separately over
  reconstruction and editing prompts (`split_scores`; the prompt kinds come from `prompts.py`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from persona.services.runtime.devices import torch_device
from persona.services.runtime.errors import InvalidArgument
# The project's one model-folder resolver; its transformers defaults (config.json, weights, .bin fallback)
# fit the embedders (and it stays importable from here).
from persona.services.runtime.model_loading import loading_models
from persona.services.runtime.models import resolve_model_folder

# DreamBench's models: CLIP ViT-B/32 for CLIP-I / CLIP-T, DINO ViT-S/16 for DINO.
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
# What `r ⊙ s(r)` leaves where the mask is 0.
SEGMENT_FILL = (0, 0, 0)
# Side of a subject segment: CLIP ViT-B/32's input size, so the processor does not resize it again.
SEGMENT_SIZE = 224
RECONSTRUCTION = "reconstruction"
EDITING = "editing"
KINDS = (RECONSTRUCTION, EDITING)

# Images embedded per forward pass: bounds memory whatever the number of images.
_BATCH = 32


# ---------------------------------------------------------------------------------------------------------
# Pure metric functions over embeddings
# ---------------------------------------------------------------------------------------------------------

def cosine_matrix(a: Any, b: Any, field_a: str = "generated", field_b: str = "references") -> np.ndarray:
    """(n, m) cosine similarities between the rows of `a` (n, d) and `b` (m, d); rows are normalised here."""
    a, b = _rows(a, field_a), _rows(b, field_b)
    if a.shape[1] != b.shape[1]:
        raise InvalidArgument(
            f"`{field_a}` embeddings have {a.shape[1]} dimensions but `{field_b}` have {b.shape[1]}: "
            "embed both with the same model")
    return a @ b.T


def mean_pairwise_cosine(a: Any, b: Any, field_a: str = "generated", field_b: str = "references") -> float:
    """Mean cosine over all (row of `a`, row of `b`) pairs: the average both CLIP-I/DINO and SID's Avg take."""
    return float(cosine_matrix(a, b, field_a, field_b).mean())


def per_image_scores(generated: Any, references: Any) -> np.ndarray:
    """(M,) each generated image's mean cosine to all references: the per-image CLIP-I / DINO score."""
    return cosine_matrix(generated, references).mean(axis=1)


def clip_i(generated: Any, references: Any) -> float:
    """DreamBench CLIP-I: mean cosine over generated x reference CLIP image embeddings."""
    return mean_pairwise_cosine(generated, references)


def dino(generated: Any, references: Any) -> float:
    """DreamBench DINO: mean cosine over generated x reference DINO CLS embeddings."""
    return mean_pairwise_cosine(generated, references)


def clip_t(generated: Any, prompts: Any) -> float:
    """DreamBench CLIP-T: mean raw cosine (not x100, not 2.5·max(cos, 0)) between each image and its prompt.

    `prompts` is one text embedding (d,) or (1, d) shared by all images, or (M, d): row m is image m's prompt.
    """
    images = _rows(generated, "generated")
    texts = _rows(prompts, "prompts")
    if images.shape[1] != texts.shape[1]:
        raise InvalidArgument(
            f"`generated` embeddings have {images.shape[1]} dimensions but `prompts` have {texts.shape[1]}: "
            "embed images and prompts with the same CLIP model")
    if len(texts) == 1:
        return float((images @ texts[0]).mean())
    if len(texts) != len(images):
        raise InvalidArgument(
            f"`prompts` has {len(texts)} embeddings for {len(images)} images: pass one prompt, or one per image")
    return float(np.einsum("md,md->m", images, texts).mean())


def variance(scores: Sequence[float]) -> float:
    """P3S's CLIP-Iv / DINO-v: the population variance (divide by n) of per-image scores; [1, 3] gives 1."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise InvalidArgument("`scores` is empty: pass at least one per-image score")
    # Shifted by the first score: the same variance, exactly 0 for identical scores, less rounding otherwise.
    return float((values - values[0]).var(ddof=0))


def subject_alignment(generated: Any, reference_subjects: Any) -> float:
    """SID Eq. 1: mean cosine over (reference subject segment, whole generated image) pairs."""
    return mean_pairwise_cosine(generated, reference_subjects, "generated", "reference_subjects")


def non_subject_disentanglement(generated: Any, reference_non_subjects: Any) -> float:
    """SID Eq. 2: 1 - mean cosine over (reference non-subject segment, whole generated image) pairs."""
    return 1.0 - mean_pairwise_cosine(generated, reference_non_subjects, "generated", "reference_non_subjects")


def text_alignment(generated: Any, stripped_prompt: Any) -> float:
    """SID Eq. 3: CLIP-T against the prompt with the identifier removed (embed `strip_identifier(prompt, token)`)."""
    return clip_t(generated, stripped_prompt)


@dataclass(frozen=True)
class SplitScores:
    """CustomContrast's split: the mean score over reconstruction prompts (R-*) and over editing prompts (E-*)."""

    # Mean over scores of kind "reconstruction"; None when there were none.
    reconstruction: float | None
    # Mean over scores of kind "editing"; None when there were none.
    editing: float | None


def split_scores(scores: Sequence[float], kinds: Sequence[str]) -> SplitScores:
    """Means of `scores` by their `kinds` ("reconstruction" | "editing"), e.g. R-CI and E-CI from CLIP-I scores."""
    values = [float(s) for s in scores]
    kinds = list(kinds)
    if len(values) != len(kinds):
        raise InvalidArgument(f"`kinds` has {len(kinds)} entries for {len(values)} scores: pass one kind per score")
    unknown = sorted({k for k in kinds if k not in KINDS})
    if unknown:
        raise InvalidArgument(f"`kinds` has {', '.join(map(repr, unknown))}: each must be one of {', '.join(KINDS)}")

    def mean(kind: str) -> float | None:
        picked = [v for v, k in zip(values, kinds) if k == kind]
        return math.fsum(picked) / len(picked) if picked else None

    return SplitScores(reconstruction=mean(RECONSTRUCTION), editing=mean(EDITING))


def strip_identifier(prompt: str, token: str) -> str:
    """The prompt without the identifier: ("a sks dog on the beach", "sks") -> "a dog on the beach" (SID's TA).

    Removes every whole-word occurrence (so `sks` stays inside `sksx`), then tidies the spaces left behind.
    """
    token = (token or "").strip()
    if not token:
        raise InvalidArgument("`token` is empty: pass the identifier used in the prompts, e.g. sks")
    # Not preceded or followed by a word character: works for `sks` and for bracketed tokens like `<sks>`.
    text = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt)
    text = re.sub(r"\s+", " ", text).strip()
    # "a sks, dog" would leave "a , dog".
    return re.sub(r" ([,.;:!?])", r"\1", text)


def _rows(x: Any, field: str) -> np.ndarray:
    """`x` as float64 (n, d) with unit rows; a 1-D vector is one row."""
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidArgument(f"`{field}` embeddings have shape {arr.shape}: pass at least one (n, d) row")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise InvalidArgument(f"`{field}` has a zero or non-finite embedding: cosine is undefined for it")
    return arr / norms


# ---------------------------------------------------------------------------------------------------------
# Segments of a reference photo by its subject mask
# ---------------------------------------------------------------------------------------------------------

def subject_segment(image: Any, mask: Any, size: int | None = SEGMENT_SIZE, crop: bool = True,
                    fill: tuple[int, int, int] = SEGMENT_FILL, empty_ok: bool = False) -> Image.Image:
    """SID's r ⊙ s(r): the subject's pixels, the rest `fill` (black), cropped to the mask's box, square, resized.

    With `crop` the bounding box of the mask is padded with `fill` to a square centred on the subject and
    resized to `size` x `size` (None keeps the square's side); without it, the full frame is returned as is.
    An empty mask is refused, unless `empty_ok`: then the segment is what r ⊙ s(r) is with s(r) = 0, all `fill`
    (a generated image in which the segmenter found no subject: it scores as an image without the subject).
    """
    pixels, subject = _image_and_mask(image, mask)
    if not subject.any():
        if not empty_ok:
            raise InvalidArgument("`mask` selects no pixel: the subject segment is empty; pass the subject's mask")
        side = size if crop and size is not None else None
        shape = (side, side) if side else pixels.shape[:2] if not crop else (min(pixels.shape[:2]),) * 2
        return Image.fromarray(np.full((*shape, 3), fill, dtype=np.uint8))
    out = np.where(subject[..., None], pixels, np.asarray(fill, dtype=np.uint8))
    if not crop:
        return Image.fromarray(out)
    ys, xs = np.nonzero(subject)
    box = out[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape[:2]
    side = max(h, w)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = fill
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = box
    segment = Image.fromarray(square)
    if size is not None and size != side:
        # Bicubic, as CLIP's own preprocessing resizes.
        segment = segment.resize((size, size), Image.Resampling.BICUBIC)
    return segment


def non_subject_segment(image: Any, mask: Any, fill: tuple[int, int, int] = SEGMENT_FILL) -> Image.Image:
    """SID's r ⊙ (1 - s(r)): the full frame with the subject's pixels set to `fill` (black)."""
    pixels, subject = _image_and_mask(image, mask)
    return Image.fromarray(np.where(subject[..., None], np.asarray(fill, dtype=np.uint8), pixels))


def _image_and_mask(image: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(_as_rgb(image, "image"))
    subject = _as_mask(mask)
    if subject.shape != pixels.shape[:2]:
        raise InvalidArgument(
            f"`mask` is {subject.shape[1]}x{subject.shape[0]} but its image is {pixels.shape[1]}x{pixels.shape[0]}: "
            "pass the mask made for this image")
    return pixels, subject


def _as_mask(mask: Any) -> np.ndarray:
    """A boolean (H, W) subject mask from a bool/0-1/0-255 array or a PIL image (white = subject)."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InvalidArgument(f"`mask` has shape {arr.shape}: pass one (H, W) mask per image")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.max() > 1:
        return arr > 127  # 0/255 masks as saved in PNGs
    return arr > 0.5


def _as_rgb(image: Any, field: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        return Image.fromarray(arr)
    raise InvalidArgument(f"`{field}` is {type(image).__name__} {getattr(arr, 'shape', '')}: "
                          "pass a PIL image or an (H, W, 3) uint8 array")


# ---------------------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------------------

class ImageEmbedder(Protocol):
    def image_embeddings(self, images: Sequence[Any]) -> np.ndarray: ...


class ImageTextEmbedder(ImageEmbedder, Protocol):
    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray: ...


class _Embedder:
    """Shared by the embedders: resolves `model` to a local folder and loads it on first use."""

    # The request field the model reference comes from, named in errors.
    field = "model"
    # Files a usable folder holds beside config.json and weights.
    required_files: tuple[tuple[str, ...], ...] = ()

    def __init__(self, model: str, device: str | None = None, download: bool = False):
        self.model = model
        # None: cuda when available, else cpu.
        self.device = device
        # Let a hub id missing from the local Hugging Face cache be downloaded; HF_HUB_OFFLINE=1 forbids it anyway.
        self.download = download
        self._loaded = None

    def load(self):
        """Loads the model now (it is loaded on first use otherwise), so a server can fail fast."""
        if self._loaded is None:
            folder = resolve_model_folder(self.model, self.field, required=self.required_files,
                                          download=self.download)
            with loading_models():  # one load at a time in the process (runtime.model_loading says why)
                self._loaded = self._load(folder, torch_device(self.device))
        return self._loaded

    def _load(self, folder: Path, device):
        raise NotImplementedError

    def image_embeddings(self, images: Sequence[Any]) -> np.ndarray:
        """(n, d) float32 L2-normalised embeddings of `images` (PIL images or (H, W, 3) uint8 arrays)."""
        import torch

        images = [_as_rgb(im, "images") for im in images]
        if not images:
            raise InvalidArgument("`images` is empty: pass at least one image to embed")
        model, processor, device = self.load()
        rows = []
        with torch.inference_mode():
            for start in range(0, len(images), _BATCH):
                pixels = processor(images=images[start:start + _BATCH], return_tensors="pt")["pixel_values"]
                rows.append(self._image_features(model, pixels.to(device)))
        return _normalised(torch.cat(rows))

    def _image_features(self, model, pixel_values):
        raise NotImplementedError


class ClipEmbedder(_Embedder):
    """CLIP image and text embeddings (DreamBench's CLIP ViT-B/32 by default), L2-normalised, for CLIP-I/-T, SID."""

    field = "clip_model"
    # transformers 5 saves the image processor inside processor_config.json; hub repos have preprocessor_config.json.
    required_files = (("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json"))

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, device: str | None = None, download: bool = False):
        super().__init__(model, device, download)

    def _load(self, folder: Path, device):
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(folder).to(device).eval()
        processor = CLIPProcessor.from_pretrained(folder, **_pil_backend())
        return model, processor, device

    def _image_features(self, model, pixel_values):
        return _pooled(model.get_image_features(pixel_values=pixel_values))

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 L2-normalised CLIP text embeddings; texts longer than CLIP's 77 tokens are truncated."""
        import torch

        texts = list(texts)
        if not texts or any(not isinstance(t, str) for t in texts):
            raise InvalidArgument("`texts` must be a non-empty list of strings")
        model, processor, device = self.load()
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), _BATCH):
                tokens = processor.tokenizer(texts[start:start + _BATCH], padding=True, truncation=True,
                                             return_tensors="pt").to(device)
                rows.append(_pooled(model.get_text_features(input_ids=tokens["input_ids"],
                                                            attention_mask=tokens["attention_mask"])))
        return _normalised(torch.cat(rows))


class DinoEmbedder(_Embedder):
    """DINO image embeddings: the last layer's CLS token (DreamBench's DINO ViT-S/16 by default), L2-normalised.

    A DINOv2 folder or id (as P3S and CustomContrast use) works too: it is loaded through AutoModel and its CLS
    token taken the same way.
    """

    field = "dino_model"
    required_files = (("preprocessor_config.json",),)

    def __init__(self, model: str = DEFAULT_DINO_MODEL, device: str | None = None, download: bool = False):
        super().__init__(model, device, download)

    def _load(self, folder: Path, device):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, ViTModel

        config = AutoConfig.from_pretrained(folder)
        if config.model_type == "vit":
            # The CLS token is the embedding; DINO's checkpoints have no pooler, so build none.
            model = ViTModel.from_pretrained(folder, add_pooling_layer=False)
        else:
            model = AutoModel.from_pretrained(folder)
        processor = AutoImageProcessor.from_pretrained(folder, **_pil_backend())
        return model.to(device).eval(), processor, device

    def _image_features(self, model, pixel_values):
        return model(pixel_values=pixel_values).last_hidden_state[:, 0]


def _pooled(out):
    # transformers 5 returns a model output whose pooler_output is the projected feature; 4.x a tensor.
    return out if hasattr(out, "shape") else out.pooler_output


def _normalised(features) -> np.ndarray:
    import torch

    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def _pil_backend() -> dict:
    """Keyword that picks the PIL image processor: the same pixels on every machine, as CLIP's own preprocessing.

    transformers 5 would pick torchvision where installed (its resize differs slightly); 4.x calls it use_fast.
    """
    import transformers

    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


# ---------------------------------------------------------------------------------------------------------
# SID over images: segment the references, embed, apply Eq. 1-3
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SidScores:
    """SID's three measures for one prompt's generated images (higher is better for all three)."""

    subject_alignment: float
    non_subject_disentanglement: float
    text_alignment: float


def reference_segment_embeddings(embedder: ImageEmbedder, references: Sequence[Any],
                                 masks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(subject, non-subject) segment embeddings of the reference photos: embed once, reuse for every prompt."""
    references, masks = list(references), list(masks)
    if len(references) != len(masks):
        raise InvalidArgument(f"`masks` has {len(masks)} masks for {len(references)} reference images: "
                              "pass one subject mask per reference image")
    if not references:
        raise InvalidArgument("`references` is empty: pass the subject's reference photos")
    subjects = embedder.image_embeddings([subject_segment(r, m) for r, m in zip(references, masks)])
    non_subjects = embedder.image_embeddings([non_subject_segment(r, m) for r, m in zip(references, masks)])
    return subjects, non_subjects


def sid_scores(clip: ImageTextEmbedder, generated: Sequence[Any], references: Sequence[Any],
               masks: Sequence[Any], prompt: str, token: str) -> SidScores:
    """SA, NSD and TA (SID Eq. 1-3) of the images `generated` from `prompt`, against masked reference photos."""
    subjects, non_subjects = reference_segment_embeddings(clip, references, masks)
    images = clip.image_embeddings(list(generated))
    text = clip.text_embeddings([strip_identifier(prompt, token)])
    return SidScores(
        subject_alignment=subject_alignment(images, subjects),
        non_subject_disentanglement=non_subject_disentanglement(images, non_subjects),
        text_alignment=text_alignment(images, text),
    )
