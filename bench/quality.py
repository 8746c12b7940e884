"""`persona-cli bench quality`'s runner: trains one concept per configuration and seed through the real services,
draws each on the toy world's prompts and measures entanglement (persona.services.evaluate.toyworld).

Per reference set, one subject per caption kind is uploaded and its photos captioned through the caption service's
SetCaption (Case 1 or the SID Case 3 text of the set's scene.json); each configuration trains on the stored
captions (`captions` "sid") with its method and regularisers. Per seed s the concept trains with seed s and draws
with seeds from 1000·s, so seeds differ in both training and sampling.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, Sequence

from PIL import Image

from persona.client.sdk import PersonaClient, PersonaClientError
from persona.services.evaluate import report
from persona.services.evaluate import toyworld as tw
from persona.services.evaluate.toyworld import METRICS, default_toyworld, read_reference_set
from persona.services.runtime.errors import InvalidArgument, InvalidSetting
from persona.services.runtime.settings import parse_flag
from persona.v1 import caption_pb2, common_pb2, generate_pb2, mask_pb2, subjects_pb2, train_pb2

__all__ = ["DEFAULT_CONFIGS", "METRICS", "Configuration", "QualityBenchmark", "default_toyworld",
           "quality_report_html", "read_reference_set", "training_option_pairs"]

CAPTION_KINDS = ("case1", "sid")
METHODS = ("lora", "dreambooth")
# Concepts made by a trained CustomContrast encoder (`--encoder`): no fine-tuning, class captions, no options.
ENCODER_METHOD = "customcontrast"
BENCH_REGULARIZERS = ("prior", "mask", "core", "spl")
# core and spl act on the text side: dreambooth and lora need it trained for them.
TEXT_SIDE = ("core", "spl")
# The README's four rows: Case 1 and SID, each with and without prior preservation.
DEFAULT_CONFIGS = ("case1", "case1+prior", "sid", "sid+prior")
# The toy base's sampling (its README: 30 DDIM steps, guidance 6).
SAMPLING_STEPS, GUIDANCE = 30, 6.0


@dataclass(frozen=True)
class Configuration:
    method: str
    captions: str  # "case1" | "sid"
    regularizers: tuple[str, ...]  # () = none
    encoder: str = ""  # method customcontrast: the encoder that makes the concept

    @classmethod
    def from_encoder(cls, encoder: str) -> "Configuration":
        """A concept from CustomContrast encoder `encoder` (its rows' ratios are over the first encoder's)."""
        return cls(ENCODER_METHOD, "case1", (), encoder)

    @classmethod
    def parse(cls, text: str, method: str) -> "Configuration":
        """'sid+prior+core' → SID captions with prior preservation and CoRe; raises ValueError naming the part."""
        parts = [p.strip().lower() for p in text.split("+") if p.strip()]
        if not parts or parts[0] not in CAPTION_KINDS:
            raise ValueError(f"`--config` {text!r} must start with case1 or sid, e.g. sid+prior")
        unknown = [p for p in parts[1:] if p not in BENCH_REGULARIZERS]
        if unknown:
            raise ValueError(f"`--config` {text!r} has {', '.join(unknown)}: join case1|sid with some of "
                             f"{', '.join(BENCH_REGULARIZERS)} by '+', e.g. sid+prior+mask")
        if method not in METHODS:
            raise ValueError(f"`--method` is {method!r}: use lora or dreambooth")
        return cls(method, parts[0], tuple(dict.fromkeys(parts[1:])))

    @property
    def name(self) -> str:
        if self.encoder:
            return f"{self.method} {self.encoder}"
        return f"{self.method} {'+'.join((self.captions,) + self.regularizers)}"

    @property
    def prior(self) -> bool:
        return "prior" in self.regularizers


@dataclass
class Row:
    """One configuration's figures: per metric the per-seed values (each the mean over the reference sets)."""

    config: Configuration
    per_seed: dict[str, list[float]] = field(default_factory=dict)
    per_reference: dict[str, dict[str, float]] = field(default_factory=dict)  # set name → metric → mean over seeds
    baseline: str | None = None  # the Case 1 row the ratios are taken against
    ratios: dict[str, float] = field(default_factory=dict)
    # prompt text → PNGs of the first seed, for the report's grids (reference set name prefixed).
    images: dict[str, list[bytes]] = field(default_factory=dict)

    def mean(self, metric: str) -> float | None:
        values = self.per_seed.get(metric)
        return tw.spread(values)[0] if values else None

    def std(self, metric: str) -> float | None:
        values = self.per_seed.get(metric)
        return tw.spread(values)[1] if values else None


def _options(config: Configuration, seed: int, given: dict) -> train_pb2.TrainingOptions:
    options = train_pb2.TrainingOptions(seed=seed)
    for name, value in given.items():
        if isinstance(value, (list, tuple)):
            getattr(options, name).extend(value)
        else:
            setattr(options, name, value)
    if any(r in TEXT_SIDE for r in config.regularizers):
        options.train_text_encoder = True
    return options


