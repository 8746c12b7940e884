"""Evaluate use cases: check a request, then an "evaluate" job draws every concept on every prompt through the
generate service (whatever engine it runs: embedded or Triton), measures the images against the subject's
photos and writes the report (HTML, JSON, CSV) as artifacts named in the job's result.

Per concept: the subject photos are the references; their masks come from the mask service (a stored mask, e.g.
from clicks, else Grounded-SAM on the class name, stored for next time), as SID's metrics segment them. Per
prompt: `images_per_prompt` images from seeds seed, seed+1, … (the same for every concept, so columns compare);
the identifier's cross-attention map of the first image (drawn again in this process with torch from the concept's
diffusers export, since an engine like Triton does not hand out attention). A concept without a diffusers export
(models/fusing.py IN_PROCESS_METHODS: p3s, whose condition branch runs beside the UNet, and customcontrast, made from
an encoder without fine-tuning) gets no overlays: its images and metrics are measured like any other's (a p3s
concept's drawn with the request's p3s_* settings, when it sets them) and the report says "attention maps: not
available for p3s concepts" (or customcontrast) beside it; an export refused for another reason
(FAILED_PRECONDITION) is noted the same way, so one concept's missing overlays never fail the report. Generated images are segmented (Grounded-SAM on the class
name) for CustomContrast's subject-only scores. Each metric's model and reading is stated in the report.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.devices import device_name
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from persona.services.runtime.job_store import JobRecord
from persona.services.runtime.jobs import JobContext, JobRunner

from ..generate import sampling
from ..generate.domain import GenerateDomain, GenerateRequest
from ..generate.options import MAX_IMAGES_PER_PROMPT
from ..mask.domain import GROUNDED_SAM, MaskDomain
from ..models.fusing import CUSTOMCONTRAST, IN_PROCESS_METHODS, P3S
from ..models.library import ModelLibrary
from ..subjects.domain import SubjectRepository
from . import attention, metrics, prompts, report
from .settings import EvaluateSettings

KIND = "evaluate"
METRICS = ("clip_i", "clip_t", "dino", "sa", "nsd", "ta", "clip_i_var", "dino_var", "r_ci", "e_ci", "r_di", "e_di",
           "attention")
MAX_CONCEPTS = 8
MAX_PROMPTS = 100
DEFAULTS = {"images_per_prompt": 4, "seed": 0, "steps": 50, "guidance_scale": 7.5}  # SID's sampling settings


@dataclass(frozen=True)
class EvaluationRequest:
    concept_ids: tuple[str, ...]
    prompt_set: str = ""
    prompts: tuple[str, ...] = ()
    images_per_prompt: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    metrics: tuple[str, ...] = ()
    resolution: int | None = None
    # How p3s concepts are drawn: GenerateRequest's p3s_* settings the request sets ({"p3s_injection_lambda": 0.5}).
    p3s: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    job_id: str
    concept_ids: list[str]
    metrics: list[dict]  # {concept_id, metric, value, source}
    html_artifact_id: str
    json_artifact_id: str
    csv_artifact_id: str
    images: int
    seconds: float


class EvaluateDomain:
    def __init__(self, artifacts: LocalArtifactStore, runner: JobRunner, subjects: SubjectRepository,
                 models: ModelLibrary, generate: GenerateDomain, masks: MaskDomain, settings: EvaluateSettings):
        self.artifacts, self.runner, self.subjects = artifacts, runner, subjects
        self.models, self.generate, self.masks, self.settings = models, generate, masks, settings
        runner.register(KIND, self._run, resumable=False)

    def start(self, tenant_id: str, request: EvaluationRequest) -> JobRecord:
        """Checks everything a job would trip over later, then queues it."""
        concept_ids = list(dict.fromkeys(c.strip() for c in request.concept_ids if c.strip()))
        if not concept_ids:
            raise InvalidArgument("`concept_ids` is empty: pass the concepts to evaluate (`persona-cli concepts list`)")
        if len(concept_ids) > MAX_CONCEPTS:
            raise InvalidArgument(f"`concept_ids` has {len(concept_ids)} concepts; at most {MAX_CONCEPTS} per report")
        methods = set()
        for concept_id in concept_ids:
            concept = self.models.get(tenant_id, concept_id)  # NOT_FOUND, also for another tenant's
            if not concept.files_of("weights"):
                raise FailedPrecondition(f"concept {concept_id} is {concept.state} and has no weights: evaluate it "
                                         f"when job {concept.job_id} has finished")
            methods.add(concept.method)
        if request.p3s and P3S not in methods:
            raise InvalidArgument(f"`{next(iter(request.p3s))}` is set but no concept of `concept_ids` is a p3s "
                                  "concept: the p3s_* settings say how p3s concepts are drawn; leave them unset")
        wanted = list(dict.fromkeys(request.metrics)) or list(METRICS)
        unknown = [m for m in wanted if m not in METRICS]
        if unknown:
            raise InvalidArgument(f"`metrics` has unknown {', '.join(unknown)}: use some of {', '.join(METRICS)}")
        n = _count("images_per_prompt", request.images_per_prompt, DEFAULTS["images_per_prompt"], 1,
                   MAX_IMAGES_PER_PROMPT)
        if request.prompts and request.prompt_set:
            raise InvalidArgument("give `prompt_set` or `prompts`, not both")
        prompt_set = "" if request.prompts else (request.prompt_set or prompts.DREAMBENCH)
        if prompt_set and prompt_set not in prompts.BUILTIN_SETS:
            raise InvalidArgument(f"`prompt_set` is {prompt_set!r}: use one of {', '.join(prompts.BUILTIN_SETS)}, or "
                                  "send your own prompts in `prompts` (the CLI reads --prompts FILE for you)")
        if request.prompts:
            first = self.models.get(tenant_id, concept_ids[0])
            parsed = prompts.parse_prompts("\n".join(request.prompts), first.class_name, first.token)
            if len(parsed) > MAX_PROMPTS:
                raise InvalidArgument(f"`prompts` has {len(parsed)} prompts; at most {MAX_PROMPTS}")
        params = {
            "concept_ids": concept_ids, "prompt_set": prompt_set, "prompts": list(request.prompts),
            "images_per_prompt": n,
            "seed": DEFAULTS["seed"] if request.seed is None else request.seed,
            "steps": DEFAULTS["steps"] if request.steps is None else request.steps,
            "guidance_scale": DEFAULTS["guidance_scale"] if request.guidance_scale is None else request.guidance_scale,
            "metrics": wanted, "resolution": request.resolution, "p3s": dict(request.p3s),
        }
        if request.resolution is not None and (request.resolution % 8 or not 8 <= request.resolution <= 2048):
            raise InvalidArgument(f"`resolution` is {request.resolution}: use a multiple of 8 from 8 to 2048, or "
                                  "leave it unset for each concept's native resolution")
        # Sampling values are checked by the generate service's own rules now, not after minutes of work.
        probe = GenerateRequest(prompts=("probe",), concept_id=concept_ids[0], seed=params["seed"],
                                steps=params["steps"], guidance_scale=params["guidance_scale"],
                                width=request.resolution, height=request.resolution, images_per_prompt=n,
                                **request.p3s)  # bounds and choices of the p3s settings too
        self.generate.check(probe)
        return self.runner.submit(tenant_id, KIND, params)

    def report(self, tenant_id: str, job_id: str) -> Report:
        job = self._job(tenant_id, job_id)
        if job.state != "SUCCEEDED":
            raise FailedPrecondition(f"job {job_id} is {job.state}: its report exists once it has SUCCEEDED "
                                     f"(`persona-cli jobs watch {job_id}`)")
        r = job.result
        return Report(job_id, r["concept_ids"], r["metrics"], r["html_artifact_id"], r["json_artifact_id"],
                      r["csv_artifact_id"], r["images"], r["seconds"])

    def read_file(self, tenant_id: str, job_id: str, artifact_id: str):
        found = self.report(tenant_id, job_id)
        if artifact_id not in (found.html_artifact_id, found.json_artifact_id, found.csv_artifact_id):
            raise InvalidArgument(f"`artifact_id` {artifact_id!r} is not a file of the report of {job_id}")
        return self.artifacts.read_chunks(artifact_id)

    def _job(self, tenant_id: str, job_id: str) -> JobRecord:
        job = self.runner.store.get(job_id, tenant_id)
        if job.kind != KIND:
            raise NotFound(f"job {job_id} is a {job.kind} job, not an evaluation")
        return job

    # -- the job

    def _run(self, ctx: JobContext) -> dict:
        started = time.perf_counter()
        params, tenant_id = ctx.job.params, ctx.job.tenant_id
        wanted = set(params["metrics"])
        clip = metrics.ClipEmbedder(self.settings.clip_model, device=self.settings.device)
        dino = metrics.DinoEmbedder(self.settings.dino_model, device=self.settings.device) if wanted & {
            "dino", "dino_var", "r_di", "e_di"} else None
        results = []
        total = len(params["concept_ids"])
        for index, concept_id in enumerate(params["concept_ids"]):
            def progress(fraction: float, message: str) -> None:
                ctx.progress((index + fraction) / total, f"{concept_id}: {message}", stage="evaluate",
                             concept_id=concept_id)

            results.append(self._measure(ctx, tenant_id, concept_id, params, wanted, clip, dino, progress))
        report.make_labels_unique(results)
        meta = report.ReportMeta(
            title=f"persona evaluation of {', '.join(r.label for r in results)}",
            settings={"prompt set": params["prompt_set"] or "own prompts", "images per prompt":
                      params["images_per_prompt"], "seed": params["seed"], "DDIM steps": params["steps"],
                      "guidance": params["guidance_scale"], "engine": self.generate.engine.name,
                      **({"p3s concepts drawn with": _p3s_text(params["p3s"])} if params.get("p3s") else {})},
            sources=_sources(self.settings, wanted))
        html_id = self.artifacts.put(report.render_html(results, meta).encode())
        json_id = self.artifacts.put(report.render_json(results, meta).encode())
        csv_id = self.artifacts.put(report.render_csv(results).encode())
        ctx.progress(1.0, "report written")
        return {"concept_ids": params["concept_ids"], "html_artifact_id": html_id, "json_artifact_id": json_id,
                "csv_artifact_id": csv_id, "images": sum(len(p.images) for r in results for p in r.prompts),
                "seconds": time.perf_counter() - started,
                "metrics": [{"concept_id": r.concept_id, "metric": m, "value": v, "source": meta.sources.get(m, "")}
                            for r in results for m, v in r.metrics.items()]
                + [{"concept_id": r.concept_id, "metric": report.NO_SUBJECT, "value": float(r.no_subject_images),
                    "source": report.NO_SUBJECT_SOURCE} for r in results if r.no_subject_images is not None]}

    def _measure(self, ctx, tenant_id, concept_id, params, wanted, clip, dino, progress) -> report.ConceptResult:
        concept = self.models.get(tenant_id, concept_id)
        subject = self.subjects.get(tenant_id, concept.subject_id)
        prompt_list = (prompts.prompt_set(params["prompt_set"], concept.class_name, concept.token)
                       if params["prompt_set"] else
                       prompts.parse_prompts("\n".join(params["prompts"]), concept.class_name, concept.token))
        progress(0.0, "reference photos and their masks")
        references = [self.subjects.image_rgb(tenant_id, subject.subject_id, i.image_id) for i in subject.images]
        reference_masks = [self._reference_mask(tenant_id, subject, i.image_id) for i in subject.images]
        refs = _References(clip, dino, references, reference_masks, wanted)
        # The request's p3s drawing settings, for p3s concepts only (another concept would refuse them).
        p3s = params.get("p3s", {}) if concept.method == P3S else {}
        notes: list[str] = []
        attention = None
        if "attention" in wanted and concept.method in IN_PROCESS_METHODS:
            notes.append(attention_unavailable(concept.method))
        elif "attention" in wanted:
            attention = _AttentionDrawer(self.models, tenant_id, concept, self.settings)

        per_prompt: list[report.PromptResult] = []
        all_scores: list[dict] = []
        all_clip, all_dino = [], []
        for number, prompt in enumerate(prompt_list):
            ctx.check_cancelled()
            progress(number / len(prompt_list), f"prompt {number + 1}/{len(prompt_list)}: {prompt.text}")
            drawn = list(self.generate.generate(tenant_id, GenerateRequest(
                prompts=(prompt.text,), concept_id=concept_id, seed=params["seed"], steps=params["steps"],
                guidance_scale=params["guidance_scale"], scheduler="ddim", width=params["resolution"],
                height=params["resolution"], images_per_prompt=params["images_per_prompt"], **p3s)))
            images = [Image.open(io.BytesIO(d.png)).convert("RGB") for d in drawn]
            scores, embedded = refs.score(prompt, images, concept.token, self.masks, concept.class_name)
            all_scores.append(scores)
            all_clip.append(embedded["clip"])
            if embedded.get("dino") is not None:
                all_dino.append(embedded["dino"])
            overlay = None
            if attention is not None:
                try:
                    overlay = attention.overlay_png(drawn[0].settings)
                except FailedPrecondition as exc:  # e.g. no diffusers export: the rest of the report goes on
                    notes.append(f"attention maps: not available ({exc.message})")
                    attention = None
            per_prompt.append(report.PromptResult(prompt.text, prompt.kind, [d.png for d in drawn], overlay,
                                                  {k: v for k, v in scores.items() if k in wanted}))
        overall = refs.overall(all_scores, all_clip, all_dino, [p.kind for p in prompt_list])
        label = f"{concept.display_name or concept.token} · {concept.method} · {concept.captions} captions"
        if concept.regularizers:
            label += " · " + "+".join(concept.regularizers)
        no_subject = overall.get("no_subject_images")
        return report.ConceptResult(concept_id, label, {k: v for k, v in overall.items() if k in wanted}, per_prompt,
                                    None if no_subject is None else int(no_subject),
                                    sum(len(p.images) for p in per_prompt), notes)

    def _reference_mask(self, tenant_id: str, subject, image_id: str) -> np.ndarray:
        """The photo's stored mask, else Grounded-SAM on the class name (stored, so the next report reuses it)."""
        mask = self.masks.mask_array(tenant_id, subject.subject_id, image_id)
        if mask is None:
            self.masks.from_text(tenant_id, subject.subject_id, image_id, subject.class_name, GROUNDED_SAM)
            mask = self.masks.mask_array(tenant_id, subject.subject_id, image_id)
        return mask


