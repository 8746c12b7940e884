"""P3S point-supervised subject masks (Hu et al., P3S-Diffusion, Eq. 1–2): clicks → CLIP patch similarity → mask.

The algorithm, on the h×w grid of CLIP vision patches of the photo:

    M_P = similarity_map(features, positive patches)        Eq. 1, one map per point, combined by max
    M_N = similarity_map(features, negative patches)        (all zeros when there is no negative point)
    S   = M_P · (1 − M_N)                                   Eq. 2
    B   = gaussian_blur(S, sigma) >= otsu_threshold(...)    Eq. 2: Ψ, then Otsu
    B   = keep_components_at(B, positive patches)           "remove outliers not connected to the points"
    mask = B upsampled to the photo, nearest patch          pixel (x, y) takes the value of the patch it maps to

Readings chosen where the paper is silent or ambiguous:
- Features: the last hidden state of the CLIP vision encoder (the paper's c_s, "the last hidden state of CLIP
  image encoder", Sec. III-A), CLS token dropped, no post-layernorm (transformers applies that only to the pooled
  CLS token). Default model openai/clip-vit-large-patch14, as in the paper's training details.
- Cosine similarities are clipped to [0, 1] before Eq. 2: the paper writes 1 − M_N, which is only a weight in
  [0, 1] when M_N is; a negative cosine (rare for CLIP patches) would otherwise flip the sign of M_P.
- Several points of one kind combine by max: a patch is positive when it resembles *any* positive click (head
  and tail of one dog), negative when it resembles any negative click (each of several distractors).
- Ψ is a Gaussian on the patch grid, sigma in patch units (default 1 patch; the paper gives no value), and
  sigma=0 skips it. Otsu runs on the blurred grid values; the mask is `value >= threshold`.
- Components are 4-connected: on a 16×16 grid a subject and a neighbour that touch only at a patch corner stay
  apart. Every component holding a positive point is kept; a negative point removes nothing by itself beyond
  the factor (1 − M_N).
- Upsampling is nearest-patch after thresholding (not bilinear before it), so the mask at a clicked pixel is
  exactly the grid value at the clicked patch: the mask is the paper's "rough mask", in patch-sized blocks.
- A "positive" click on the background selects the background component: that is what the algorithm does.

Pixel ↔ patch mapping: ClipPatchFeatures resizes the whole photo (no crop, aspect ratio not kept) to the model's
S×S input, so the patch grid tiles the original photo evenly: pixel (x, y) of a W×H photo lies in patch column
floor((x + 0.5)·w / W) and row floor((y + 0.5)·h / H) (its centre, scaled). Points are (x, y) pixel coordinates
of the photo as given (x to the right, y down); grid-level functions take (row, col) indices.

Only ClipPatchFeatures needs torch and transformers; the rest is numpy.
"""
from __future__ import annotations

import math
from collections import deque
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from persona.services.runtime.devices import torch_device
from persona.services.runtime.errors import InvalidArgument
# The project's one model-folder resolver and offline rule (a hub id comes from the local cache only).
from persona.services.runtime.model_loading import loading_models
from persona.services.runtime.models import resolve_model_folder

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
# Gaussian sigma, in patches, when the caller gives none: smooths single-patch noise on a 16×16 grid.
DEFAULT_SIGMA = 1.0
# The kernel reaches ceil(3·sigma) patches each side: beyond that the weights are < 1.2% of the centre's.
GAUSSIAN_TRUNCATE = 3.0
# Otsu histogram bins over [min, max]: 8-bit resolution, as the classic method on grey images.
OTSU_BINS = 256

GridIndex = tuple[int, int]


