"""`persona-cli evaluate`: measure concepts the way SID, DreamBench, P3S and CustomContrast do, and write the report."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from persona.services.generate.options import BY_NAME, P3S_SETTINGS
from persona.v1 import evaluate_pb2

from ..declared_options import with_declared_options
from ..jobwatch import JobProgress, follow_or_cancel
from ..output import fail, message_dict, note, table
from .jobs import raise_unless_succeeded
from .session import JsonOption, session

BUILTIN_PROMPT_SETS = ("dreambench", "dreambench-object", "dreambench-live")


# How the report's p3s concepts are drawn: `persona-cli generate`'s p3s options, declared once (generate/options.py).
@with_declared_options([BY_NAME[name] for name in P3S_SETTINGS], before="metric")
def evaluate(
    ctx: typer.Context,
    concept_ids: Annotated[list[str], typer.Argument(
        metavar="CONCEPT…", show_default=False,
        help="One or more concepts to measure side by side (ids from `persona-cli concepts list`).")],
    prompts: Annotated[str, typer.Option(
        "--prompts", metavar="dreambench|FILE",
        help="dreambench (its 25 object or 25 live-subject prompts, by class; also dreambench-object, "
             "dreambench-live) or a text file: one prompt per line with {} where the subject goes (\"{} on the "
             "beach\"), # comments, an R: or E: prefix to mark reconstruction or editing.")] = "dreambench",
    number: Annotated[Optional[int], typer.Option("-n", "--num-images", help="Images per prompt and concept, 1–16.",
                                                  show_default="4")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of each prompt's first image (the same for every "
                                                     "concept).", show_default="0")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps.", show_default="50")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale.", show_default="7.5")] = None,
    metric: Annotated[Optional[list[str]], typer.Option(
        "--metric", show_default="all",
        help="Only these metrics; repeat. clip_i clip_t dino sa nsd ta clip_i_var dino_var r_ci e_ci r_di e_di "
             "attention.")] = None,
    report: Annotated[Path, typer.Option(
        "--report", dir_okay=False, help="Where the HTML report goes; report.json and report.csv are written "
                                         "beside it.")] = Path("report.html"),
    as_json: JsonOption = False,
    options: Optional[dict] = None,
) -> None:
    """Draw each concept on a prompt set and measure it: DreamBench's CLIP-I, CLIP-T and DINO; SID's subject
    alignment, non-subject disentanglement and text alignment; P3S's variances; CustomContrast's reconstruction
    vs editing split; and where the identifier attends (cross-attention overlays).

    The report is one HTML file that opens anywhere without a network: image grids per prompt, attention
    overlays, the metric table and a Pareto plot of subject against text alignment across the concepts. Compare
    e.g. a concept trained on Case 1 captions with one trained on SID captions:
    `persona-cli evaluate cpt_case1 cpt_sid -n 4 --report sid.html`.
    """
    request = evaluate_pb2.StartEvaluationRequest(concept_ids=concept_ids, metrics=metric or [])
    if prompts in BUILTIN_PROMPT_SETS:
        request.prompt_set = prompts
    else:
        path = Path(prompts).expanduser()
        if not path.is_file():
            fail("INVALID_ARGUMENT", f"--prompts {prompts!r} is neither {', '.join(BUILTIN_PROMPT_SETS)} nor a file")
        request.prompts.extend(path.read_text(encoding="utf-8").splitlines())
    for name, value in (("images_per_prompt", number), ("seed", seed), ("steps", steps),
                        ("guidance_scale", guidance), *(options or {}).items()):
        if value is not None:
            setattr(request, name, value)
    s = session(ctx)
    client = s.client()
    job = client.evaluate.StartEvaluation(request)
    note(f"evaluating {', '.join(concept_ids)} as job {job.job_id}")
    final = follow_or_cancel(client, job, JobProgress(), f"cancelling {job.job_id}")
    raise_unless_succeeded(final, s.error_log)
    result = client.evaluate.GetReport(evaluate_pb2.GetReportRequest(job_id=job.job_id))
    files = {report: result.html_artifact_id, report.with_suffix(".json"): result.json_artifact_id,
             report.with_suffix(".csv"): result.csv_artifact_id}
    for path, artifact_id in files.items():
        client.read_report_file(job.job_id, artifact_id, path)
    data = {**message_dict(result), "files": [str(p) for p in files]}

    def render() -> str:
        metrics = sorted({m.metric for m in result.metrics})
        values = {(m.concept_id, m.metric): m.value for m in result.metrics}
        return table(["CONCEPT", *[m.upper() for m in metrics]],
                     [(c, *[f"{values[(c, m)]:.3f}" if (c, m) in values else "–" for m in metrics])
                      for c in result.concept_ids])

    s.output(as_json).emit(data, render)
    note(f"report: {report} ({result.images} images in {result.seconds:.0f} s; also {report.with_suffix('.json')}, "
         f"{report.with_suffix('.csv')})")