class QualityBenchmark:
    """Runs the configurations over the reference sets and seeds against one persona server (embedded or not)."""

    def __init__(self, client: PersonaClient, base_model: str, *, images_per_prompt: int = 8,
                 prompts_per_kind: int = 2, options: dict | None = None, sampling_steps: int = SAMPLING_STEPS,
                 guidance: float = GUIDANCE, on_stage: Callable[[str], None] = lambda message: None):
        self.client, self.base_model = client, base_model
        self.images_per_prompt, self.prompts_per_kind = images_per_prompt, prompts_per_kind
        self.options, self.sampling_steps, self.guidance = dict(options or {}), sampling_steps, guidance
        self.on_stage = on_stage
        self._created: list[str] = []

    def run(self, references: Sequence[tw.ReferenceSet], configs: Sequence[Configuration],
            seeds: Sequence[int]) -> list[Row]:
        rows = [Row(c) for c in configs]
        try:
            for reference in references:
                prompts = tw.bench_prompts(reference, self.prompts_per_kind)
                subjects = {kind: self._subject(reference, kind, any(c.captions == kind and "mask" in c.regularizers
                                                                     for c in configs))
                            for kind in dict.fromkeys(c.captions for c in configs)}
                for row in rows:
                    per_seed = []
                    for seed in seeds:
                        concept_id = self._train(subjects[row.config.captions], row.config, seed, reference)
                        per_seed.append(self._measure(concept_id, prompts, reference, seed, row, first=seed == seeds[0]))
                        self.client.train.DeleteConcept(train_pb2.DeleteConceptRequest(concept_id=concept_id))
                    for metric in tw.METRICS:
                        values = [s[metric] for s in per_seed if metric in s]
                        if values:
                            row.per_reference.setdefault(reference.name, {})[metric] = tw.spread(values)[0]
                            row.per_seed.setdefault(metric, [0.0] * len(seeds))
                            for index, value in enumerate(values):
                                row.per_seed[metric][index] += value / len(references)
        finally:
            for subject_id in self._created:
                self.client.subjects.DeleteSubject(subjects_pb2.DeleteSubjectRequest(subject_id=subject_id))
        _set_ratios(rows)
        return rows

    def _subject(self, reference: tw.ReferenceSet, kind: str, masks: bool) -> str:
        """Uploads the set's photos as a subject and stores each photo's Case 1 or SID caption through SetCaption."""
        self.on_stage(f"{reference.name}: uploading {len(reference.photos)} photos with {kind} captions")
        subject = self.client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
            class_name=reference.class_name, token=reference.token, display_name=f"bench {reference.name} {kind}",
            images=[subjects_pb2.ImageUpload(data=p.path.read_bytes(), filename=p.path.name)
                    for p in reference.photos]))
        self._created.append(subject.subject_id)
        by_name = {p.path.name: p for p in reference.photos}
        for image in subject.images:
            photo = by_name[image.filename] if image.filename in by_name else reference.photos[image.index]
            self.client.captions.SetCaption(caption_pb2.SetCaptionRequest(
                image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=image.image_id),
                text=photo.case1 if kind == "case1" else photo.case3))
            if masks:  # a click on the subject: the centroid of its colours
                x, y = _subject_centre(Image.open(photo.path), reference)
                self.client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
                    subject_id=subject.subject_id, image_id=image.image_id, positive=[mask_pb2.Point(x=x, y=y)]))
        return subject.subject_id

    def _train(self, subject_id: str, config: Configuration, seed: int, reference: tw.ReferenceSet) -> str:
        self.on_stage(f"{reference.name}: training {config.name}, seed {seed}")
        if config.encoder:  # no fine-tuning, so no options and no seed: the seed varies the drawing only
            request = train_pb2.StartTrainingRequest(encoder=config.encoder, captions="class", regularizers=["none"])
        else:
            request = train_pb2.StartTrainingRequest(regularizers=list(config.regularizers) or ["none"],
                                                     captions="sid", options=_options(config, seed, self.options))
        request.MergeFrom(train_pb2.StartTrainingRequest(subject_id=subject_id, base_model=self.base_model,
                                                         method=config.method,
                                                         display_name=f"bench {config.name} seed {seed}"))
        job = self.client.train.StartTraining(request)
        final = self.client.wait_for_job(job.job_id)
        if final.state != common_pb2.JOB_STATE_SUCCEEDED:
            raise PersonaClientError(final.error.code or "ABORTED",
                                     f"training {config.name} (seed {seed}) on {reference.name} ended "
                                     f"{common_pb2.JobState.Name(final.state)}: {final.error.message}")
        return job.params["concept_id"]

    def _measure(self, concept_id: str, prompts: list[tw.BenchPrompt], reference: tw.ReferenceSet, seed: int,
                 row: Row, first: bool) -> dict[str, float]:
        self.on_stage(f"{reference.name}: drawing {row.config.name}, seed {seed}: {len(prompts)} prompts × "
                      f"{self.images_per_prompt}")
        scores = []
        # One request per prompt (a server draws at most 16 images a request), seeded as one request for all would be:
        # image j of prompt k starts from seed 1000·s + k·n + j.
        for index, prompt in enumerate(prompts):
            for image in self.client.generate.Generate(generate_pb2.GenerateRequest(
                    concept_id=concept_id, prompts=[prompt.text], seed=1000 * seed + index * self.images_per_prompt,
                    steps=self.sampling_steps, guidance_scale=self.guidance, scheduler=generate_pb2.SCHEDULER_DDIM,
                    images_per_prompt=self.images_per_prompt)):
                scores.append(tw.score_image(Image.open(io.BytesIO(image.png)), prompt, reference))
                if first:
                    row.images.setdefault(f"{reference.name}: {prompt.text}", []).append(image.png)
        return tw.summarise(scores)


