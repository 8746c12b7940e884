"""Train use cases: validate a request, run it as a resumable "train" job, keep and export the concept.

Everything a request can get wrong is checked in `start`, before anything is stored or queued: the
subject, the base model (available offline?), the method, the regularisers and each option. The job
then loads the photos and the captions recorded at start, draws (or reuses) the class images for
prior preservation, and runs the one training loop with checkpoints in the concept's work folder; a
job resumed after a crash continues from the last checkpoint.

Concepts are kept in the model library (services/models): this service writes their rows and weights; their
exports live there too (`TrainDomain.exports` is the library's).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Iterator

from PIL import Image

from persona.services.models import concepts as concept_store
from persona.services.models.base_models import ResolvedBaseModel, base_model_identity
from persona.services.models.concepts import Concept, ConceptFile
from persona.services.models.exports import store_folder
from persona.services.models.fusing import CUSTOMCONTRAST, read_learned_embeds
from persona.services.models.library import ModelLibrary
from persona.services.runtime.artifacts import LocalArtifactStore
from persona.services.runtime.errors import (Cancelled, FailedPrecondition, InvalidArgument, NotFound, PersonaError,
                                             ResourceExhausted)
from persona.services.runtime.job_store import JobRecord
from persona.services.runtime.jobs import JobContext, JobRunner
from persona.services.runtime.metadata import MetadataStore
from persona.services.runtime.paging import Page

from ..caption import instructions
from ..caption.domain import CaptionDomain
from ..subjects.domain import Subject, SubjectRepository
from ..subjects.images import png_bytes
from .config import TrainConfig
from .customcontrast.concept import CustomContrastConcepts
from .loop import train
from .methods import METHODS
from .methods.textual_inversion import WEIGHT_NAME as TI_WEIGHT_NAME
from .options import (DEFAULT_BATCH_SIZE, DEFAULT_LEARNING_RATES, DEFAULT_OPTIONS, TINY_BATCH_SIZE,
                      TINY_CLASS_IMAGE_STEPS, check_known, check_options)
from .prior import ClassImageCache, class_prompt_for
from .progress import Stopwatch, TrainingProgress
from .request import (CAPTION_SOURCES, TEXT_SIDE_METHODS, TrainRequest, caption_fallback_warning, mode_of,
                      regularizers_in_effect, sid_without_prior_warning, train_config, training_captions,
                      validation_prompt)
from .settings import TrainSettings

log = logging.getLogger("persona.train")

JOB_KIND = "train"
DEFAULT_METHOD = "lora"
# Continuing from a parent concept (CoRe's stage 2): the parent kinds whose token embedding is loaded and frozen,
# and the methods that then train the UNet around it.
PARENT_METHODS = ("ti",)
# Methods that condition on each photo's stored subject mask (from clicks: `persona-cli mask --point`).
MASKED_METHODS = ("p3s",)
CHILD_METHODS = ("dreambooth", "lora")
# The job result keeps the loss of every step up to this many, else of every k-th step.
MAX_CURVE_POINTS = 1000


class TrainDomain:
    """Concepts of every tenant; training runs as resumable "train" jobs, one per device at a time."""

    def __init__(self, db: MetadataStore, artifacts: LocalArtifactStore, subjects: SubjectRepository,
                 captions: CaptionDomain, runner: JobRunner, settings: TrainSettings, work_dir: Path,
                 models: ModelLibrary, masks=None, dispatcher=None, encoders=None):
        self.db, self.artifacts, self.subjects, self.captions = db, artifacts, subjects, captions
        # The mask service's domain (MaskDomain): subject masks for the masked loss.
        self.masks = masks
        self.runner, self.settings, self.work_dir = runner, settings, work_dir
        # Concepts, base models and exports; `concepts` is where this service writes the concepts it trains.
        self.models, self.concepts, self.exports = models, models.concepts, models.exports
        self.class_images = ClassImageCache(db, artifacts)
        # Concepts made from a CustomContrast encoder without fine-tuning (`encoders`: the EncoderTraining).
        self.customcontrast = CustomContrastConcepts(encoders, models)
        # `dispatcher` (dispatch.train_dispatcher): training in worker processes or Kubernetes Jobs instead of
        # this process's job threads; exports stay here (they are short, and Triton's repository is local).
        runner.register(JOB_KIND, self._run, resumable=True, dispatcher=dispatcher)

    # Requests -----------------------------------------------------------------------------------

    def start(self, tenant_id: str, request: TrainRequest) -> JobRecord:
        """Checks everything, records the concept (TRAINING) with its captions, and queues its job."""
        subject = self.subjects.get(tenant_id, request.subject_id)
        if not subject.images:
            raise FailedPrecondition(f"subject {subject.subject_id} has no images: add photos with "
                                     "`persona-cli subjects add PHOTOS… --class …` and train that subject")
        method = (request.method or DEFAULT_METHOD).strip().lower()
        if method == CUSTOMCONTRAST or request.encoder.strip():  # a concept made from an encoder, no fine-tuning
            base, fields = self.customcontrast.plan(tenant_id, request, method, subject)
            return self._record_and_submit(tenant_id, subject, base, request.display_name, CUSTOMCONTRAST, **fields)
        if method not in METHODS:
            raise InvalidArgument(f"`method` is {request.method!r}: use one of {', '.join(METHODS)}")
        regularizers = regularizers_in_effect(request.regularizers, method)
        captions = (request.captions or "sid").strip().lower()
        if captions not in CAPTION_SOURCES:
            raise InvalidArgument(f"`captions` is {request.captions!r}: use sid (the stored SID captions), class "
                                  "(the template 'a photo of a sks dog'), or case1–case4 (SID's ablation)")
        captions = "class" if captions == "case1" else captions
        stored_captions = self.captions.list(tenant_id, subject.subject_id)
        mode = mode_of(request.mode, stored_captions)
        parent = self._parent(tenant_id, request.parent_concept_id.strip(), method, subject)
        base = self.resolve_base(request.base_model or (parent.base_model if parent else ""))
        options, config = self._options(request.options or {}, method, subject, base, regularizers, mode)
        if parent is not None:
            self._check_parent_options(parent, request, base, options, regularizers)
        if "prior" in regularizers and not options["class_prompt"].strip():
            raise InvalidArgument("`class_prompt` is empty: e.g. 'a photo of a dog'")
        if "mask" in regularizers and all(m is None for m in self._masks(tenant_id, subject.subject_id,
                                                                          [i.image_id for i in subject.images])):
            raise FailedPrecondition(
                f"`regularizers` mask needs subject masks, and no photo of {subject.subject_id} has one: make them "
                f"with `persona-cli mask {subject.subject_id} --text {subject.class_name}` (or clicks: --point X,Y)")
        if method == "p3s" and options.get("p3s_inpainting_model"):
            self.models.model_access.locate(options["p3s_inpainting_model"], "p3s_inpainting_model")
        if method in MASKED_METHODS:
            self._check_photo_masks(tenant_id, subject, method)
        if method == "p3s" and options.get("p3s_region") == "negative_clicks":
            self._check_negative_clicks(tenant_id, subject)
        text_side = [r for r in regularizers if r in ("spl", "core")]
        if text_side and method not in TEXT_SIDE_METHODS and not options["train_text_encoder"]:
            raise InvalidArgument(
                f"`regularizers` {' and '.join(text_side)} act on the text side, which `method` {method} does not "
                "train: set `train_text_encoder`, or use ti, custom_diffusion or svdiff")
        captions_used = training_captions(subject, captions, mode, stored_captions)
        return self._record_and_submit(
            tenant_id, subject, base, request.display_name, method=method, regularizers=regularizers,
            captions=captions, options=options, training_captions=captions_used, resolution=config.resolution,
            parent_concept_id=parent.concept_id if parent else "")

    def _record_and_submit(self, tenant_id: str, subject: Subject, base: ResolvedBaseModel, display_name: str,
                           method: str, **fields) -> JobRecord:
        """Records the concept (TRAINING) and queues its job; a failed submit leaves nothing behind."""
        display_name = display_name.strip() or f"{method} of {subject.display_name or subject.subject_id}"
        if len(display_name) > 200:
            raise InvalidArgument(f"`display_name` is {len(display_name)} characters; at most 200")
        concept = self.concepts.create(
            tenant_id=tenant_id, subject_id=subject.subject_id, display_name=display_name, token=subject.token,
            class_name=subject.class_name, base_model=base.ref, base_model_sha256=base_model_identity(base.path),
            base_model_family=base.family, method=method, persona_version=_persona_version(), **fields)
        try:
            job = self.runner.submit(tenant_id, JOB_KIND, {"concept_id": concept.concept_id}, subject.subject_id)
        except BaseException:
            self.concepts.delete(concept.concept_id)
            raise
        self.concepts.update(concept.concept_id, job_id=job.job_id)
        return job

    def resolve_base(self, ref: str) -> ResolvedBaseModel:
        return self.models.resolve_base(ref)

    def get(self, tenant_id: str, concept_id: str) -> Concept:
        return self.models.get(tenant_id, concept_id)

    def list(self, tenant_id: str, page: Page, subject_id: str = "") -> tuple[list[Concept], str]:
        return self.models.list(tenant_id, page, subject_id)

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
        """Every option with its default filled in (what the concept records), and the TrainConfig they make
        (validated). Each option's bounds are its declaration's (options.py); here are the defaults that depend on
        the request and the limits of this server."""
        check_known(given)
        check_options(given)
        options = {**DEFAULT_OPTIONS, **given}
        options.setdefault("batch_size", TINY_BATCH_SIZE if base.builtin_tiny
                           else min(len(subject.images), DEFAULT_BATCH_SIZE))
        if "epochs" in given:
            if "steps" in given:
                raise InvalidArgument("`steps` and `epochs` are both set: give one of them")
            per_epoch = -(-len(subject.images) // max(1, options["batch_size"]))
            options["steps"] = given["epochs"] * per_epoch
        if base.builtin_tiny and "class_image_steps" not in given:
            options["class_image_steps"] = TINY_CLASS_IMAGE_STEPS
        options.setdefault("learning_rate", DEFAULT_LEARNING_RATES[method])
        options.setdefault("resolution", base.native_resolution)
        options.setdefault("lora_alpha", options["lora_rank"])
        options["initializer_token"] = options.get("initializer_token") or subject.class_name.split()[-1]
        options["mixed_precision"] = options.get("mixed_precision") or ("fp16" if self._on_cuda() else "no")
        options["class_prompt"] = options.get("class_prompt") or (
            instructions.class_prompt(mode, subject.class_name) if mode == "style"
            else class_prompt_for(subject.class_name))
        options["validation_prompts"] = list(options.get("validation_prompts") or [validation_prompt(mode, subject)])
        limits = self.settings
        if options["resolution"] > limits.max_resolution:
            raise InvalidArgument(f"`resolution` is {options['resolution']}: this server trains at most "
                                  f"{limits.max_resolution} (PERSONA_TRAIN_MAX_RESOLUTION); e.g. 512 for SD-1.5")
        if options["batch_size"] > limits.max_batch_size:
            raise InvalidArgument(f"`batch_size` is {options['batch_size']}: this server takes at most "
                                  f"{limits.max_batch_size} (PERSONA_TRAIN_MAX_BATCH); e.g. 1, as DreamBooth")
        config = train_config(options, method, subject.token, regularizers, subject.class_name, self.settings.device,
                              self._p3s_clip_model())
        config.validate()
        return options, config

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

    def _check_photo_masks(self, tenant_id: str, subject: Subject, method: str) -> None:
        """FAILED_PRECONDITION naming the photos without a stored subject mask and how to make one."""
        masks = self._masks(tenant_id, subject.subject_id, [i.image_id for i in subject.images])
        missing = [image for image, mask in zip(subject.images, masks) if mask is None]
        if missing:
            first = missing[0].index
            raise FailedPrecondition(
                f"`method` {method} needs a subject mask on every photo, and {len(missing)} of {len(masks)} photo(s) "
                f"of {subject.subject_id} have none (image {', '.join(str(i.index) for i in missing)}): click the "
                f"subject on each with `persona-cli mask {subject.subject_id} --image {first} --point X,Y` (add "
                "--negative X,Y on a similar object to leave out)")

    def _check_negative_clicks(self, tenant_id: str, subject: Subject) -> None:
        """FAILED_PRECONDITION when `p3s_region` negative_clicks would fill nothing: no photo has a negative click."""
        stored = [self.masks.get(tenant_id, subject.subject_id, i.image_id) for i in subject.images] \
            if self.masks is not None else []
        if not any(mask.negative for mask in stored):
            raise FailedPrecondition(
                f"`p3s_region` is negative_clicks, and no photo of {subject.subject_id} has a negative click: click "
                f"the object to leave out with `persona-cli mask {subject.subject_id} --image N --point X,Y "
                "--negative X,Y`, or use `p3s_region` outside_mask")

    def _negative_regions(self, tenant_id: str, subject_id: str, image_ids: list[str]) -> list:
        """Each image's negative-click region (bool H×W) or None, from the mask service (`p3s_region`
        negative_clicks)."""
        return [self.masks.negative_region(tenant_id, subject_id, image_id) for image_id in image_ids]

    def _p3s_clip_model(self) -> str | None:
        """The CLIP vision model of the mask service (the paper's RNGR encoder reads the one the masks came from)."""
        return self.masks.settings.clip_model if self.masks is not None else None

    def _masks(self, tenant_id: str, subject_id: str, image_ids: list[str]) -> list:
        """Each image's subject mask (bool H×W) or None, from the mask service."""
        if self.masks is None:
            return [None] * len(image_ids)
        return [self.masks.mask_array(tenant_id, subject_id, image_id) for image_id in image_ids]

    def _on_cuda(self) -> bool:
        return self.models.on_cuda()

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
        if concept.method == CUSTOMCONTRAST:
            return self._make_customcontrast(ctx, concept, watch)
        config = train_config(concept.options, concept.method, concept.token, concept.regularizers,
                              concept.class_name, self.settings.device, self._p3s_clip_model())
        if config.p3s.inpainting_model and concept.method == "p3s":
            config = dataclasses.replace(config, p3s=dataclasses.replace(
                config.p3s, inpainting_model=self.models.model_access.locate(config.p3s.inpainting_model,
                                                                             "p3s_inpainting_model")))
        examples = [(self._image(concept, c.image_id), c.text) for c in concept.training_captions]
        for warning in (caption_fallback_warning(concept), sid_without_prior_warning(concept)):
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
            progress = TrainingProgress(ctx, config.steps)
            masks = (self._masks(concept.tenant_id, concept.subject_id,
                                 [c.image_id for c in concept.training_captions])
                     if "mask" in concept.regularizers or concept.method in MASKED_METHODS else None)
            negative = (self._negative_regions(concept.tenant_id, concept.subject_id,
                                               [c.image_id for c in concept.training_captions])
                        if concept.method == "p3s" and concept.options.get("p3s_region") == "negative_clicks" else None)
            result = train(
                base.path, examples, config, output_dir, class_examples=class_examples, instance_masks=masks,
                negative_masks=negative,
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

    def _make_customcontrast(self, ctx: JobContext, concept: Concept, watch: Stopwatch) -> dict:
        """The job of a customcontrast concept: one pass of its encoder over the photos, no steps."""
        photos = [self._image(concept, c.image_id) for c in concept.training_captions]
        watch.lap("preparing")
        ctx.log(f"making a customcontrast concept from encoder {concept.encoder} and {len(photos)} photo(s)",
                concept_id=concept.concept_id)
        output_dir = self._work_dir(concept.concept_id) / "output"
        shutil.rmtree(output_dir, ignore_errors=True)
        with self._device(ctx):
            watch.lap("waiting")
            self.customcontrast.make(ctx, concept, photos, output_dir)
            watch.lap("training")
        self.concepts.replace_files(concept.concept_id, concept_store.WEIGHTS,
                                    store_folder(self.artifacts, output_dir, concept_store.WEIGHTS))
        self.concepts.update(concept.concept_id, steps_done=0, final_loss=0.0, state=concept_store.READY)
        shutil.rmtree(self._work_dir(concept.concept_id), ignore_errors=True)
        watch.lap("saving")
        return {"concept_id": concept.concept_id, "steps": 0, "final_loss": 0.0, "resumed_from_step": 0,
                "loss_curve_every": 1, "loss_curve": [], "stage_seconds": watch.seconds}

    def _device(self, ctx: JobContext | None):
        """Waits (cancellably) until no training run or GPU export holds the device."""
        return self.models.hold_device(ctx)

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
                                                   guidance_scale=concept.options.get("class_image_guidance",
                                                                                  DEFAULT_OPTIONS["class_image_guidance"]),
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
