"""Text-grounded subject masks: CLIPSeg, and GroundingDINO boxes refined by SAM (Grounded-SAM).

Naming the subject ("dog") is enough, no clicks: that is what SID's metrics use to split a generated image
into subject and non-subject ("Grounded-SAM conditioned on the class name"), and what masked training uses
when no one clicked. Two methods, because they fail differently:
- `GroundedSamMasker` (default IDEA-Research/grounding-dino-tiny + facebook/sam-vit-base): GroundingDINO finds
  boxes for the text, SAM turns the best box (or all of them) into a crisp instance mask. Either finds the
  subject or says it found nothing.
- `ClipSegMasker` (default CIDAS/clipseg-rd64-refined): one small model, a soft per-pixel map thresholded into
  a mask; blobby edges, but it always answers, and the soft map (`probabilities`) suits a masked loss.

Both return a `MaskResult`: a bool (H, W) mask at the image's size as given, a score, the boxes, the method and
the model references that made it. Pure domain code: no grpc; errors are persona errors naming the field.

Models are a hub id taken from the local Hugging Face cache (downloaded only when `download` is set and
HF_HUB_OFFLINE is not, as for base models) or a local folder saved with `save_pretrained` (model and processor);
the tests build random-weight stand-ins of all three (tests/tiny_models.py). Each masker loads its models once, on
first use (or `load()`), on `device` (default cuda when available, else cpu). torch and transformers are imported
there.
"""
from __future__ import annotations

import inspect
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from persona.services.runtime.devices import device_name, torch_device
from persona.services.runtime.errors import InvalidArgument
# The project's one model-folder resolver and offline rule; `model_type` tells the three models apart.
from persona.services.runtime.model_loading import loading_models
from persona.services.runtime.models import resolve_model_folder

# One Otsu for the mask service: P3S binarises its similarity map with the same rule.
from .p3s import otsu_threshold

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_CLIPSEG_MODEL = "CIDAS/clipseg-rd64-refined"
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SEGMENTER = "facebook/sam-vit-base"
CLIPSEG = "clipseg"
GROUNDED_SAM = "grounded-sam"
# Grounded-SAM's published demo defaults: a box needs 0.35 confidence; a token 0.25 to enter its label.
DEFAULT_BOX_THRESHOLD = 0.35
DEFAULT_TEXT_THRESHOLD = 0.25
# CLIPSeg's Otsu threshold is never below this: without the subject the probabilities are all low, and Otsu
# would still split that noise in two and call one half the subject.
DEFAULT_CLIPSEG_MIN_THRESHOLD = 0.1


@dataclass(frozen=True)
class Detection:
    """One GroundingDINO box, in pixels of the image as given, clipped to it."""

    x0: float
    y0: float
    x1: float
    y1: float
    # Box confidence (max sigmoid over the query's tokens), 0–1.
    score: float
    # The query words whose token score passed the text threshold, e.g. "dog"; may be empty.
    label: str

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarrays field-wise is ambiguous
class MaskResult:
    """A text-grounded mask of one image and how it was made."""

    # bool (H, W), True = subject, at the size of the image as given.
    mask: np.ndarray
    # Confidence 0–1: clipseg, the mean probability inside the mask; grounded-sam, the best box's score.
    # 0 when the mask is empty.
    score: float
    # grounded-sam: the detections above the box threshold, best first (`union=False` segments only the first);
    # clipseg: none.
    boxes: tuple[Detection, ...]
    # "clipseg" or "grounded-sam" (the Mask message's `method`).
    method: str
    # The model references as given (hub ids or paths): clipseg one, grounded-sam detector then segmenter.
    model_ids: tuple[str, ...]
    # The text as the model saw it, e.g. "dog." for GroundingDINO.
    query: str
    # clipseg: the probability threshold applied (Otsu's or the caller's); grounded-sam: the box threshold.
    threshold: float
    # Why the mask is empty (nothing detected, nothing above the threshold); "" otherwise.
    note: str = ""

    @property
    def coverage(self) -> float:
        """Fraction of the image's pixels that are subject, 0–1."""
        return float(self.mask.mean()) if self.mask.size else 0.0


