"""`persona-cli train`: learn a concept from a subject (or straight from a folder of photos), following
the training job with a progress bar; Ctrl-C asks whether to cancel it."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import grpc
import typer

from persona.v1 import caption_pb2, common_pb2, subjects_pb2, train_pb2

from persona.services.train.options import ENCODER, OPTIONS

from ..declared_options import with_declared_options
from ..jobwatch import JobProgress, cancel_and_wait
from ..output import EXIT_INTERRUPTED, fail, message_dict, note, stderr_console
from ..sdk import PersonaClient, PersonaClientError
from .concepts import concept_state
from .jobs import follow_job, raise_unless_succeeded
from .session import JsonOption, Session, session
from .subjects import name_the_file, photo_paths, read_uploads

METHODS = ("dreambooth", "lora", "ti", "custom_diffusion", "svdiff", "p3s", "customcontrast")
REGULARIZERS = ("prior", "mask", "spl", "core", "none")
CAPTIONS = ("sid", "class", "case1", "case2", "case3", "case4")
MODES = ("object", "style", "expression")
# Loss terms shown beside the total, in this order, when the job reports them.
LOSS_TERMS_SHOWN = ("instance", "prior", "spl", "core_emb", "core_attn")


def _choice(field: str, value: str | None, choices: tuple[str, ...]) -> None:
    """The server checks every option too; choices are checked here first so that a typo fails before a
    photo folder is uploaded and captioned."""
    if value is not None and value not in choices:
        fail("INVALID_ARGUMENT", f"`{field}` must be one of {', '.join(choices)}, not {value!r}")


def training_options(**given) -> train_pb2.TrainingOptions:
    """TrainingOptions holding only what the user gave (None = unset, so the server's default applies)."""
    options = train_pb2.TrainingOptions()
    for name, value in given.items():
        if value is None or value is False:
            continue
        if isinstance(value, list):
            getattr(options, name).extend(value)
        else:
            setattr(options, name, value)
    return options


def vlm_configured_here() -> bool:
    """Whether the in-process caption service has a VLM (it reads the same variable)."""
    return bool(os.environ.get("PERSONA_VLM_BASE_URL", "").strip())


CASE1_NOTE = ("note: the captions are the Case 1 template (\"a photo of a {token} {cls}\"), not SID descriptions: "
              "no vision-language model is configured. For SID captions, which keep backgrounds and nearby objects "
              "out of the concept, set PERSONA_VLM_BASE_URL (e.g. https://api.openai.com/v1 or "
              "http://localhost:11434/v1), PERSONA_VLM_MODEL (e.g. gpt-4o) and PERSONA_VLM_API_KEY{where}, then "
              "run `persona-cli caption {subject}` and train again with `persona-cli train {subject} …`")


def subject_from_folder(s: Session, client: PersonaClient, folder: Path, class_name: str | None, token: str | None,
                        name: str | None) -> subjects_pb2.Subject:
    """Uploads the folder's photos as a new subject."""
    if not class_name:
        fail("INVALID_ARGUMENT", f"`--class` is required when training from a photo folder ({folder}): the class "
                                 "noun of the subject, e.g. --class dog")
    photos = photo_paths([folder])
    uploads = read_uploads(photos)
    request = subjects_pb2.CreateSubjectRequest(class_name=class_name, token=token or "sks", display_name=name or "",
                                                images=uploads)
    with stderr_console().status(f"uploading {len(uploads)} photos…"):
        try:
            subject = client.subjects.CreateSubject(request)
        except grpc.RpcError as e:
            raise name_the_file(PersonaClientError.from_rpc_error(e), photos) from None
    note(f"created subject {subject.subject_id} from {len(subject.images)} photos in {folder}")
    return subject


def caption_subject(s: Session, client: PersonaClient, subject: subjects_pb2.Subject, mode: str | None = None) -> None:
    """SID captions (Case 3) when a VLM is configured, else the Case 1 template with a note saying so."""
    def start(case: int) -> common_pb2.Job:
        return client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(
            subject_id=subject.subject_id, case=case,
            mode=caption_pb2.CaptionMode.Value(f"CAPTION_MODE_{(mode or 'object').upper()}")))

    job = None
    if not s.embedded or vlm_configured_here():
        try:
            job = start(caption_pb2.DESCRIPTION_CASE_3)
            description = "SID captions (case 3)"
        except grpc.RpcError as e:
            error = PersonaClientError.from_rpc_error(e)
            # A remote server without a VLM says so; anything else (a bad endpoint) is the user's to fix.
            if s.embedded or error.code != "FAILED_PRECONDITION" or "none is configured" not in error.message:
                raise error from None
    if job is None:
        job = start(caption_pb2.DESCRIPTION_CASE_1)
        description = "captions (case 1)"
        note(CASE1_NOTE.format(token=subject.token, cls=subject.class_name, subject=subject.subject_id,
                               where=" on the server" if not s.embedded else ""))
    note(f"captioning {len(subject.images)} photos of {subject.subject_id}: job {job.job_id}")
    raise_unless_succeeded(follow_job(client, job, description, embedded=s.embedded), s.error_log)


