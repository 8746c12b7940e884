"""Train use cases: validate a request, run it as a resumable "train" job, keep and export the concept.

Everything a request can get wrong is checked in `start`, before anything is stored or queued: the
subject, the base model (available offline?), the method, the regularisers and each option. The job
then loads the photos and the captions recorded at start, draws (or reuses) the class images for
prior preservation, and runs the one training loop with checkpoints in the concept's work folder; a
job resumed after a crash continues from the last checkpoint.

Exports of a concept to other formats live in exports.py (`TrainDomain.exports`).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from dataclasses import dataclass, fields as dataclass_fields
from pathlib import Path
from typing import Iterator

from PIL import Image

from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.errors import (Cancelled, FailedPrecondition, InvalidArgument, NotFound, PersonaError,
                                             ResourceExhausted)
from persona.services.runtime.jobs import TERMINAL, JobContext, JobRecord, JobRunner, hold
from persona.services.runtime.metadata import MetadataStore
from persona.services.runtime.model_access import ModelAccess
from persona.services.runtime.paging import Page
from persona.services.runtime.validation import check_range

from ..caption import instructions
from ..caption.domain import CaptionDomain
from ..subjects.domain import Subject, SubjectRepository, indefinite_article
from ..subjects.images import png_bytes
from . import concepts as concept_store
from .base_models import ResolvedBaseModel, resolve_base_model
from .concepts import Concept, ConceptFile, ConceptStore, TrainingCaption
from .exports import ConceptExports, store_folder
from .loop import DEFAULT_LEARNING_RATES, TrainConfig, train
from .methods import METHODS
from .methods.textual_inversion import WEIGHT_NAME as TI_WEIGHT_NAME, read_learned_embeds
from .prior import MAX_CLASS_IMAGES, ClassImageCache, base_model_identity, class_prompt_for
from .settings import TrainSettings

log = logging.getLogger("persona.train")

JOB_KIND = "train"
DEFAULT_METHOD = "lora"
# Regularisers each method can use. Textual inversion learns one embedding from the photos alone, so
# prior preservation (a UNet-side term) has nothing to protect there. Custom Diffusion regularises with real
# images of the class in the paper; prior preservation's generated class images are the closest we have.
# SVDiff's paper trains with prior preservation, as DreamBooth.
# Methods whose own weights include the text side (a token row): what SPL and CoRe act on. dreambooth and lora
# qualify with train_text_encoder.
TEXT_SIDE_METHODS = ("ti", "custom_diffusion", "svdiff")
REGULARIZERS = {"prior": ("dreambooth", "lora", "custom_diffusion", "svdiff"),
                "mask": tuple(METHODS),
                "spl": (*TEXT_SIDE_METHODS, "dreambooth", "lora"),
                "core": (*TEXT_SIDE_METHODS, "dreambooth", "lora")}
# On unless a request turns them off with "none"; named regularisers add to them.
DEFAULT_REGULARIZERS = ("prior",)
NO_REGULARIZERS = "none"
# Continuing from a parent concept (CoRe's stage 2): the parent kinds whose token embedding is loaded and frozen,
# and the methods that then train the UNet around it.
PARENT_METHODS = ("ti",)
CHILD_METHODS = ("dreambooth", "lora")
# "class" is Case 1; "caseN" trains on stored captions of SID case N only.
CAPTION_SOURCES = ("sid", "class", "case1", "case2", "case3", "case4")
DEFAULT_OPTIONS = {
    "steps": 400, "batch_size": 1, "seed": 0, "train_text_encoder": False, "lora_rank": 4,
    "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"], "gradient_checkpointing": False, "min_snr_gamma": None,
    "lr_scheduler": "constant", "lr_warmup_steps": 0, "use_8bit_adam": False, "prior_loss_weight": 1.0,
    "unmasked_weight": 0.1, "spl_weight": 1.0, "core_emb_weight": 1.5e-4, "core_attn_weight": 0.05,
    "core_variant": "cosine", "core_rescale_start": 120, "core_rescale_end": 180,
    "num_class_images": 100, "class_image_steps": 30, "checkpoint_every": 100, "validation_every": 0, "max_grad_norm": 1.0,
}
# Range of each float option: (low, high, low excluded). NaN and infinity never get here (the request check refuses
# them), but 1e30 would, and then fails deep in the job.
FLOAT_OPTION_RANGES = {
    "learning_rate": (0.0, 1.0, True), "lora_alpha": (0.0, 1e4, True), "min_snr_gamma": (0.0, 1e3, True),
    "prior_loss_weight": (0.0, 1e3, False), "max_grad_norm": (0.0, 1e6, False), "unmasked_weight": (0.0, 1.0, False),
    "spl_weight": (0.0, 1e3, False), "core_emb_weight": (0.0, 1e3, False), "core_attn_weight": (0.0, 1e3, False),
}
# Options that are not TrainConfig fields (they shape the data, not the loop).
_DATA_OPTIONS = ("num_class_images", "class_prompt", "epochs", "class_image_steps")
# Progress events are written at most this often (plus the first and last step): a fast GPU run
# should not spend its time in SQLite.
EVENT_INTERVAL_S = 0.5
# The job result keeps the loss of every step up to this many, else of every k-th step.
MAX_CURVE_POINTS = 1000


@dataclass(frozen=True)
class TrainRequest:
    """StartTraining's fields, as plain values; `options` holds only what the caller set."""

    subject_id: str
    base_model: str = ""
    method: str = ""
    regularizers: tuple[str, ...] = ()
    captions: str = ""
    options: dict | None = None
    display_name: str = ""
    # A READY ti concept of the same subject and base model to continue from (CoRe's stage 2); "" for none.
    parent_concept_id: str = ""
    # object | style | expression; "": the mode of the subject's stored captions, else object.
    mode: str = ""


