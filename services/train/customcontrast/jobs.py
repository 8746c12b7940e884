"""CustomContrast encoder training as a resumable "encoder_train" job of the shared runner: `start` checks a request
(dataset layout, base model, image encoder, options) before anything is queued; the job loads the models, runs
`train_encoder` with its checkpoint in the encoder's work folder (a restarted job resumes there), reports each step
as typed JobProgress and saves the encoder under the data dir. Nothing here knows gRPC.

    <data dir>/encoders/<encoder id>/   mfi_encoder.safetensors, mfi_encoder.json (files.py), work/ (checkpoint)
"""
from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from persona.services.models.base_models import TINY, ResolvedBaseModel, base_model_identity
from persona.services.models.library import ModelLibrary
from persona.services.runtime.errors import Cancelled, FailedPrecondition, InvalidArgument
from persona.services.runtime.job_store import SUCCEEDED, TERMINAL, JobRecord
from persona.services.runtime.jobs import JobContext, JobRunner
from persona.services.runtime.model_access import NAME
from persona.services.runtime.paging import MAX_PAGE_SIZE, parse_page

from ..progress import TrainingProgress
from .multiview import read_multiview_dataset

# torch and the models load in the job (and `start`'s option check), not when the server's modules are imported.

JOB_KIND = "encoder_train"
# The CLIP image encoder of a real base model (the paper's: ViT-L/14); `tiny` reads the built-in random one.
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
TINY_IMAGE_ENCODER = "tiny"  # build.TINY_IMAGE_ENCODER
DEFAULT_BATCH_SIZE = 4
# The paper trains 200k iterations; a request for more is a typo.
MAX_STEPS = 1_000_000
# The encoder's shape on the built-in random tiny model: small enough for a CPU test run.
TINY_ENCODER_SHAPE = {"width": 16, "heads": 4, "num_layers": 1, "num_visual_tokens": 3, "num_text_tokens": 2,
                      "fourier_frequencies": 4, "contrast_width": 8}
# On another tiny-shaped base (the toy world's trained one, 128-wide cross-attention): the paper's depth and token
# counts at that width, not 768 — a one-layer, 16-wide encoder there is too small to learn what the paper's does.
SMALL_BASE_ENCODER_SHAPE = {"width": 128, "heads": 4, "contrast_width": 128}


@dataclass(frozen=True)
class EncoderTrainRequest:
    """StartEncoderTraining's fields as plain values; None = unset (the default applies)."""

    dataset: str
    base_model: str = ""
    image_encoder: str = ""
    steps: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    checkpoint_every: int | None = None
    no_textual_qformer: bool = False
    no_cscl: bool = False
    no_macl: bool = False


