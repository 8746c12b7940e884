"""`persona-cli concepts list|show|rm`: what training produced — the weights, the exact captions each
photo trained with, the options in effect and the validation images."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from persona.v1 import train_pb2

from ..output import fields, message_dict, note, plain, table
from .session import JsonOption, session
from .subjects import when

app = typer.Typer(
    help="List, inspect and delete concepts (what `persona-cli train` learns: a LoRA, a fine-tuned model or "
         "an embedding that draws your subject).",
    no_args_is_help=True, rich_markup_mode="markdown")

ConceptArgument = Annotated[str, typer.Argument(metavar="CONCEPT", help="Concept id, e.g. cpt_5b0e…",
                                                show_default=False)]


def concept_state(state: int) -> str:
    return train_pb2.ConceptState.Name(state).removeprefix("CONCEPT_STATE_")


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def steps_of(concept: train_pb2.Concept) -> str:
    total = concept.options.steps if concept.options.HasField("steps") else 0
    return f"{concept.steps_done}/{total}" if total else str(concept.steps_done)


def render_concept(concept: train_pb2.Concept):
    def render() -> str:
        pairs = [
            ("concept", concept.concept_id), ("subject", concept.subject_id),
            ("prompt", f"a {concept.token} {concept.class_name}" if concept.token else ""),
            ("name", concept.display_name), ("state", concept_state(concept.state)), ("job", concept.job_id),
            ("method", concept.method), ("regularizers", ", ".join(concept.regularizers) or "none"),
            ("captions", concept.captions),
            ("base model", " ".join(x for x in (concept.base_model,
                                                f"({concept.base_model_family})" if concept.base_model_family else "")
                                    if x)),
            ("base sha256", concept.base_model_sha256), ("resolution", concept.resolution or ""),
            ("steps", steps_of(concept)),
            ("final loss", f"{concept.final_loss:.4g}" if concept.steps_done else ""),
            ("created", when(concept.created_at)), ("updated", when(concept.updated_at)),
            ("persona", concept.persona_version),
            ("options", json.dumps(plain(message_dict(concept.options)), ensure_ascii=False)),
        ]
        if concept.parent_concept_id:
            pairs.append(("parent", concept.parent_concept_id))
        parts = [fields(pairs)]
        if concept.training_captions:
            parts.append("training captions\n" + table(
                ["IMAGE_ID", "SOURCE", "TEXT"],
                [(c.image.image_id, c.source, c.text) for c in concept.training_captions]))
        if concept.files:
            parts.append("files\n" + table(
                ["PATH", "SIZE", "ARTIFACT_ID"],
                [(f.path, human_size(f.size_bytes), f.artifact_id) for f in concept.files]))
        if concept.validation_images:
            parts.append("validation images\n" + table(
                ["STEP", "PROMPT", "ARTIFACT_ID"],
                [(v.step, v.prompt, v.artifact_id) for v in concept.validation_images]))
        return "\n\n".join(parts)
    return render


@app.command("list")
def list_(
    ctx: typer.Context,
    subject: Annotated[Optional[str], typer.Option(help="Only concepts learned from this subject id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List your concepts, newest first: id, subject, method, state, steps done, base model, created.

    Example: `persona-cli concepts list --subject subj_51d2…`
    """
    s = session(ctx)
    concepts = list(s.client().all_concepts(subject or ""))

    def render() -> str:
        return table(
            ["CONCEPT_ID", "SUBJECT", "METHOD", "STATE", "STEPS", "BASE_MODEL", "CREATED"],
            [(c.concept_id, c.subject_id, c.method, concept_state(c.state), steps_of(c), c.base_model,
              when(c.created_at)) for c in concepts],
        )

    s.output(as_json).emit({"concepts": [message_dict(c) for c in concepts]}, render)
    if not concepts:
        note("no concepts yet: train one with `persona-cli train PHOTOS_DIR --class dog`")


@app.command("show")
def show(ctx: typer.Context, concept_id: ConceptArgument, as_json: JsonOption = False) -> None:
    """Show a concept: its options (every default filled in), the caption each photo trained with, its
    weight files and its validation images.

    Example: `persona-cli concepts show cpt_5b0e…`
    """
    s = session(ctx)
    concept = s.client().train.GetConcept(train_pb2.GetConceptRequest(concept_id=concept_id))
    s.output(as_json).emit(message_dict(concept), render_concept(concept))


@app.command("rm")
def rm(ctx: typer.Context, concept_id: ConceptArgument, as_json: JsonOption = False) -> None:
    """Delete a concept and its exports; prints the deleted id. A concept still training must have its
    job cancelled first (`persona-cli jobs cancel JOB`).

    Example: `persona-cli concepts rm cpt_5b0e…`
    """
    s = session(ctx)
    s.client().train.DeleteConcept(train_pb2.DeleteConceptRequest(concept_id=concept_id))
    s.output(as_json).emit({"concept_id": concept_id}, lambda: concept_id)