class ClipSegMasker:
    """CLIPSeg (Lüddecke & Ecker, CVPR 2022): a per-pixel probability map for the text, thresholded into a mask.

    Threshold: by default Otsu's threshold of the image's probability map, never below `min_threshold`; a
    `threshold` passed to `mask` is used as is. Why not a fixed 0.4: CLIPSeg's sigmoid outputs are not
    calibrated. How high the map peaks on a correctly found subject varies a lot with the prompt and the
    photo, so one fixed cut keeps only the core of a faint subject and bloats a confident one; Otsu puts the
    cut in the valley between the subject's and the background's probabilities, per image (the same rule P3S
    applies to its similarity map). The floor keeps an image without the subject empty: there every
    probability is low and Otsu alone would still split the noise.
    """

    def __init__(self, model: str | Path = DEFAULT_CLIPSEG_MODEL, *, device: str | None = None,
                 download: bool = False, min_threshold: float = DEFAULT_CLIPSEG_MIN_THRESHOLD):
        self.model_id = _model_ref(model, "model", DEFAULT_CLIPSEG_MODEL)
        self.min_threshold = _unit_interval(min_threshold, "min_threshold")
        self.device = device_name(device)
        self.download = download
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None

    def load(self) -> tuple[Any, Any]:
        """(processor, model), loaded on first call and kept; a server calls it at start to fail fast."""
        with self._lock:
            if self._loaded is None:
                from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

                device = torch_device(self.device)
                folder = resolve_model_folder(self.model_id, "model", model_type="clipseg",
                                              download=self.download)
                processor = _load("model", self.model_id, CLIPSegProcessor, folder)
                model = _load("model", self.model_id, CLIPSegForImageSegmentation, folder)
                self._loaded = (processor, model.to(device).eval())
        return self._loaded

    def probabilities(self, image: "Image.Image", text: str) -> np.ndarray:
        """float32 (H, W) in 0–1: sigmoid of CLIPSeg's logits for `text`, upsampled bilinearly to the image."""
        import torch
        import torch.nn.functional as F

        text = _text(text)
        image = image.convert("RGB")
        processor, model = self.load()
        inputs = processor(text=[text], images=[image], return_tensors="pt", padding=True)
        with torch.inference_mode():
            logits = model(**inputs.to(model.device)).logits
            # (1, h, w), or (h, w) where a transformers version squeezes a batch of one.
            probs = torch.sigmoid(logits.float()).reshape(1, 1, *logits.shape[-2:])
            probs = F.interpolate(probs, size=(image.height, image.width), mode="bilinear", align_corners=False)
            return probs[0, 0].clamp(0, 1).cpu().numpy()

    def mask(self, image: "Image.Image", text: str, threshold: float | None = None) -> MaskResult:
        """The pixels of `image` whose probability for `text` is >= `threshold` (None: Otsu, see the class)."""
        if threshold is not None:
            threshold = _unit_interval(threshold, "threshold")
        probs = self.probabilities(image, text)
        if threshold is None:
            threshold = max(otsu_threshold(probs), self.min_threshold)
        mask = probs >= threshold
        note = "" if mask.any() else (
            f"no pixel's probability for {text.strip()!r} reached {threshold:.3f} (max {float(probs.max()):.3f}): "
            "the subject was not found; pass a lower `threshold` or another text")
        return MaskResult(mask=mask, score=float(probs[mask].mean()) if mask.any() else 0.0, boxes=(),
                          method=CLIPSEG, model_ids=(self.model_id,), query=text.strip(),
                          threshold=float(threshold), note=note)