class TrainDomain:
    """Concepts of every tenant; training runs as resumable "train" jobs, one per device at a time."""

    def __init__(self, db: MetadataStore, artifacts: LocalArtifactStore, subjects: SubjectRepository,
                 captions: CaptionDomain, runner: JobRunner, settings: TrainSettings, work_dir: Path,
                 masks=None, dispatcher=None, model_access: ModelAccess | None = None):
        self.db, self.artifacts, self.subjects, self.captions = db, artifacts, subjects, captions
        # The mask service's domain (MaskDomain): subject masks for the masked loss.
        self.masks = masks
        self.runner, self.settings, self.work_dir = runner, settings, work_dir
        # Which base models a request may name (default: any folder, as the embedded CLI).
        self.model_access = model_access or ModelAccess()
        self.concepts = ConceptStore(db)
        self.class_images = ClassImageCache(db, artifacts)
        # One training run per process at a time: two runs on one GPU would both run out of memory.
        self._device_lock = threading.Lock()
        # `dispatcher` (dispatch.train_dispatcher): training in worker processes or Kubernetes Jobs instead of
        # this process's job threads; exports stay here (they are short, and Triton's repository is local).
        runner.register(JOB_KIND, self._run, resumable=True, dispatcher=dispatcher)
        self.exports = ConceptExports(self.concepts, artifacts, settings, work_dir, runner, self.get, self._device,
                                      self._on_cuda)

    # Requests -----------------------------------------------------------------------------------

    def start(self, tenant_id: str, request: TrainRequest) -> JobRecord:
        """Checks everything, records the concept (TRAINING) with its captions, and queues its job."""
        subject = self.subjects.get(tenant_id, request.subject_id)
        if not subject.images:
            raise FailedPrecondition(f"subject {subject.subject_id} has no images: add photos with "
                                     "`persona-cli subjects add PHOTOS… --class …` and train that subject")
        method = (request.method or DEFAULT_METHOD).strip().lower()
        if method not in METHODS:
            raise InvalidArgument(f"`method` is {request.method!r}: use one of {', '.join(METHODS)}")
        regularizers = _regularizers(request.regularizers, method)
        captions = (request.captions or "sid").strip().lower()
        if captions not in CAPTION_SOURCES:
            raise InvalidArgument(f"`captions` is {request.captions!r}: use sid (the stored SID captions), class "
                                  "(the template 'a photo of a sks dog'), or case1–case4 (SID's ablation)")
        captions = "class" if captions == "case1" else captions
        stored_captions = self.captions.list(tenant_id, subject.subject_id)
        mode = _mode(request.mode, stored_captions)
        parent = self._parent(tenant_id, request.parent_concept_id.strip(), method, subject)
        base = self.resolve_base(request.base_model or (parent.base_model if parent else ""))
        options, config = self._options(request.options or {}, method, subject, base, regularizers, mode)
        if parent is not None:
            self._check_parent_options(parent, request, base, options, regularizers)
        if "prior" in regularizers:
            self._check_prior_options(options)
        if "mask" in regularizers and all(m is None for m in self._masks(tenant_id, subject.subject_id,
                                                                          [i.image_id for i in subject.images])):
            raise FailedPrecondition(
                f"`regularizers` mask needs subject masks, and no photo of {subject.subject_id} has one: make them "
                f"with `persona-cli mask {subject.subject_id} --text {subject.class_name}` (or clicks: --point X,Y)")
        text_side = [r for r in regularizers if r in ("spl", "core")]
        if text_side and method not in TEXT_SIDE_METHODS and not options["train_text_encoder"]:
            raise InvalidArgument(
                f"`regularizers` {' and '.join(text_side)} act on the text side, which `method` {method} does not "
                "train: set `train_text_encoder`, or use ti, custom_diffusion or svdiff")
        training_captions = self._training_captions(subject, captions, mode, stored_captions)
        display_name = request.display_name.strip() or f"{method} of {subject.display_name or subject.subject_id}"
        if len(display_name) > 200:
            raise InvalidArgument(f"`display_name` is {len(display_name)} characters; at most 200")
        concept = self.concepts.create(
            tenant_id=tenant_id, subject_id=subject.subject_id, display_name=display_name, token=subject.token,
            class_name=subject.class_name, base_model=base.ref, base_model_sha256=base_model_identity(base.path),
            base_model_family=base.family, method=method, regularizers=regularizers, captions=captions,
            options=options, training_captions=training_captions, resolution=config.resolution,
            persona_version=_persona_version(), parent_concept_id=parent.concept_id if parent else "")
        try:
            job = self.runner.submit(tenant_id, JOB_KIND, {"concept_id": concept.concept_id}, subject.subject_id)
        except BaseException:
            self.concepts.delete(concept.concept_id)
            raise
        self.concepts.update(concept.concept_id, job_id=job.job_id)
        return job

    def resolve_base(self, ref: str) -> ResolvedBaseModel:
        """A request's base model (empty: the server's default), through the model access policy; its `ref` stays
        as the request named it."""
        ref = (ref or "").strip()
        if not ref or ref == self.settings.default_base_model:  # the operator's own choice
            return resolve_base_model(ref or self.settings.default_base_model, self.settings)
        return dataclasses.replace(resolve_base_model(self.model_access.locate(ref, "base_model"), self.settings),
                                   ref=ref)

    def get(self, tenant_id: str, concept_id: str) -> Concept:
        return self._reconciled(self.concepts.get(concept_id, tenant_id))

    def list(self, tenant_id: str, page: Page, subject_id: str = "") -> tuple[list[Concept], str]:
        concepts, token = self.concepts.list(tenant_id, page, subject_id)
        return [self._reconciled(c) for c in concepts], token

    def delete(self, tenant_id: str, concept_id: str) -> None:
        concept = self.get(tenant_id, concept_id)
        if concept.state == concept_store.TRAINING:
            raise FailedPrecondition(f"concept {concept_id} is still training: cancel job {concept.job_id} first "
                                     f"(`persona-cli jobs cancel {concept.job_id}`)")
        self.concepts.delete(concept_id)
        shutil.rmtree(self._work_dir(concept_id), ignore_errors=True)

    def read_file(self, tenant_id: str, concept_id: str, artifact_id: str) -> Iterator[tuple[int, bytes, int]]:
        """Chunks (offset, data, total size) of one file of the concept."""
        concept = self.get(tenant_id, concept_id)
        if not any(f.artifact_id == artifact_id for f in concept.files):
            raise InvalidArgument(f"`artifact_id` {artifact_id!r} is not a file of concept {concept_id}: see its "
                                  "files with GetConcept, or export it with ExportConcept")
        return self.artifacts.read_chunks(artifact_id)

    # Validation of a request -----------------------------------------------------------------------

    def _options(self, given: dict, method: str, subject: Subject, base: ResolvedBaseModel,
                 regularizers: list[str], mode: str) -> tuple[dict, TrainConfig]:
        """Every option with its default filled in, and the TrainConfig they make (validated)."""
        unknown = set(given) - set(_OPTION_NAMES)
        if unknown:
            raise InvalidArgument(f"unknown option(s) {', '.join(sorted(unknown))}: see TrainingOptions")
        options = {**DEFAULT_OPTIONS, **{k: v for k, v in given.items() if v is not None or k == "min_snr_gamma"}}
        for name, (low, high, low_open) in FLOAT_OPTION_RANGES.items():
            check_range(name, given.get(name), low, high, low_open=low_open)
        if "epochs" in given:
            if "steps" in given:
                raise InvalidArgument("`steps` and `epochs` are both set: give one of them")
            if not given["epochs"] >= 1:
                raise InvalidArgument(f"`epochs` is {given['epochs']}: use 1 or more")
            per_epoch = -(-len(subject.images) // max(1, options["batch_size"]))
            options["steps"] = given["epochs"] * per_epoch
        options.setdefault("learning_rate", DEFAULT_LEARNING_RATES[method])
        options.setdefault("resolution", base.native_resolution)
        options.setdefault("lora_alpha", options["lora_rank"])
        options["lora_targets"] = list(options.get("lora_targets") or DEFAULT_OPTIONS["lora_targets"])
        options["initializer_token"] = options.get("initializer_token") or subject.class_name.split()[-1]
        options["mixed_precision"] = options.get("mixed_precision") or ("fp16" if self._on_cuda() else "no")
        options["class_prompt"] = options.get("class_prompt") or (
            instructions.class_prompt(mode, subject.class_name) if mode == "style"
            else class_prompt_for(subject.class_name))
        options["validation_prompts"] = list(options.get("validation_prompts") or [_validation_prompt(mode, subject)])
        limits = self.settings
        if options["resolution"] > limits.max_resolution:
            raise InvalidArgument(f"`resolution` is {options['resolution']}: this server trains at most "
                                  f"{limits.max_resolution} (PERSONA_TRAIN_MAX_RESOLUTION); e.g. 512 for SD-1.5")
        if options["batch_size"] > limits.max_batch_size:
            raise InvalidArgument(f"`batch_size` is {options['batch_size']}: this server takes at most "
                                  f"{limits.max_batch_size} (PERSONA_TRAIN_MAX_BATCH); e.g. 1, as DreamBooth")
        config = self._config(options, method, subject.token, regularizers, subject.class_name)
        config.validate()
        return options, config

    def _config(self, options: dict, method: str, token: str, regularizers, class_name: str) -> TrainConfig:
        values = {k: v for k, v in options.items() if k not in _DATA_OPTIONS}
        values["lora_targets"] = tuple(values["lora_targets"])
        values["validation_prompts"] = tuple(values["validation_prompts"])
        # Prior preservation is the loop's own (class images in the batch); the rest are loop plugins.
        plugins = tuple(r for r in regularizers if r != "prior")
        return TrainConfig(method=method, token=token, device=self.settings.device, regularizers=plugins,
                           class_name=class_name, **values)

    def _parent(self, tenant_id: str, parent_id: str, method: str, subject: Subject) -> Concept | None:
        """The concept a request continues from (CoRe's stage 2), checked against the request; None without one."""
        if not parent_id:
            return None
        try:
            parent = self.get(tenant_id, parent_id)
        except NotFound:
            raise NotFound(f"`parent_concept_id` {parent_id!r} is not one of your concepts: see them with "
                           "`persona-cli concepts list`") from None
        if method not in CHILD_METHODS:
            raise InvalidArgument(
                f"`method` {method} cannot continue from `parent_concept_id`: the parent's embedding is loaded into "
                f"the text encoder and kept frozen while {' or '.join(CHILD_METHODS)} trains the UNet (CoRe's stage "
                "2); use method dreambooth or lora")
        if parent.method not in PARENT_METHODS:
            raise InvalidArgument(
                f"`parent_concept_id` {parent_id} is a {parent.method} concept; only ti concepts can be parents for "
                "now (CoRe's stage 1: `persona-cli train SUBJECT --method ti --reg core --steps 300 --lr 5e-3`)")
        if parent.subject_id != subject.subject_id:
            raise InvalidArgument(
                f"`parent_concept_id` {parent_id} was trained on subject {parent.subject_id}, not on `subject_id` "
                f"{subject.subject_id}: continue from a concept of the same subject")
        if parent.state != concept_store.READY:
            raise FailedPrecondition(
                f"`parent_concept_id` {parent_id} is {parent.state}, not READY: "
                + (f"wait for its job {parent.job_id} to finish" if parent.state == concept_store.TRAINING
                   else "continue from a READY concept, or train the parent again"))
        if parent.token != subject.token:
            raise FailedPrecondition(
                f"`parent_concept_id` {parent_id} learned the token {parent.token!r}, but subject {subject.subject_id}"
                f" now trains {subject.token!r}: train a new ti parent")
        if not any(f.path == TI_WEIGHT_NAME for f in parent.files_of(concept_store.WEIGHTS)):
            raise FailedPrecondition(f"`parent_concept_id` {parent_id} has no {TI_WEIGHT_NAME}: train the parent again")
        return parent

    @staticmethod
    def _check_parent_options(parent: Concept, request: TrainRequest, base: ResolvedBaseModel, options: dict,
                              regularizers: list[str]) -> None:
        """What a child of `parent` cannot do: another base model, or train anything on the text side."""
        if base_model_identity(base.path) != parent.base_model_sha256:
            if request.base_model and base.ref != parent.base_model:
                raise InvalidArgument(
                    f"`base_model` {request.base_model!r} differs from the base model of `parent_concept_id` "
                    f"{parent.concept_id} ({parent.base_model!r}): leave base_model empty to use the parent's")
            raise FailedPrecondition(
                f"the base model {base.ref!r} of `parent_concept_id` {parent.concept_id} changed on disk since the "
                "parent was trained: train the parent again")
        if options["train_text_encoder"]:
            raise InvalidArgument(
                "`train_text_encoder` cannot be used with `parent_concept_id`: the parent's embedding stays frozen "
                "while the UNet trains; turn train_text_encoder off")
        text_side = [r for r in regularizers if r in ("spl", "core")]
        if text_side:
            raise InvalidArgument(
                f"`regularizers` {' and '.join(text_side)} cannot be used with `parent_concept_id`: nothing on the "
                "text side trains in a continued run (the parent's embedding is frozen); CoRe belongs to the parent "
                "(stage 1); drop them here")

    def _parent_embedding(self, concept: Concept):
        """(token, embedding) of the concept's parent, for the loop; None when it has none."""
        if not concept.parent_concept_id:
            return None
        try:
            parent = self.concepts.get(concept.parent_concept_id, concept.tenant_id)
        except NotFound:
            raise FailedPrecondition(f"the parent concept {concept.parent_concept_id} of {concept.concept_id} was "
                                     "deleted before training started: start the training again") from None
        file = next((f for f in parent.files_of(concept_store.WEIGHTS) if f.path == TI_WEIGHT_NAME), None)
        if file is None or not self.artifacts.exists(file.artifact_id):
            raise FailedPrecondition(f"the parent concept {parent.concept_id} has no {TI_WEIGHT_NAME}: train it again")
        return read_learned_embeds(self.artifacts.path_of(file.artifact_id))

    @staticmethod
    def _check_prior_options(options: dict) -> None:
        count = options["num_class_images"]
        if not 1 <= count <= MAX_CLASS_IMAGES:
            raise InvalidArgument(f"`num_class_images` is {count}: use 1–{MAX_CLASS_IMAGES} (DreamBooth uses 100–200)")
        if not 1 <= options["class_image_steps"] <= 200:
            raise InvalidArgument(f"`class_image_steps` is {options['class_image_steps']}: use 1–200 (default 30)")
        if not options["class_prompt"].strip():
            raise InvalidArgument("`class_prompt` is empty: e.g. 'a photo of a dog'")

    @staticmethod
    def _training_captions(subject: Subject, source: str, mode: str, stored_captions) -> list[TrainingCaption]:
        """The text each image trains with, recorded now so the run does not change when captions do."""
        template = instructions.template_caption(mode, subject.class_name, subject.token)
        stored = {c.image_id: c for c in stored_captions} if source != "class" else {}
        if source.startswith("case"):  # SID's ablation: every photo captioned with exactly this case
            case = int(source[4:])
            wrong = [i.index for i in subject.images
                     if not (stored.get(i.image_id) and stored[i.image_id].case == case
                             and not stored[i.image_id].failure)]
            if wrong:
                raise FailedPrecondition(
                    f"`captions` {source} needs every photo captioned with SID case {case}; photo(s) "
                    f"{', '.join(map(str, wrong))} are not: run `persona-cli caption {subject.subject_id} --case "
                    f"{case}` first")
        result = []
        for image in subject.images:
            caption = stored.get(image.image_id)
            if caption is not None and caption.text and not caption.failure:
                result.append(TrainingCaption(image.image_id, caption.text, caption.source))
            else:
                result.append(TrainingCaption(image.image_id, template, "class"))
        return result

    def _masks(self, tenant_id: str, subject_id: str, image_ids: list[str]) -> list:
        """Each image's subject mask (bool H×W) or None, from the mask service."""
        if self.masks is None:
            return [None] * len(image_ids)
        return [self.masks.mask_array(tenant_id, subject_id, image_id) for image_id in image_ids]

    def _on_cuda(self) -> bool:
        device = self.settings.device
        if device:
            return device.startswith("cuda")
        try:
            import torch
        except ImportError:
            return False
        return torch.cuda.is_available()

    # The job ------------------------------------------------------------------------------------------

    def _run(self, ctx: JobContext) -> dict:
        concept = self.concepts.get(ctx.job.params["concept_id"])
        try:
            return self._train(ctx, concept)
        except Cancelled:
            self.concepts.update(concept.concept_id, state=concept_store.CANCELLED)
            raise
        except Exception as error:
            self.concepts.update(concept.concept_id, state=concept_store.FAILED)
            mapped = _resource_error(error)
            if mapped is error:
                raise
            raise mapped from error

    def _train(self, ctx: JobContext, concept: Concept) -> dict:
        watch = Stopwatch()
        base = self.resolve_base(concept.base_model)
        if base_model_identity(base.path) != concept.base_model_sha256:
            raise FailedPrecondition(f"base model {concept.base_model!r} changed on disk since the job started: "
                                     "start the training again")
        config = self._config({k: v for k, v in concept.options.items() if k in _OPTION_NAMES},
                              concept.method, concept.token, concept.regularizers, concept.class_name)
        examples = [(self._image(concept, c.image_id), c.text) for c in concept.training_captions]
        for warning in (_caption_fallback_warning(concept), _sid_without_prior_warning(concept)):
            if warning:
                ctx.warn(warning)
        watch.lap("preparing")
        how = "resumed" if ctx.job.attempts > 1 else "started"
        ctx.log(f"training {how}: {concept.method} on {len(examples)} image(s), {config.steps} steps",
                concept_id=concept.concept_id)

        with self._device(ctx):
            watch.lap("waiting")  # for another job to finish with the device
            class_examples, prior_stats = self._class_examples(ctx, concept, base, config)
            watch.lap("class_images")
            work = self._work_dir(concept.concept_id)
            output_dir = work / "output"
            shutil.rmtree(output_dir, ignore_errors=True)
            progress = _Progress(ctx, config.steps)
            masks = (self._masks(concept.tenant_id, concept.subject_id,
                                 [c.image_id for c in concept.training_captions])
                     if "mask" in concept.regularizers else None)
            result = train(
                base.path, examples, config, output_dir, class_examples=class_examples, instance_masks=masks,
                on_step=progress.step, should_stop=ctx.cancel_poll(),
                checkpoint_dir=work / "checkpoint", parent_embedding=self._parent_embedding(concept),
                on_validation=lambda step, images: self._store_validation(ctx, concept, step, images, progress))
            watch.lap("training")  # loading the base model included
        for warning in result.warnings:
            ctx.warn(warning)

        files = store_folder(self.artifacts, output_dir, concept_store.WEIGHTS)
        self.concepts.replace_files(concept.concept_id, concept_store.WEIGHTS, files)
        final_loss = result.losses[-1] if result.losses else 0.0
        self.concepts.update(concept.concept_id, steps_done=result.steps, final_loss=final_loss,
                             state=concept_store.CANCELLED if result.stopped else concept_store.READY)
        shutil.rmtree(work, ignore_errors=True)  # the checkpoint is only for resuming this job
        watch.lap("saving")
        if result.stopped:
            raise Cancelled(f"training of {concept.concept_id} cancelled after step {result.steps}; the weights "
                            "of that step are kept")
        every = max(1, -(-len(result.losses) // MAX_CURVE_POINTS))
        return {"concept_id": concept.concept_id, "steps": result.steps, "final_loss": final_loss,
                "resumed_from_step": result.resumed_from, "loss_curve_every": every,
                "loss_curve": [round(v, 6) for v in result.losses[::every]], **prior_stats,
                "stage_seconds": watch.seconds}

    def _device(self, ctx: JobContext | None):
        """Waits (cancellably) until no training run or GPU export holds the device."""
        return hold(self._device_lock, ctx, "waiting for another job to finish with the device")

    def _class_examples(self, ctx: JobContext, concept: Concept, base: ResolvedBaseModel, config: TrainConfig):
        if "prior" not in concept.regularizers:
            return [], {}
        count, prompt = concept.options["num_class_images"], concept.options["class_prompt"]
        seen: list[int] = []

        def on_progress(done: int, total: int) -> None:
            if not seen:
                seen.append(done)  # the first call reports what was already stored
            ctx.check_cancelled()
            ctx.progress(0.0, f"class images {done}/{total}", stage="class_images", done=done, total=total)
        images = self.class_images.get_or_generate(base.path, prompt, count, config.seed, config.resolution,
                                                   steps=concept.options.get("class_image_steps", 30),
                                                   on_progress=on_progress)
        reused = seen[0] if seen else count
        return [(image, prompt) for image in images], {"class_images_generated": count - reused,
                                                       "class_images_reused": reused}

    def _store_validation(self, ctx: JobContext, concept: Concept, step: int, images: list, progress) -> None:
        ids = []
        for index, (prompt, image) in enumerate(images):
            data = png_bytes(image)
            digest = self.artifacts.put(data)
            self.concepts.put_file(concept.concept_id, ConceptFile(
                concept_store.VALIDATION, f"validation/step-{step:06d}-{index}.png", digest, len(data), step, prompt))
            ids.append(digest)
        progress.validation(step, ids)

    def _image(self, concept: Concept, image_id: str) -> Image.Image:
        try:
            return self.subjects.image_rgb(concept.tenant_id, concept.subject_id, image_id)
        except PersonaError:
            raise FailedPrecondition(f"image {image_id} of subject {concept.subject_id} was deleted after training "
                                     "was requested: start the training again") from None

    def _work_dir(self, concept_id: str) -> Path:
        return self.work_dir / concept_id

    def _reconciled(self, concept: Concept) -> Concept:
        """A TRAINING concept whose job ended without saying so (server stopped with resume off) takes its state."""
        if concept.state != concept_store.TRAINING or not concept.job_id:
            return concept
        job = self.runner.store.get(concept.job_id)
        if job.state not in TERMINAL:
            return concept
        state = {"CANCELLED": concept_store.CANCELLED, "SUCCEEDED": concept_store.READY}.get(job.state,
                                                                                               concept_store.FAILED)
        self.concepts.update(concept.concept_id, state=state)
        return self.concepts.get(concept.concept_id)


class Stopwatch:
    """Seconds per stage of one job, in the order they ran: the job result's `stage_seconds`, which persona-cli
    prints as where the time went."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, stage: str) -> None:
        """Charges the time since the previous lap (or the start) to `stage`."""
        now = time.monotonic()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 3)
        self._last = now


class _Progress:
    """Turns loop callbacks into job PROGRESS events: step, each loss term, it/s, ETA, validation images."""

    def __init__(self, ctx: JobContext, steps: int):
        self.ctx, self.steps = ctx, steps
        self.started = time.perf_counter()
        self.first_step: int | None = None
        self.last_event = 0.0

    def step(self, step: int, losses: dict, it_per_s: float) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.started = step, now - 1.0 / max(it_per_s, 1e-9)
        if step not in (self.first_step, self.steps) and now - self.last_event < EVENT_INTERVAL_S:
            return
        self.last_event = now
        rate = (step - self.first_step + 1) / max(now - self.started, 1e-9)
        eta = (self.steps - step) / rate
        self.ctx.progress(step / self.steps, f"step {step}/{self.steps} loss {losses['loss']:.4f}",
                          stage="train", step=step, steps=self.steps, it_per_s=round(rate, 3), eta_s=round(eta, 1),
                          **{k: round(v, 6) for k, v in losses.items()})

    def validation(self, step: int, artifact_ids: list[str]) -> None:
        self.ctx.progress(step / self.steps, f"validation images at step {step}", stage="validation", step=step,
                          steps=self.steps, validation_image_ids=artifact_ids)


def _regularizers(requested, method: str) -> list[str]:
    """The regularisers in effect: the defaults where they apply to `method` (prior preservation: SID captions
    need it, see DESIGN) plus those named. Naming one adds it; "none" first clears the defaults, so turning prior
    preservation off is always explicit (["none"], or ["none", "mask"] for the masked loss alone)."""
    names = [r.strip().lower() for r in requested if r.strip()]
    cleared = NO_REGULARIZERS in names
    names = [name for name in names if name != NO_REGULARIZERS]
    for name in names:
        if name not in REGULARIZERS:
            raise InvalidArgument(f"`regularizers` has {name!r}: use {', '.join(REGULARIZERS)} or none")
        if method not in REGULARIZERS[name]:
            raise InvalidArgument(f"`regularizers` {name!r} cannot be used with `method` {method!r}: it works with "
                                  f"{', '.join(REGULARIZERS[name])}; drop it or change the method")
    both = [name for name in names if cleared and name in DEFAULT_REGULARIZERS]
    if both:
        raise InvalidArgument(f"`regularizers` has both none and {', '.join(both)}: none turns the defaults off; "
                              "drop one of them")
    defaults = [] if cleared else [name for name in DEFAULT_REGULARIZERS if method in REGULARIZERS[name]]
    return list(dict.fromkeys(defaults + names))


def _mode(requested: str, stored_captions) -> str:
    """The subject's mode: the one requested, else the one its stored captions were written in (a person's
    caption has none), else object."""
    mode = requested.strip().lower()
    if mode:
        if mode not in instructions.MODES:
            raise InvalidArgument(f"`mode` is {requested!r}: use one of {', '.join(instructions.MODES)}")
        return mode
    written = {c.mode for c in stored_captions if c.mode}
    return written.pop() if len(written) == 1 else instructions.DEFAULT_MODE


def _validation_prompt(mode: str, subject: Subject) -> str:
    if mode == "style":
        return (f"{indefinite_article(subject.class_name).capitalize()} {subject.class_name} of a lighthouse by the "
                f"sea in the style of {subject.token} art")
    return f"a {subject.token} {subject.class_name} on the beach"


def _caption_fallback_warning(concept: Concept) -> str:
    """With `captions` sid, the photos that had no stored caption and train on the Case 1 template: said at the
    start of every run, so a subject never captioned does not silently train as Case 1."""
    if concept.captions != "sid":
        return ""
    fallen = [i for i, c in enumerate(concept.training_captions) if c.source == "class"]
    if not fallen:
        return ""
    which = "none of the photos has a stored caption" if len(fallen) == len(concept.training_captions) else \
        f"photo(s) {', '.join(map(str, fallen))} of {len(concept.training_captions)} have no stored caption"
    return (f"captions sid: {which}, so they train on the Case 1 template "
            f"{concept.training_captions[fallen[0]].text!r}, not SID: caption them first with `persona-cli caption "
            f"{concept.subject_id}` (a VLM is needed for SID), or pass --captions class to choose the template")


def _sid_without_prior_warning(concept: Concept) -> str:
    """Described captions (SID) trained with prior preservation turned off: said at the start of every run, because
    the detailed words then drift the whole model and the photos' background and nearby objects leak more than with
    class-only captions (DESIGN, "SID needs prior preservation"; notes/quality-18.md)."""
    templates = {instructions.template_caption(mode, concept.class_name, concept.token).lower()
                 for mode in instructions.MODES}
    described = any(" ".join(c.text.lower().split()) not in templates for c in concept.training_captions)
    if not described or "prior" in concept.regularizers or concept.method not in REGULARIZERS["prior"]:
        return ""
    return (f"captions {concept.captions} without prior preservation: described captions drift the whole model "
            "without it, and the photos' background and nearby objects leak more than with class-only captions "
            "(toy world: nearby-object leakage 0.059 vs 0.021); keep prior preservation on (drop --reg none / "
            "--no-prior), or train on --captions class")


def _resource_error(error: BaseException) -> BaseException:
    """Out-of-memory and busy-GPU errors become RESOURCE_EXHAUSTED with advice; others pass through."""
    text = str(error)
    is_oom = type(error).__name__ == "OutOfMemoryError" or "out of memory" in text.lower()
    if is_oom:
        return ResourceExhausted(
            "the device ran out of memory while training: lower `resolution` or `batch_size`, turn on "
            "`gradient_checkpointing` and `mixed_precision` fp16, or use method lora (full DreamBooth at 512 px "
            "needs ~24 GB; LoRA with fp16 and checkpointing fits in 8 GB)")
    if "busy or unavailable" in text:
        return ResourceExhausted("the GPU is busy or unavailable (another process holds it): try again when it "
                                 "is free, or set PERSONA_TRAIN_DEVICE to another device")
    return error


def _persona_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("persona")
    except PackageNotFoundError:
        return "0+unknown"


_OPTION_NAMES = tuple(f.name for f in dataclass_fields(TrainConfig)
                      if f.name not in ("method", "token", "device", "regularizers", "class_name")) + _DATA_OPTIONS