class TrainingProgress(JobProgress):
    """The job's progress bar (see JobProgress) with training steps: step/total, loss, it/s and ETA; without a
    TTY, about every tenth of the steps as a plain line."""

    def __init__(self, total_steps: int | None):
        super().__init__()
        self.total_steps = total_steps
        self.last_logged_step = 0

    def on_progress(self, event: common_pb2.JobEvent, details: common_pb2.JobProgress) -> None:
        if details.step:
            self._step(details)
        else:  # stages before the steps: class images done/total
            super().on_progress(event, details)

    def _step(self, details: common_pb2.JobProgress) -> None:
        step = details.step
        total = details.steps or self.total_steps or 0
        losses = details.losses
        stats = []
        if "loss" in losses:
            stats.append(f"loss {losses['loss']:.4f}")
        # Every term the loop and the regularisers report ("instance", "prior", "spl", "core_emb", …).
        terms = [f"{name} {losses[name]:.4f}" for name in LOSS_TERMS_SHOWN if name in losses]
        if len(terms) > 1:
            stats.append(f"({', '.join(terms)})")
        if details.it_per_s:
            stats.append(f"{details.it_per_s:.2f} it/s")
        if details.it_per_s or details.eta_s:
            stats.append(f"ETA {format_seconds(details.eta_s)}")
        counter = f"step {step}/{total}" if total else f"step {step}"
        self.progress.update(self.task, description="training", total=total or None, completed=step,
                             counter=counter, stats="  ".join(stats))
        if details.validation_image_ids:
            self.print(f"step {step}: validation images {', '.join(details.validation_image_ids)} "
                       f"(`persona-cli concepts show` lists them)")
        if not self.tty and total and (step == total or step - self.last_logged_step >= max(1, total // 10)):
            self.last_logged_step = step
            note(f"{counter}  {'  '.join(stats)}".rstrip())


# A training run at least this long (seconds) ends with a line saying where its time went.
LONG_RUN_S = 30.0
# The stages of a train job's `stage_seconds`, in the order they run, as printed.
STAGES = {"preparing": "preparing", "waiting": "waiting for the device", "class_images": "class images",
          "training": "training", "saving": "saving"}


def where_the_time_went(result: common_pb2.TrainJobResult) -> str:
    """"took 312 s: class images 250 s (100 drawn, …), training 55 s" from a train job's result; '' for a short run
    (or a server that does not report stages)."""
    seconds = result.stage_seconds
    total = sum(seconds.values())
    if total < LONG_RUN_S:
        return ""
    parts = []
    for stage, label in STAGES.items():
        if stage in seconds and (seconds[stage] >= 0.5 or stage in ("class_images", "training")):
            part = f"{label} {seconds[stage]:.0f} s" if seconds[stage] >= 10 else f"{label} {seconds[stage]:.1f} s"
            if stage == "class_images" and result.class_images_generated:
                part += (f" ({result.class_images_generated} drawn once and kept: the next concept of this "
                         "class on this base model skips them)")
            parts.append(part)
    return f"took {total:.0f} s: " + ", ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def ask_to_cancel() -> bool:
    """Whether the person at the terminal wants the job cancelled (no terminal, or Ctrl-C again: no)."""
    if not sys.stdin.isatty():
        return False
    try:
        return typer.confirm("\nCancel the training job?", default=False, err=True)
    except (KeyboardInterrupt, EOFError, typer.Abort):
        return False


def follow_training(s: Session, client: PersonaClient, job: common_pb2.Job, concept_id: str,
                    total_steps: int | None) -> common_pb2.Job:
    """Follows the job to its end; on Ctrl-C asks whether to cancel it, else detaches (remote) or leaves it
    to resume on the next start (embedded)."""
    try:
        with TrainingProgress(total_steps) as progress:
            return client.wait_for_job(job.job_id, on_event=progress)
    except KeyboardInterrupt:
        pass
    if ask_to_cancel():
        return cancel_and_wait(client, job, f"cancelling {job.job_id}: it stops after the step in progress and "
                                            f"keeps the weights of the last step in {concept_id}…")
    if s.embedded:
        data_dir = s.settings().data_dir
        note(f"left {job.job_id} unfinished: without --server the job runs inside this process and stops with it. "
             f"Train jobs resume from their last checkpoint (--checkpoint-every) the next time persona-cli starts "
             f"on {data_dir}: continue it with `persona-cli --data-dir {data_dir} jobs watch {job.job_id}`, or "
             f"drop it with `persona-cli --data-dir {data_dir} jobs cancel {job.job_id}`. Concept: {concept_id}")
        # The job's worker thread would keep the interpreter alive until training ends; stop the server and
        # leave now, as a crash would: the job stays RUNNING in the store and is resumed on the next start.
        with contextlib.suppress(Exception):
            s.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    note(f"detached: {job.job_id} goes on on the server. Re-attach with `persona-cli jobs watch {job.job_id}`, "
         f"stop it with `persona-cli jobs cancel {job.job_id}`. Concept: {concept_id}")
    raise typer.Exit(EXIT_INTERRUPTED)


@with_declared_options(OPTIONS, before="detach")
def train(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(
        metavar="SUBJECT_OR_PHOTO_DIR", show_default=False,
        help="A subject id (subj_…), or a folder of 3–7 photos (the formats `persona-cli subjects add` takes) that "
             "becomes a new subject first (then --class is required) and is captioned: SID (Case 3) when a VLM is "
             "configured, else the Case 1 template.")],
    class_name: Annotated[Optional[str], typer.Option(
        "--class", show_default=False,
        help="Class noun of the subject (dog, backpack, stuffed animal; painting for a style). Required with a "
             "photo folder; with a subject id it must match the subject's.")] = None,
    token: Annotated[Optional[str], typer.Option(
        help="Identifier the concept learns, the [v] of the papers (photo folder only; default sks).",
        show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(
        help="Display name of the concept (and of the subject made from a photo folder). Default: "
             "\"METHOD of SUBJECT\".", show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option(
        help="lora: low-rank adapters on the UNet attention — small files (MBs), fast, the default. dreambooth: "
             "fine-tunes the whole UNet — the most faithful, a full model (GBs). ti: Textual Inversion, learns "
             "only one new word embedding — tiny, least faithful. custom_diffusion: the cross-attention K/V "
             "projections and the new token (Kumari et al.). svdiff: shifts of the singular values of every UNet "
             "weight and the new token (Han et al.; ~1 MB files). p3s: P3S-Diffusion — a trainable condition "
             "branch fed each photo with what is outside its clicked subject mask removed (`persona-cli mask "
             "SUBJECT --image N --point X,Y` on every photo first; the --p3s-* options). customcontrast: no "
             "fine-tuning — a trained CustomContrast encoder (--encoder) turns the photos into tokens in seconds.",
        show_default="lora")] = None,
    encoder: Annotated[Optional[str], typer.Option(
        ENCODER.cli_flag, metavar="ENCODER", help=ENCODER.help, show_default=False)] = None,
    regularizers: Annotated[Optional[list[str]], typer.Option(
        "--reg", show_default="prior for dreambooth, lora, custom_diffusion and svdiff; none for ti",
        help="Regulariser to add; repeat for several. Prior preservation is on by default and stays on when you "
             "add others (--reg mask trains with prior + mask); turn it off explicitly with --reg none (alone: no "
             "regulariser) or --no-prior. prior: prior preservation — the base model draws --num-class-images "
             "images of the class (cached, reused) and training keeps drawing them, so \"a dog\" still means any "
             "dog. Costs: drawing the class images once per base model, class prompt and seed (16 at 64 px: about "
             "a minute on a CPU) and one class image beside each photo in every step. Buys: with SID captions it is "
             "what keeps the described words from drifting the whole model (toy world, SID without it: nearby "
             "object 0.059 of the pixels vs Case 1's 0.021), and what lets SID take the photos' background out of "
             "the token (toy world, red-ring, dreambooth 400 steps with all 4 photos per step, 3 seeds: background "
             "0.020 of the frame vs Case 1's 0.138, asked backgrounds 0.77 vs 0.71; at 1 photo per step or 100 "
             "steps the two leak alike); on by default, and a warning when SID captions train without it "
             "(figures: notes/quality-18.md). mask: the loss weighted by each photo's subject mask (`persona-cli mask` "
             "first), background at weight 0.1. spl: ClassDiffusion's semantic preservation (\"a sks dog\" kept "
             "near \"a dog\"; needs a method that trains the token: ti, custom_diffusion, svdiff, or "
             "--train-text-encoder). core: CoRe context regularisation of the token (ti, custom_diffusion, "
             "svdiff). none: the defaults off (faster, may drift).")] = None,
    no_prior: Annotated[bool, typer.Option(
        "--no-prior", help="Turn prior preservation off (the same as --reg none before the other --reg).")] = False,
    captions: Annotated[Optional[str], typer.Option(
        help="Training text per photo. sid: each photo's stored caption (SID: the subject named only by "
             "\"TOKEN CLASS\", everything else described); a photo with no stored caption trains on the Case 1 "
             "template and the job says so in a warning naming the photos (a photo folder is captioned first). "
             "class (= case1): the Case 1 template for every photo (the DreamBooth baseline): \"a photo of a "
             "TOKEN CLASS\", or \"A CLASS in the style of TOKEN art\" with --mode style. case2, case3, case4: "
             "only captions of that SID case (the paper's ablation; caption with `persona-cli caption SUBJECT "
             "--case N` first).",
        show_default="sid")] = None,
    mode: Annotated[Optional[str], typer.Option(
        help="object, style (SID App. C.1: trains on \"A painting in the style of sks art\", class images of "
             "\"A painting in the style of art\") or expression. Picks the template of --captions class, of the "
             "fallback for uncaptioned photos, and the class prompt.",
        show_default="the mode the subject was captioned in, else object")] = None,
    parent: Annotated[Optional[str], typer.Option(
        "--parent", metavar="CONCEPT",
        help="continue from a ti concept (CoRe stage 2: `persona-cli train SUBJECT --method ti --reg core --steps "
             "300 --lr 5e-3`, then `persona-cli train SUBJECT --method dreambooth --parent CONCEPT --lr 2e-6 "
             "--steps 1000`)", show_default=False)] = None,
    base_model: Annotated[Optional[str], typer.Option(
        help="tiny (built-in, random weights: tries the flow in seconds, draws noise), a diffusers hub id from "
             "the local Hugging Face cache (stable-diffusion-v1-5/stable-diffusion-v1-5), or a local diffusers "
             "folder.", show_default="the server's PERSONA_BASE_MODEL, else SD 1.5")] = None,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Print the concept and return once the job is queued; follow it later with "
                         "`persona-cli jobs watch JOB`. Needs --server (an embedded job would stop with this "
                         "process).")] = False,
    as_json: JsonOption = False,
    options: Optional[dict] = None,
) -> None:
    """Train a concept on a subject's photos and their captions, following the job; print the concept id.

    Ctrl-C asks whether to cancel the job (it keeps the last step's weights); otherwise it goes on on the
    server (`persona-cli jobs watch JOB` re-attaches) or, without --server, resumes from its last
    checkpoint the next time persona-cli starts on the same data dir.

    Examples: `persona-cli train photos/bruno/ --class dog` (upload, caption, LoRA with prior preservation);
    `persona-cli train subj_51d2… --method dreambooth --steps 800 --validation-every 200`;
    `persona-cli train photos/bruno/ --class dog --base-model tiny --steps 4 --reg none` (a quick try).
    """
    s = session(ctx)
    if detach and s.embedded:
        fail("FAILED_PRECONDITION", "--detach needs --server: without it the job runs inside this process and "
                                    "would stop with it. Start a server with `persona-cli serve` and pass "
                                    "--server HOST:PORT (or PERSONA_SERVER), or train without --detach")
    _choice("method", method, METHODS)
    _choice("captions", captions, CAPTIONS)
    _choice("mode", mode, MODES)
    for reg in regularizers or []:
        _choice("regularizers", reg, REGULARIZERS)
    if no_prior and "prior" in (regularizers or []):
        fail("INVALID_ARGUMENT", "`--no-prior` and `--reg prior` contradict each other: drop one of them")
    if no_prior:
        regularizers = ["none", *(regularizers or [])]
    request_options = training_options(**(options or {}))

    client = s.client()
    folder = Path(source).expanduser()
    if folder.is_dir():
        subject = subject_from_folder(s, client, folder, class_name, token, name)
        if captions != "class":  # `--captions class` trains on the template whatever is stored
            caption_subject(s, client, subject, mode)
    else:
        if folder.exists():
            fail("INVALID_ARGUMENT", f"{source} is not a folder: pass a folder of photos or a subject id")
        if os.sep in source or source.startswith("."):
            fail("INVALID_ARGUMENT", f"{source} does not exist: pass a folder of photos or a subject id")
        subject = client.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=source))
        if class_name and class_name != subject.class_name:
            fail("INVALID_ARGUMENT", f"--class {class_name} differs from {subject.subject_id}'s class "
                                     f"{subject.class_name!r}: --class only names the class of a new photo folder")
        if token and token != subject.token:
            fail("INVALID_ARGUMENT", f"--token {token} differs from {subject.subject_id}'s token {subject.token!r}: "
                                     "a subject's token is set when it is added")

    request = train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model=base_model or "", method=method or "",
        regularizers=regularizers or [], captions=captions or "", options=request_options, display_name=name or "",
        parent_concept_id=parent or "", mode=mode or "", encoder=encoder or "")
    try:
        job = client.train.StartTraining(request)
    except grpc.RpcError as e:
        if folder.is_dir():
            note(f"the subject {subject.subject_id} was created from {folder}: fix the option and train it with "
                 f"`persona-cli train {subject.subject_id} …` (no need to upload again)")
        raise PersonaClientError.from_rpc_error(e) from None
    concept_id = job.params.fields["concept_id"].string_value if "concept_id" in job.params.fields else ""
    note(f"training {concept_id or 'a concept'} ({method or 'default method'}) on {subject.subject_id}: "
         f"job {job.job_id}")

    if not detach:
        job = follow_training(s, client, job, concept_id, (options or {}).get("steps"))
    concept = (client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=concept_id)) if concept_id else None)
    if concept is not None:
        s.output(as_json).emit(message_dict(concept), lambda: concept.concept_id)
    if detach:
        note(f"detached: follow it with `persona-cli jobs watch {job.job_id}`, stop it with "
             f"`persona-cli jobs cancel {job.job_id}`")
        return
    if job.state == common_pb2.JOB_STATE_SUCCEEDED and concept is not None and concept.method == "customcontrast":
        note(f"made {concept.concept_id} from encoder {concept.encoder} without fine-tuning; draw it with "
             f"`persona-cli generate {concept.concept_id} \"a {concept.token} {concept.class_name} on the beach\"` "
             "(in-process, or on Triton with torch components; it has no export other tools load)")
    elif job.state == common_pb2.JOB_STATE_SUCCEEDED and concept is not None and concept.method == "p3s":
        note(f"trained {concept.concept_id}: p3s, {concept.steps_done} steps; its condition branch is stored with "
             f"the concept; draw it with `persona-cli generate {concept.concept_id} \"a {concept.token} "
             f"{concept.class_name}\"` (in-process, or on Triton with torch components; it has no export other "
             "tools load)")
    elif job.state == common_pb2.JOB_STATE_SUCCEEDED and concept is not None:
        loss = f", final loss {concept.final_loss:.4g}" if concept.steps_done else ""
        fmt = {"lora": "lora", "ti": "ti"}.get(concept.method, "diffusers")
        out = f"{concept.token}-{concept.class_name}".replace(" ", "-") + (".safetensors" if fmt != "diffusers" else "")
        note(f"trained {concept.concept_id}: {concept.method}, {concept.steps_done} steps{loss}; "
             f"export it with `persona-cli export {concept.concept_id} --format {fmt} --out {out}`")
        spent = where_the_time_went(job.train_result)
        if spent:
            note(spent)
    elif concept is not None and concept.state != train_pb2.CONCEPT_STATE_READY:
        note(f"{concept.concept_id} is {concept_state(concept.state)}")
    raise_unless_succeeded(job, s.error_log)