def _subject_centre(image: Image.Image, reference: tw.ReferenceSet) -> tuple[int, int]:
    import numpy as np

    labels = tw.palette_labels(image)
    ys, xs = np.nonzero(np.isin(labels, [tw.COLOURS.index(c) for c in reference.subject_colours]))
    if not len(xs):
        return image.width // 2, image.height // 2
    return int(np.median(xs)), int(np.median(ys))


def _set_ratios(rows: list[Row]) -> None:
    """Each row's figures over its Case 1 row's: same method and prior setting where there is one (encoder rows:
    over the first encoder's)."""
    for row in rows:
        candidates = [r for r in rows if r.config.captions == "case1" and r.config.method == row.config.method]
        same_prior = [r for r in candidates if r.config.prior == row.config.prior and
                      r.config.regularizers == tuple(x for x in row.config.regularizers if x == "prior")]
        baseline = (same_prior or candidates or [None])[0]
        if baseline is None:
            continue
        row.baseline = baseline.config.name
        for metric in tw.METRICS:
            mine, theirs = row.mean(metric), baseline.mean(metric)
            if mine is not None and theirs:
                row.ratios[metric] = mine / theirs


_QUALITY_SOURCES = {
    "nearby_leakage": "mean fraction of pixels nearest the reference nearby object's colour, background-unsaid prompts",
    "background_leakage": "mean fraction of the outer 5-px frame nearest the reference background's colours, "
                          "background-unsaid prompts",
    "nearby_object_leakage": "fraction of pixels in object-sized regions of the nearby object's colour (4-connected, "
                             "each <= 6 % of the image: a subject or background drawn in that colour is not the "
                             "object), 0 in images whose frame is >= 25 % that colour",
    "text_alignment": "fraction of asked-background images where that colour covers >= 40 %",
    "subject_fidelity": "fraction of images where the subject's colours (body + stripes) cover >= 3 %",
}


def quality_report_html(rows: list[Row], *, base: str, references: Sequence[tw.ReferenceSet], seeds: int,
                        images_per_prompt: int, options: dict) -> str:
    """The HTML report of a run: the first seed's image grids per configuration and the metric table."""
    results = [report.ConceptResult(
        concept_id=r.config.name, label=r.config.name,
        metrics={m: r.mean(m) for m in tw.METRICS if m in r.per_seed},
        prompts=[report.PromptResult(text=text, kind="editing", images=pngs) for text, pngs in r.images.items()])
        for r in rows]
    meta = report.ReportMeta(
        title="persona bench quality: entanglement on the toy world",
        settings={"base model": base, "sets": ", ".join(r.name for r in references), "seeds": seeds,
                  "images per prompt": images_per_prompt, **options},
        sources=dict(_QUALITY_SOURCES))
    return report.render_html(results, meta)


def training_option_pairs(pairs: list[str]) -> dict:
    """--set KEY=VALUE → TrainingOptions values: numbers and booleans parsed, commas make a list."""
    fields = train_pb2.TrainingOptions.DESCRIPTOR.fields_by_name
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise InvalidArgument(f"`--set` {pair!r}: use KEY=VALUE with a TrainingOptions field, e.g. lora_rank=8")
        try:
            result[key] = _parse_option(fields[key], value, key)
        except ValueError:
            raise InvalidArgument(f"`--set` {pair!r}: {key} takes a number, e.g. --set {key}=8") from None
        except InvalidSetting as e:
            raise InvalidArgument(e.message) from None
    return result


def _parse_option(kind, value: str, key: str):
    if kind.is_repeated:
        return [v.strip() for v in value.split(",") if v.strip()]
    if kind.type == kind.TYPE_BOOL:
        return parse_flag(value, f"--set {key}") is True
    if kind.type in (kind.TYPE_INT32, kind.TYPE_INT64):
        return int(value)
    if kind.type in (kind.TYPE_DOUBLE, kind.TYPE_FLOAT):
        return float(value)
    return value