class EncoderTraining:
    """Encoders of every tenant, each trained by one "encoder_train" job; the encoder id is in the job's params."""

    def __init__(self, runner: JobRunner, models: ModelLibrary, data_dir: Path, device: str | None = None):
        self.runner, self.models, self.device = runner, models, device
        self.encoders_dir = Path(data_dir) / "encoders"
        # Where a server that takes no paths (`persona-cli serve`) finds datasets by name.
        self.datasets_root = Path(data_dir) / "datasets"
        runner.register(JOB_KIND, self._run, resumable=True)

    def start(self, tenant_id: str, request: EncoderTrainRequest) -> JobRecord:
        dataset = read_multiview_dataset(self._locate_dataset(request.dataset))
        base = self.models.resolve_base(request.base_model)
        image_encoder = (request.image_encoder or "").strip() or (
            TINY_IMAGE_ENCODER if base.family == TINY else DEFAULT_IMAGE_ENCODER)
        self.models.model_access.locate(image_encoder, "image_encoder")  # refused now, not in the job
        options = self._options(request, base, len(dataset.subjects))
        options.check(dataset)
        # The references as the request named them (a server that takes no paths shows no paths of its own in the
        # job's params); the job locates them again.
        params = {"encoder_id": f"enc_{uuid.uuid4().hex[:16]}", "dataset": request.dataset.strip(),
                  "base_model": base.ref,
                  "base_model_sha256": base_model_identity(base.path), "image_encoder": image_encoder,
                  "no_textual_qformer": request.no_textual_qformer,
                  "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "switches"},
                  "switches": dataclasses.asdict(options.switches)}
        return self.runner.submit(tenant_id, JOB_KIND, params)

    def _locate_dataset(self, ref: str) -> Path:
        """The dataset folder a request names, by the base models' rule (runtime/model_access.py): any local folder
        where the server takes paths, else only the name of a folder under the datasets root."""
        ref = (ref or "").strip()
        if not ref:
            raise InvalidArgument("`dataset` is empty: pass a folder with one sub-folder of views per subject")
        if self.models.model_access.paths:
            return Path(ref).expanduser()
        if NAME.match(ref) and (self.datasets_root / ref).is_dir():
            return self.datasets_root / ref
        raise InvalidArgument("`dataset` is not a dataset this server offers: name a folder under its datasets root "
                              "(<data dir>/datasets); a server does not open paths a request names")

    @staticmethod
    def _options(request: EncoderTrainRequest, base: ResolvedBaseModel, subjects: int):
        from .run import EncoderTrainingOptions
        from .step import LossSwitches

        given = {name: getattr(request, name) for name in ("steps", "learning_rate", "batch_size", "seed",
                                                            "checkpoint_every") if getattr(request, name) is not None}
        given.setdefault("batch_size", min(DEFAULT_BATCH_SIZE, subjects))
        if given.get("steps", 0) > MAX_STEPS:
            raise InvalidArgument(f"`steps` is {given['steps']}: at most {MAX_STEPS} (the paper trains 200000)")
        # Without the textual Q-Former there are no text tokens to contrast: CSCL and MACL go with it.
        textual = not request.no_textual_qformer
        switches = LossSwitches(cscl=textual and not request.no_cscl, macl=textual and not request.no_macl)
        return EncoderTrainingOptions(resolution=base.native_resolution, switches=switches, **given)

    def encoder_dir(self, encoder_id: str) -> Path:
        return self.encoders_dir / encoder_id

    def find(self, tenant_id: str, encoder_id: str) -> tuple[Path, JobRecord]:
        """(folder, job) of the tenant's trained encoder `encoder_id`: INVALID_ARGUMENT when the tenant has none of
        that id (another tenant's reads the same: its existence never shows), FAILED_PRECONDITION while its job has
        not succeeded."""
        encoder_id = (encoder_id or "").strip()
        job, page = None, parse_page(MAX_PAGE_SIZE, "")
        while job is None and page is not None:  # the tenant's encoder_train jobs, newest first
            jobs, token = self.runner.store.list(tenant_id, page, kind=JOB_KIND)
            job = next((j for j in jobs if j.params.get("encoder_id") == encoder_id), None)
            page = parse_page(MAX_PAGE_SIZE, token) if token else None
        unknown = InvalidArgument(f"`encoder` {encoder_id!r} is not one of your encoders: see them with "
                                  "`persona-cli encoder list`, or train one with `persona-cli encoder train DATASET`")
        if job is None or not NAME.match(encoder_id):
            raise unknown
        if job.state != SUCCEEDED:
            what = "is still training" if job.state not in TERMINAL else f"ended {job.state}"
            raise FailedPrecondition(f"`encoder` {encoder_id} {what} (job {job.job_id}): "
                                     + ("wait for it (`persona-cli jobs watch " + job.job_id + "`)"
                                        if job.state not in TERMINAL else "train it again") + ", then make the concept")
        folder = self.encoder_dir(encoder_id)
        if not folder.is_dir():
            raise FailedPrecondition(f"`encoder` {encoder_id}'s files are gone from the server: train it again")
        return folder, job

    def _run(self, ctx: JobContext) -> dict:
        # One training run (or GPU export) on the device at a time, as concept training.
        with self.models.hold_device(ctx):
            return self._train(ctx)

    def _train(self, ctx: JobContext) -> dict:
        import torch

        from persona.services.models.customcontrast.build import load_customcontrast_models
        from persona.services.models.customcontrast.files import EncoderMeta, save_encoder

        from .run import EncoderTrainingOptions, train_encoder
        from .step import LossSwitches

        params = ctx.job.params
        # Jobs queued before the CLIP input size came from the image encoder itself still carry `clip_resolution`.
        given = {k: v for k, v in params["options"].items() if k != "clip_resolution"}
        options = EncoderTrainingOptions(**given, switches=LossSwitches(**params["switches"]))
        base = self.models.resolve_base(params["base_model"])
        identity = base_model_identity(base.path)
        if identity != params["base_model_sha256"]:
            raise InvalidArgument(f"`base_model` {params['base_model']!r} changed on disk since the job was queued: "
                                  "start the training again")
        dataset = read_multiview_dataset(self._locate_dataset(params["dataset"]))
        image_encoder = self.models.model_access.locate(params["image_encoder"], "image_encoder")
        textual = not params["no_textual_qformer"]
        shape = (TINY_ENCODER_SHAPE if base.builtin_tiny else SMALL_BASE_ENCODER_SHAPE if base.family == TINY
                 else {})  # else the paper's
        # Seeds the new encoder's initialisation; a resumed job loads its weights from the checkpoint anyway.
        torch.manual_seed(options.seed)
        models = load_customcontrast_models(base.path, image_encoder, use_textual=textual,
                                            use_tv_fusion=textual, **shape)
        if self.device:
            for part in (models.vae, models.text_encoder, models.unet, models.image_encoder, models.encoder,
                         models.processors):
                part.to(self.device)
        folder = self.encoder_dir(params["encoder_id"])
        work = folder / "work"
        progress = TrainingProgress(ctx, options.steps, stage=JOB_KIND)
        first: list[int] = []
        last = [time.perf_counter()]

        def on_step(step: int, terms: dict[str, float]) -> None:
            now = time.perf_counter()
            rate, last[0] = 1.0 / max(now - last[0], 1e-9), now
            if not first:
                first.append(step - 1)
            losses = {("loss" if name == "total" else name): value for name, value in terms.items()}
            progress.step(step, losses, rate)

        result = train_encoder(models, dataset, options, work, on_step=on_step, should_stop=ctx.cancel_poll())
        if result.stopped:
            raise Cancelled(f"job {ctx.job.job_id} was cancelled at step {result.steps}; its checkpoint is kept")
        save_encoder(folder, models.encoder, models.processors,
                     EncoderMeta(models.encoder.config, identity, params["image_encoder"]))
        shutil.rmtree(work, ignore_errors=True)
        return {"encoder_id": params["encoder_id"], "path": str(folder), "steps": result.steps,
                "final_loss": result.losses[-1]["total"] if result.losses else 0.0,
                "resumed_from_step": first[0] if first else result.steps, "base_model": params["base_model"],
                "base_model_sha256": identity}