class _References:
    """The subject photos embedded once (whole and as subject / non-subject segments), scoring each prompt."""

    def __init__(self, clip, dino, photos: list, masks: list, wanted: set[str]):
        self.clip, self.dino, self.wanted = clip, dino, wanted
        self.clip_photos = clip.image_embeddings(photos)
        self.dino_photos = dino.image_embeddings(photos) if dino is not None else None
        self.clip_subjects, self.clip_rest = metrics.reference_segment_embeddings(clip, photos, masks)
        self.dino_subjects = (dino.image_embeddings([metrics.subject_segment(p, m) for p, m in zip(photos, masks)])
                              if dino is not None else None)

    def score(self, prompt, images: list, token: str, masks: MaskDomain, class_name: str) -> tuple[dict, dict]:
        clip_images = self.clip.image_embeddings(images)
        text = self.clip.text_embeddings([prompt.text])
        stripped = self.clip.text_embeddings([metrics.strip_identifier(prompt.text, token)])
        scores = {"clip_i": metrics.clip_i(clip_images, self.clip_photos), "clip_t": metrics.clip_t(clip_images, text),
                  "sa": metrics.subject_alignment(clip_images, self.clip_subjects),
                  "nsd": metrics.non_subject_disentanglement(clip_images, self.clip_rest),
                  "ta": metrics.text_alignment(clip_images, stripped)}
        embedded = {"clip": clip_images}
        if self.dino is not None:
            embedded["dino"] = self.dino.image_embeddings(images)
            scores["dino"] = metrics.dino(embedded["dino"], self.dino_photos)
        if self.wanted & {"r_ci", "e_ci", "r_di", "e_di"}:
            # CustomContrast scores subject against subject: the generated images are segmented too. An image in
            # which Grounded-SAM finds no subject is scored as one without it (an all-black segment) and counted.
            found = [masks.segment(image, class_name) for image in images]
            scores["no_subject"] = float(sum(not np.asarray(m).any() for m in found))
            segments = [metrics.subject_segment(image, m, empty_ok=True) for image, m in zip(images, found)]
            scores["segment_clip_i"] = metrics.clip_i(self.clip.image_embeddings(segments), self.clip_subjects)
            if self.dino is not None:
                scores["segment_dino"] = metrics.dino(self.dino.image_embeddings(segments), self.dino_subjects)
        return scores, embedded

    def overall(self, scores: list[dict], all_clip: list, all_dino: list, kinds: list[str]) -> dict:
        """The concept's figures over every prompt: pairwise ones over all images at once, SID's and CLIP-T as the
        mean of the prompts' (each prompt has its own text), CustomContrast's split by prompt kind."""
        clip_images = np.concatenate(all_clip)
        result = {"clip_i": metrics.clip_i(clip_images, self.clip_photos),
                  "clip_i_var": metrics.variance(metrics.per_image_scores(clip_images, self.clip_photos))}
        for name in ("clip_t", "sa", "nsd", "ta"):
            result[name] = float(np.mean([s[name] for s in scores]))
        if all_dino:
            dino_images = np.concatenate(all_dino)
            result["dino"] = metrics.dino(dino_images, self.dino_photos)
            result["dino_var"] = metrics.variance(metrics.per_image_scores(dino_images, self.dino_photos))
        if all("no_subject" in s for s in scores):
            result["no_subject_images"] = sum(s["no_subject"] for s in scores)
        for segment, (r_name, e_name) in (("segment_clip_i", ("r_ci", "e_ci")), ("segment_dino", ("r_di", "e_di"))):
            if all(segment in s for s in scores):
                split = metrics.split_scores([s[segment] for s in scores], kinds)
                result[r_name], result[e_name] = split.reconstruction, split.editing
        return {k: float(v) for k, v in result.items() if v is not None}