class GroundedSamMasker:
    """Grounded-SAM (Ren et al. 2024): GroundingDINO boxes for the text, each segmented by SAM.

    The query is the text lower-cased and ending in a period ("dog" → "dog.", "Stuffed Animal" → "stuffed
    animal."), the form GroundingDINO was trained on. Boxes need `box_threshold` confidence (over 1 detects
    nothing); `text_threshold` only decides which words form a box's label. SAM is prompted with the best box
    (`union=False`, default: a subject is one object, and further boxes are mostly its parts or look-alikes)
    or with every box, the masks united (`union=True`: several instances, or a subject split across boxes).
    Nothing detected: an all-False mask with score 0 and a note saying so.
    """

    def __init__(self, detector: str | Path = DEFAULT_DETECTOR, segmenter: str | Path = DEFAULT_SEGMENTER, *,
                 device: str | None = None, download: bool = False, box_threshold: float = DEFAULT_BOX_THRESHOLD,
                 text_threshold: float = DEFAULT_TEXT_THRESHOLD, union: bool = False):
        self.detector_id = _model_ref(detector, "detector", DEFAULT_DETECTOR)
        self.segmenter_id = _model_ref(segmenter, "segmenter", DEFAULT_SEGMENTER)
        self.box_threshold = _non_negative(box_threshold, "box_threshold")
        self.text_threshold = _unit_interval(text_threshold, "text_threshold")
        self.union = union
        self.device = device_name(device)
        self.download = download
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any, Any, Any] | None = None

    def load(self) -> tuple[Any, Any, Any, Any]:
        """(detector processor, detector, SAM processor, SAM), loaded on first call and kept."""
        with self._lock:
            if self._loaded is None:
                from transformers import AutoProcessor, GroundingDinoForObjectDetection, SamModel, SamProcessor

                device = torch_device(self.device)
                det_folder = resolve_model_folder(self.detector_id, "detector", model_type="grounding-dino",
                                                  download=self.download)
                seg_folder = resolve_model_folder(self.segmenter_id, "segmenter", model_type="sam",
                                                  download=self.download)
                det_processor = _load("detector", self.detector_id, AutoProcessor, det_folder)
                detector = _load("detector", self.detector_id, GroundingDinoForObjectDetection, det_folder)
                sam_processor = _load("segmenter", self.segmenter_id, SamProcessor, seg_folder)
                sam = _load("segmenter", self.segmenter_id, SamModel, seg_folder)
                self._loaded = (det_processor, detector.to(device).eval(), sam_processor, sam.to(device).eval())
        return self._loaded

    def _detect(self, image: "Image.Image", query: str) -> list[Detection]:
        """GroundingDINO's boxes for `query` above the box threshold, best first, in pixels clipped to the image."""
        import torch

        processor, detector, _, _ = self.load()
        inputs = processor(images=image, text=query, return_tensors="pt").to(detector.device)
        with torch.inference_mode():
            outputs = detector(**inputs)
        # transformers < 4.51 calls the box threshold `box_threshold`, later versions `threshold`.
        name = "box_threshold" if "box_threshold" in _parameters(processor.post_process_grounded_object_detection) \
            else "threshold"
        result = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)], **{name: self.box_threshold})[0]
        # `text_labels` since transformers 4.51; reading `labels` there warns that it will become ids.
        labels = result["text_labels"] if "text_labels" in result else result["labels"]
        found = []
        for score, box, label in zip(result["scores"].tolist(), result["boxes"].tolist(), labels):
            x0, y0, x1, y1 = (min(max(v, 0.0), float(bound)) for v, bound in
                              zip(box, (image.width, image.height, image.width, image.height)))
            found.append(Detection(x0, y0, x1, y1, float(score), _label(label)))
        return sorted(found, key=lambda d: d.score, reverse=True)

    def mask(self, image: "Image.Image", text: str) -> MaskResult:
        """SAM's mask for the best GroundingDINO box of `text` (or the union over all boxes, see the class)."""
        import torch

        image = image.convert("RGB")
        query = grounding_query(text)
        detections = self._detect(image, query)
        common = dict(method=GROUNDED_SAM, model_ids=(self.detector_id, self.segmenter_id), query=query,
                      threshold=self.box_threshold, boxes=tuple(detections))
        if not detections:
            return MaskResult(mask=np.zeros((image.height, image.width), dtype=bool), score=0.0,
                              note=f"nothing matching {query!r} was detected with box_threshold "
                                   f"{self.box_threshold:g}: the mask is empty; check the text names what is in "
                                   "the photo, or lower the threshold", **common)
        _, _, processor, sam = self.load()
        prompts = detections if self.union else detections[:1]
        inputs = processor(images=image, input_boxes=[[list(d.box) for d in prompts]], return_tensors="pt")
        with torch.inference_mode():
            # One mask per box: SAM's three-way output is for ambiguous point prompts, a box is not ambiguous.
            outputs = sam(**inputs.to(sam.device), multimask_output=False)
        masks = processor.post_process_masks(outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(),
                                             inputs["reshaped_input_sizes"].cpu())[0]  # (boxes, 1, H, W) bool
        mask = masks[:, 0].any(dim=0).numpy().astype(bool)
        note = "" if mask.any() else f"SAM found no subject pixels in the {len(prompts)} box(es) for {query!r}"
        return MaskResult(mask=mask, score=detections[0].score if mask.any() else 0.0, note=note, **common)


def grounding_query(text: str) -> str:
    """`text` as GroundingDINO expects it: lower case, phrases ending in a period ("A Dog" → "a dog.")."""
    query = " ".join(_text(text).lower().split())
    return query if query.endswith(".") else f"{query}."


def _load(field: str, ref: str, cls, folder: Path):
    """`cls.from_pretrained(folder)` offline; what is missing or broken becomes an error naming `field`."""
    from transformers import PreTrainedModel

    kwargs = {"output_loading_info": True} if issubclass(cls, PreTrainedModel) else {}
    try:
        with loading_models():  # one load at a time in the process (runtime.model_loading says why)
            loaded = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(
            f"`{field}` {ref!r} could not be loaded by {cls.__name__} from {folder} ({_first_line(e)}): it needs "
            "the model's config and weights and its processor's files, as `save_pretrained` writes them") from None
    if kwargs:
        loaded, info = loaded
        if info.get("missing_keys"):
            # Randomly initialised tensors would make arbitrary masks without any error: say so in the log.
            log.warning("%s %r: %d tensors were not in the checkpoint and are random, e.g. %s", field, ref,
                        len(info["missing_keys"]), sorted(info["missing_keys"])[0])
    return loaded


def _model_ref(ref: str | Path, field: str, example: str) -> str:
    ref = str(ref or "").strip()
    if not ref:
        raise InvalidArgument(f"`{field}` is empty: pass a hub id such as {example} or a local model folder")
    return ref


def _text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("`text` is empty: pass what to segment, e.g. the subject's class name `dog`")
    return text.strip()


def _unit_interval(value: float, field: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InvalidArgument(f"`{field}` is {value!r}: pass a number from 0 to 1")
    return float(value)


def _non_negative(value: float, field: str) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"`{field}` is {value!r}: pass a number from 0 to 1 (above 1 detects nothing)")
    return float(value)


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _label(label) -> str:
    # The label is the decoded tokens of the query that passed the text threshold; drop BERT's markers.
    words = [w for w in str(label).replace("[SEP]", " ").replace("[CLS]", " ").split() if w != "."]
    return " ".join(words).rstrip(".").strip()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