def similarity_map(features: np.ndarray, points_patch_idx: Sequence[GridIndex]) -> np.ndarray:
    """Eq. 1: cosine similarity of each point's patch to every patch, clipped to [0, 1], max over the points.

    features: (h, w, d) patch grid; points_patch_idx: (row, col) grid indices. No points: all zeros (the
    negative map when nobody clicked a negative point). Returns float64 (h, w).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 3 or 0 in features.shape:
        raise ValueError(f"features must be a non-empty (h, w, d) grid, got shape {features.shape}")
    h, w, _ = features.shape
    # A zero vector has no direction: its similarities are 0 rather than NaN.
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    unit = features / np.maximum(norms, 1e-12)
    out = np.zeros((h, w))
    for row, col in points_patch_idx:
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(f"patch ({row}, {col}) is outside the {h}×{w} grid")
        cos = unit @ unit[row, col]
        out = np.maximum(out, np.clip(cos, 0.0, 1.0))
    return out


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of `sigma`, radius ceil(GAUSSIAN_TRUNCATE·sigma): weights exp(−i²/2σ²)/sum."""
    radius = math.ceil(GAUSSIAN_TRUNCATE * sigma)
    i = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(i * i) / (2.0 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(map: np.ndarray, sigma: float) -> np.ndarray:
    """Ψ: separable Gaussian blur of a 2-D map, sigma in grid cells; sigma=0 returns a copy.

    Radius ceil(3·sigma); borders padded symmetrically (edge cell repeated: d c b a | a b c d), so a constant
    map stays constant and the edges are not darkened.
    """
    map = np.asarray(map, dtype=np.float64)
    if map.ndim != 2:
        raise ValueError(f"map must be 2-D, got shape {map.shape}")
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise InvalidArgument(f"`sigma` is {sigma}: pass a Gaussian width in patches ≥ 0, e.g. 1.0 (0: no blur)")
    if sigma == 0:
        return map.copy()
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    # numpy's symmetric pad reflects again when the radius exceeds the map, so tiny grids work too.
    padded = np.pad(map, r, mode="symmetric")
    # Rows, then columns: two 1-D passes equal the 2-D Gaussian.
    rows = sum(k[i] * padded[:, i:i + padded.shape[1] - 2 * r] for i in range(len(k)))
    return sum(k[i] * rows[i:i + rows.shape[0] - 2 * r, :] for i in range(len(k)))


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold: the split of a `bins`-bin histogram over [min, max] maximising between-class variance.

    Between-class variance of a split after bin k is ω0·ω1·(μ0 − μ1)², with class means from bin centres.
    Splits inside a run of empty bins tie; the threshold is then the middle of that gap (the edge between the
    two bins when no tie), so it lies halfway between the modes. Foreground is `values >= threshold`.
    All values equal: that value (everything is foreground).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("otsu_threshold needs a non-empty array of finite values")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    p = counts / counts.sum()
    # Class 0 = bins 0..k, class 1 = bins k+1..end, for k = 0..bins-2.
    w0 = np.cumsum(p)[:-1]
    m0 = np.cumsum(p * centres)[:-1]
    w1 = 1.0 - w0
    total = float((p * centres).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (total - m0) / w1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    best = np.flatnonzero(between == between.max())
    # Ties come from empty bins between the classes: take the middle of that run.
    first, last = best[0], best[-1]
    return float((edges[first + 1] + edges[last + 1]) / 2)


def connected_components(binary: np.ndarray) -> np.ndarray:
    """Labels of the 4-connected components of True cells: 0 for False, 1..n in raster order of first cell."""
    binary = np.asarray(binary, dtype=bool)
    if binary.ndim != 2:
        raise ValueError(f"binary must be 2-D, got shape {binary.shape}")
    h, w = binary.shape
    labels = np.zeros((h, w), dtype=np.int32)
    n = 0
    for start in zip(*np.nonzero(binary)):
        if labels[start]:
            continue
        n += 1
        labels[start] = n
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and binary[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = n
                    queue.append((rr, cc))
    return labels


def keep_components_at(binary: np.ndarray, points: Sequence[GridIndex]) -> np.ndarray:
    """The True cells 4-connected to any of `points` ((row, col) indices); a point on a False cell keeps nothing."""
    labels = connected_components(binary)
    keep = {int(labels[r, c]) for r, c in points} - {0}
    return np.isin(labels, sorted(keep))


def patch_of(point: tuple[float, float], grid_shape: tuple[int, int], image_size: tuple[int, int]) -> GridIndex:
    """(row, col) of the patch holding pixel (x, y) of a (width, height) photo: its centre, scaled to the grid."""
    (x, y), (h, w), (width, height) = point, grid_shape, image_size
    col = min(w - 1, math.floor((x + 0.5) * w / width))
    row = min(h - 1, math.floor((y + 0.5) * h / height))
    return row, col


def upsample_nearest(grid: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """A (h, w) grid as a (height, width) image: each pixel takes its patch's value (same mapping as patch_of)."""
    h, w = grid.shape
    width, height = image_size
    # Integer form of floor((i + 0.5)·n / size): exact for every size.
    rows = ((2 * np.arange(height) + 1) * h) // (2 * height)
    cols = ((2 * np.arange(width) + 1) * w) // (2 * width)
    return grid[rows[:, None], cols[None, :]]


def point_mask(features: np.ndarray, positive_points: Sequence[Sequence[float]],
               negative_points: Sequence[Sequence[float]], image_size: tuple[int, int], *,
               sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """P3S mask of the subject under `positive_points`, minus what resembles `negative_points`: bool (height, width).

    features: the photo's (h, w, d) CLIP patch grid (ClipPatchFeatures); points: (x, y) pixel coordinates of the
    photo; image_size: (width, height), as PIL's `Image.size`; sigma: Gaussian width in patches (0: none).
    """
    width, height = _image_size(image_size)
    positives = _points("positive_points", positive_points, width, height)
    negatives = _points("negative_points", negative_points, width, height)
    if not positives:
        raise InvalidArgument(
            "`positive_points` is empty: click at least one point on the subject, as (x, y) pixel coordinates")
    features = np.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"features must be an (h, w, d) patch grid, got shape {features.shape}")
    grid = features.shape[:2]
    pos = [patch_of(p, grid, (width, height)) for p in positives]
    neg = [patch_of(p, grid, (width, height)) for p in negatives]
    # Eq. 2: high where the patch looks like a positive click and unlike every negative click.
    score = similarity_map(features, pos) * (1.0 - similarity_map(features, neg))
    smooth = gaussian_blur(score, sigma)
    # max ≤ 0: every positive patch is cancelled by a negative one; Otsu of a constant map would take everything.
    selected = keep_components_at(smooth >= otsu_threshold(smooth), pos) if smooth.max() > 0 else None
    if selected is None or not selected.any():
        raise InvalidArgument(
            "`positive_points` select nothing: their patches fall below the Otsu threshold, usually because a "
            "`negative_points` click lies on something that looks the same; move the negative points off the "
            "subject or click the subject's centre")
    return upsample_nearest(selected, (width, height))


def _image_size(image_size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"`image_size` is {image_size!r}: pass the photo's (width, height) in pixels") from None
    if width < 1 or height < 1:
        raise InvalidArgument(f"`image_size` is ({width}, {height}): width and height must be ≥ 1 pixel")
    return width, height


def _points(field: str, points, width: int, height: int) -> list[tuple[float, float]]:
    """Validated (x, y) pixel points; errors name the point, e.g. `positive_points[1]`."""
    out = []
    for i, point in enumerate(() if points is None else points):
        name = f"`{field}[{i}]`"
        try:
            x, y = point
        except (TypeError, ValueError):
            raise InvalidArgument(f"{name} is {point!r}: pass (x, y) pixel coordinates, e.g. (120, 80)") from None
        if not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (x, y)):
            raise InvalidArgument(f"{name} is {point!r}: x and y must be finite numbers of pixels")
        if not (0 <= x < width and 0 <= y < height):
            raise InvalidArgument(
                f"{name} ({_num(x)}, {_num(y)}) is outside the {width}×{height} image: "
                f"x must be in 0–{width - 1}, y in 0–{height - 1}")
        out.append((float(x), float(y)))
    return out


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{float(v):g}"


class ClipPatchFeatures:
    """CLIP vision patch features of a photo: (h, w, d) grid of the encoder's last hidden state, CLS dropped.

    `clip_model` is a local folder (saved with `save_pretrained`, holding the processor config too) or a hub id
    taken from the local Hugging Face cache; it is downloaded only when `download` is set and HF_HUB_OFFLINE is
    not. A full CLIP checkpoint (text + vision, as openai/clip-vit-large-patch14) loads its vision half.
    The photo is resized whole to the model's S×S input (bicubic, no crop), see the module docstring.
    """

    def __init__(self, clip_model: str | Path = DEFAULT_CLIP_MODEL, *, download: bool = False,
                 device: str | None = None):
        from transformers import CLIPImageProcessor, CLIPVisionModel

        ref = str(clip_model).strip()
        if not ref:
            raise InvalidArgument(f"`clip_model` is empty: pass a CLIP model folder or a hub id such as "
                                  f"{DEFAULT_CLIP_MODEL}")
        # The image processor's config too: its normalisation is part of the features. transformers 5 saves it
        # in processor_config.json when a whole CLIPProcessor is saved.
        folder = resolve_model_folder(
            ref, "clip_model", required=(("preprocessor_config.json", "processor_config.json"),),
            download=download, kind="CLIP vision model",
            fix="pass a folder saved with `save_pretrained` of a CLIP (vision) model and of its image processor")
        try:
            with loading_models():  # one load at a time in the process (runtime.model_loading says why)
                model, info = CLIPVisionModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
            processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        except OSError as e:
            # The files are there but do not load, e.g. a config of another architecture or truncated weights.
            raise InvalidArgument(
                f"`clip_model` {ref!r} is not a CLIP vision model folder ({_first_line(e)}): it needs config.json, "
                "weights and preprocessor_config.json, as `save_pretrained` of a model and its image processor "
                "write them") from None
        if info.get("missing_keys"):
            # Random weights where the checkpoint has none would give a mask of noise without any error.
            missing = sorted(info["missing_keys"])
            raise InvalidArgument(
                f"`clip_model` {ref!r} has no weights for {len(missing)} CLIP vision tensors (e.g. {missing[0]}): "
                "pass a CLIP or CLIP vision checkpoint")
        self.device = torch_device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        config = model.config
        # Position embeddings fix the input side; the grid is input side / patch side (224/14 = 16 for ViT-L/14).
        self.input_size = int(config.image_size)
        self.grid_size = self.input_size // int(config.patch_size)

    def __call__(self, image: "Image.Image") -> np.ndarray:
        """The (grid, grid, hidden) float32 patch features of `image` (any mode; converted to RGB)."""
        import torch
        from PIL import Image

        square = image.convert("RGB").resize((self.input_size, self.input_size), Image.Resampling.BICUBIC)
        # The processor only rescales and normalises: its own resize and centre crop would break patch_of.
        pixels = self.processor(images=square, do_resize=False, do_center_crop=False,
                                return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            hidden = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).last_hidden_state
        tokens = hidden[0, 1:].float().cpu().numpy()  # drop CLS
        return tokens.reshape(self.grid_size, self.grid_size, -1)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