@dataclass
class _AttentionDrawer:
    """The concept's torch model in this process, to draw a prompt's first image again with attention capture."""

    models: ModelLibrary
    tenant_id: str
    concept: object
    settings: EvaluateSettings
    _loaded: tuple | None = field(default=None)

    def overlay_png(self, sampling_settings) -> bytes:
        models, tokenizer, scheduler_config = self._models()
        image, heat = attention.draw_with_attention(models, tokenizer, scheduler_config, sampling_settings,
                                                    self.concept.token)
        buffer = io.BytesIO()
        attention.overlay(image, heat).save(buffer, format="PNG")
        return buffer.getvalue()

    def _models(self):
        if self._loaded is None:
            import torch
            from transformers import CLIPTokenizer

            folder = self.models.exports.diffusers_folder(self.tenant_id, self.concept.concept_id,
                                                          self.settings.work_dir / self.concept.concept_id)
            device = device_name(self.settings.device)
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
            self._loaded = (sampling.TorchModels.from_folder(folder, device=device, dtype=dtype),
                            CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                            sampling.scheduler_config(folder))
        return self._loaded


def attention_unavailable(method: str) -> str:
    """The report's note for a concept of an IN_PROCESS_METHODS method (no diffusers export to redraw from)."""
    if method == CUSTOMCONTRAST:
        return ("attention maps: not available for customcontrast concepts (made from an encoder without fine-tuning: "
                "their tokens enter through the encoder's own cross-attention beside the UNet's, drawn only by the "
                "generate service's embedded engine, and have no diffusers export to redraw with attention capture)")
    return (f"attention maps: not available for {method} concepts (their condition branch runs beside the UNet, "
            "drawn only by the generate service, and has no diffusers export to redraw with attention capture)")


