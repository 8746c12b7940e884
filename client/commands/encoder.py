"""`persona-cli encoder train|list`: the CustomContrast encoder (issue 21), trained once per base model on a
multi-view dataset as an "encoder_train" job of the train service."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from persona.v1 import common_pb2, train_pb2

from ..output import message_dict, note, table
from .jobs import raise_unless_succeeded, state_name
from .session import JsonOption, session
from .subjects import when
from .train import TrainingProgress

JOB_KIND = "encoder_train"

app = typer.Typer(
    help="Train and list CustomContrast encoders: the image encoder that turns a subject's photos into tokens "
         "without fine-tuning, trained once per base model on many subjects with several views each.",
    no_args_is_help=True, rich_markup_mode="markdown")


@app.command("train")
def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(
        metavar="DATASET", show_default=False,
        help="A folder with one sub-folder per subject, each with two or more views (optional masks/<view>.png and "
             "subject.json {\"class\": …}). With --server: the name of a folder under the server's datasets root "
             "(<data dir>/datasets), unless the server takes paths.")],
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="`tiny`, a hub id in the model cache or a diffusers folder; the encoder fits only this "
                             "one. Default: the server's.")] = None,
    image_encoder: Annotated[Optional[str], typer.Option(
        "--image-encoder", help="The CLIP image encoder. Default: tiny for the tiny base model, else "
                                "openai/clip-vit-large-patch14.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps. Default 1000.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate. Default 3e-5 (the paper's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Distinct subjects per step, 2 to the dataset's count. Default min(4, subjects).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed. Default 0.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        "--checkpoint-every", help="Steps between resumable checkpoints. Default 100.")] = None,
    no_textual_qformer: Annotated[bool, typer.Option(
        "--no-textual-qformer", help="Ablation: visual tokens only (CSCL and MACL go with it).")] = False,
    no_cscl: Annotated[bool, typer.Option("--no-cscl", help="Ablation: no cross-sample contrastive loss.")] = False,
    no_macl: Annotated[bool, typer.Option("--no-macl", help="Ablation: no multi-view contrastive loss.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a CustomContrast encoder on a multi-view dataset; prints the encoder's id and folder.

    Example: `persona-cli encoder train views/ --base-model tiny --steps 20`
    """
    s = session(ctx)
    if s.embedded:  # the in-process server opens the folder: make it independent of its working directory
        dataset = str(Path(dataset).expanduser().resolve())
    client = s.client()
    given = dict(base_model=base_model, image_encoder=image_encoder, steps=steps, learning_rate=lr,
                 batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every)
    request = train_pb2.StartEncoderTrainingRequest(
        dataset=dataset, no_textual_qformer=no_textual_qformer, no_cscl=no_cscl, no_macl=no_macl,
        **{name: value for name, value in given.items() if value is not None})
    job = client.train.StartEncoderTraining(request)
    note(f"training an encoder: job {job.job_id}")
    with TrainingProgress(steps) as progress:
        final = client.wait_for_job(job.job_id, on_event=progress)
    raise_unless_succeeded(final, s.error_log)
    result = final.encoder_train_result
    s.output(as_json).emit(message_dict(result), lambda: (
        f"encoder {result.encoder_id}: {result.steps} steps, final loss {result.final_loss:.4g}, in {result.path}"))


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List your encoder training jobs, newest first: encoder id, state, steps, base model, folder."""
    s = session(ctx)
    jobs = list(s.client().all_jobs(kind=JOB_KIND))

    def row(job: common_pb2.Job):
        result = job.encoder_train_result
        return (result.encoder_id or job.params["encoder_id"], job.job_id, state_name(job.state),
                result.steps or "", job.params["base_model"], result.path, when(job.created_at))

    s.output(as_json).emit({"encoders": [message_dict(j) for j in jobs]}, lambda: table(
        ["ENCODER_ID", "JOB", "STATE", "STEPS", "BASE_MODEL", "PATH", "CREATED"], [row(j) for j in jobs]))
    if not jobs:
        note("no encoders yet: train one with `persona-cli encoder train DATASET --base-model tiny`")