def _p3s_text(settings: dict) -> str:
    """The report's line for the p3s settings a request set: "p3s_injection_lambda 0.5, p3s_reference 1"."""
    return ", ".join(f"{name} {value}" for name, value in settings.items()) + " (the rest as each concept trained)"


def _count(name: str, value: int | None, default: int, low: int, high: int) -> int:
    value = default if value is None else value
    if not low <= value <= high:
        raise InvalidArgument(f"`{name}` is {value}: use {low}–{high} (default {default})")
    return value


def _sources(settings: EvaluateSettings, wanted: set[str]) -> dict[str, str]:
    clip, dino_model = settings.clip_model, settings.dino_model
    sources = {
        "clip_i": f"DreamBench CLIP-I: mean cosine of {clip} image embeddings, every generated × reference pair",
        "clip_t": f"DreamBench CLIP-T: mean raw cosine of {clip} image and prompt embeddings",
        "dino": f"DreamBench DINO: mean cosine of {dino_model} CLS embeddings, every generated × reference pair",
        "sa": f"SID Eq. 1: {clip} cosine of generated images to the references' subject segments (Grounded-SAM "
              "or stored masks; black fill, cropped and centred)",
        "nsd": f"SID Eq. 2: 1 − {clip} cosine of generated images to the references' non-subject segments",
        "ta": f"SID Eq. 3: {clip} CLIP-T with the identifier removed from the prompt",
        "clip_i_var": "P3S CLIP-Iv: population variance of the per-image CLIP-I scores",
        "dino_var": "P3S DINO-v: population variance of the per-image DINO scores",
        "r_ci": "CustomContrast R-CI: CLIP-I between subject segments (generated segmented with Grounded-SAM), "
                "reconstruction prompts",
        "e_ci": "CustomContrast E-CI: the same over editing prompts",
        "r_di": "CustomContrast R-DI: DINO between subject segments, reconstruction prompts",
        "e_di": "CustomContrast E-DI: the same over editing prompts",
        "attention": "SID §5: the identifier token's cross-attention, averaged over timesteps, layers and heads",
    }
    return {k: v for k, v in sources.items() if k in wanted}
