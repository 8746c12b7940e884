"""The evaluation report: one self-contained HTML page (images inline as data URIs, the plot as inline SVG, no
script, nothing fetched: it opens offline and can be mailed), plus the same numbers as JSON and CSV.

Per prompt: the concepts' images side by side, each concept's identifier-attention overlay, the per-prompt
scores. Then a metric table over everything and a Pareto plot of subject alignment against text alignment
(SID's SA vs TA where computed, else DreamBench's DINO or CLIP-I vs CLIP-T): a concept up and to the right draws
its subject faithfully *and* follows the prompt; the dashed line joins the concepts no other beats on both.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import asdict, dataclass, field

# Metric names → what the table heads them with; the order is the table's.
METRIC_LABELS = {
    "sa": "SA (SID)", "nsd": "NSD (SID)", "ta": "TA (SID)", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO",
    "clip_i_var": "CLIP-Iv (P3S)", "dino_var": "DINO-v (P3S)", "r_ci": "R-CI", "e_ci": "E-CI", "r_di": "R-DI",
    "e_di": "E-DI",
    # The toy world's entanglement measures (toyworld.py; `persona-cli bench quality`).
    "nearby_leakage": "nearby-object leakage", "background_leakage": "background leakage",
    "text_alignment": "asked background", "subject_fidelity": "subject fidelity",
    "nearby_object_leakage": "nearby-object leakage, object-sized regions only",
}
# Metrics where less is better (the best cell is the lowest).
LOWER_IS_BETTER = ("clip_i_var", "dino_var", "nearby_leakage", "background_leakage", "nearby_object_leakage")
# (x, y) metric pairs for the Pareto plot, the first one every concept has wins.
PARETO_AXES = (("ta", "sa"), ("clip_t", "dino"), ("clip_t", "clip_i"))
# The plot's axes span at least this much, so close concepts sit close instead of at opposite corners of a
# 0.772–0.773 window: similarities of these encoders differ meaningfully by hundredths, not by thousandths.
MIN_AXIS_SPAN = 0.1
# Images in which Grounded-SAM found no subject (R/E-CI, R/E-DI), counted per concept.
NO_SUBJECT = "no_subject_images"
NO_SUBJECT_SOURCE = ("generated images in which Grounded-SAM found no subject: their R/E segment is empty (all "
                     "black), scored as an image without the subject")


@dataclass
class PromptResult:
    text: str
    kind: str  # "reconstruction" | "editing"
    images: list[bytes] = field(default_factory=list)  # PNG
    attention: bytes | None = None  # PNG overlay of the identifier's cross-attention, first image
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class ConceptResult:
    concept_id: str
    label: str  # e.g. "bruno · lora · sid captions · prior"
    metrics: dict[str, float] = field(default_factory=dict)
    prompts: list[PromptResult] = field(default_factory=list)
    # Generated images the segmenter found no subject in (None: no segmentation ran), of `images` drawn.
    no_subject_images: int | None = None
    images: int = 0
    # What the report could not show for this concept and why, e.g. "attention maps: not available for p3s concepts
    # (...)": under the metric table, beside its images and in the JSON.
    notes: list[str] = field(default_factory=list)


def make_labels_unique(results: list[ConceptResult]) -> None:
    """Concepts whose labels coincide (two concepts of one subject and method) get their concept id appended, so
    the grid, table and plot tell them apart."""
    from collections import Counter

    counts = Counter(r.label for r in results)
    for r in results:
        if counts[r.label] > 1:
            r.label = f"{r.label} · {r.concept_id}"


@dataclass
class ReportMeta:
    title: str
    settings: dict  # steps, guidance, seed, images per prompt, prompt set, resolution
    sources: dict[str, str]  # metric → the model/checkpoint and the reading used


def render_json(results: list[ConceptResult], meta: ReportMeta) -> str:
    """Everything but the images."""
    return json.dumps({
        "title": meta.title, "settings": meta.settings, "sources": meta.sources,
        "concepts": [{"concept_id": r.concept_id, "label": r.label, "metrics": r.metrics,
                      NO_SUBJECT: r.no_subject_images, "images": r.images, "notes": r.notes,
                      "prompts": [{k: v for k, v in asdict(p).items() if k not in ("images", "attention")}
                                  for p in r.prompts]} for r in results],
    }, indent=2)


def render_csv(results: list[ConceptResult]) -> str:
    """One row per concept and metric (`scope` "all"), then per concept, prompt and score."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["concept_id", "scope", "prompt", "kind", "metric", "value"])
    for r in results:
        for metric, value in r.metrics.items():
            writer.writerow([r.concept_id, "all", "", "", metric, f"{value:.6f}"])
        if r.no_subject_images is not None:
            writer.writerow([r.concept_id, "all", "", "", NO_SUBJECT, str(r.no_subject_images)])
        for p in r.prompts:
            for metric, value in p.scores.items():
                writer.writerow([r.concept_id, "prompt", p.text, p.kind, metric, f"{value:.6f}"])
    return out.getvalue()


def render_html(results: list[ConceptResult], meta: ReportMeta) -> str:
    e = html.escape
    metrics = [m for m in METRIC_LABELS if any(m in r.metrics for r in results)]
    head = "".join(f"<th>{e(METRIC_LABELS[m])}</th>" for m in metrics)
    best = {m: (min if m in LOWER_IS_BETTER else max)(r.metrics[m] for r in results if m in r.metrics)
            for m in metrics}
    rows = "".join(
        f"<tr><td><b>{e(r.label)}</b><br><code>{e(r.concept_id)}</code></td>"
        + "".join(_cell(r.metrics.get(m), r.metrics.get(m) == best[m] and len(results) > 1) for m in metrics)
        + "</tr>" for r in results)
    table = f"<table><tr><th>concept</th>{head}</tr>{rows}</table>"
    missing = [r for r in results if r.no_subject_images]
    if missing:
        table += "<p>Grounded-SAM found no subject in " + "; ".join(
            f"{r.no_subject_images} of {r.images} images of <b>{e(r.label)}</b>" for r in missing) + \
            " (scored as images without the subject in R-CI, E-CI, R-DI, E-DI).</p>"
    table += "".join(f'<p class="note"><b>{e(r.label)}</b>: {e(note)}</p>' for r in results for note in r.notes)
    sources = "".join(f"<li><b>{e(METRIC_LABELS.get(m, m))}</b>: {e(s)}</li>" for m, s in meta.sources.items())
    settings = ", ".join(f"{e(str(k))} {e(str(v))}" for k, v in meta.settings.items())
    sections = []
    for index, prompt in enumerate(results[0].prompts if results else []):
        columns = []
        for r in results:
            p = r.prompts[index]
            images = "".join(f'<img src="{_data_uri(png)}" alt="{e(p.text)}">' for png in p.images)
            attention = (f'<figure><img src="{_data_uri(p.attention)}" alt="attention"><figcaption>identifier '
                         "attention</figcaption></figure>" if p.attention else "")
            scores = " · ".join(f"{e(METRIC_LABELS.get(k, k))} {v:.3f}" for k, v in p.scores.items())
            if not p.attention and index == 0:
                attention = "".join(f'<p class="note">{e(note.split(" (")[0])}</p>' for note in r.notes)
            columns.append(f'<div class="concept"><h4>{e(r.label)}</h4><div class="grid">{images}{attention}</div>'
                           f'<p class="scores">{scores}</p></div>')
        sections.append(f'<section><h3>{e(prompt.text)} <span class="kind">{e(prompt.kind)}</span></h3>'
                        f'<div class="row">{"".join(columns)}</div></section>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(meta.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .35rem .6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
td.best {{ background: #e6f4ea; font-weight: 600; }}
.row {{ display: flex; gap: 1.5rem; flex-wrap: wrap; }}
.grid {{ display: flex; gap: .3rem; flex-wrap: wrap; align-items: flex-start; }}
.grid img {{ width: 160px; height: auto; border-radius: 4px; }}
figure {{ margin: 0; }} figcaption {{ font-size: .75rem; color: #666; }}
.kind {{ font-size: .75rem; color: #666; font-weight: normal; border: 1px solid #ccc; border-radius: 3px;
         padding: 0 .3rem; }}
.scores {{ font-size: .8rem; color: #444; }}
.note {{ font-size: .85rem; color: #8a4b00; }}
</style></head><body>
<h1>{e(meta.title)}</h1>
<p>{settings}</p>
<h2>Metrics</h2>
{table}
{_pareto_svg(results)}
<details><summary>How each metric was computed</summary><ul>{sources}</ul></details>
<h2>Images per prompt</h2>
{"".join(sections)}
</body></html>
"""


def _cell(value: float | None, best: bool) -> str:
    if value is None:
        return "<td>–</td>"
    return f'<td class="best">{value:.3f}</td>' if best else f"<td>{value:.3f}</td>"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(ox >= x and oy >= y and (ox, oy) != (x, y) for ox, oy in points)]
    return sorted(front, key=lambda i: points[i][0])


def _pareto_svg(results: list[ConceptResult]) -> str:
    axes = next(((x, y) for x, y in PARETO_AXES if all(x in r.metrics and y in r.metrics for r in results)), None)
    if axes is None or not results:
        return ""
    x_name, y_name = axes
    points = [(r.metrics[x_name], r.metrics[y_name]) for r in results]
    width, height, pad = 520, 360, 56
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = _span(xs)
    y_low, y_high = _span(ys)

    def sx(v: float) -> float:
        return pad + (v - x_low) / (x_high - x_low) * (width - 2 * pad)

    def sy(v: float) -> float:
        return height - pad - (v - y_low) / (y_high - y_low) * (height - 2 * pad)

    front = pareto_front(points)
    line = " ".join(f"{sx(points[i][0]):.1f},{sy(points[i][1]):.1f}" for i in front)
    def label(i: int, x: float, y: float) -> str:
        # Labels right of a point in the left half, left of it in the right half: none runs off the plot.
        right_half = sx(x) > width / 2
        anchor, dx = ("end", -9) if right_half else ("start", 9)
        return (f'<text x="{sx(x) + dx:.1f}" y="{sy(y) - 8:.1f}" font-size="12" text-anchor="{anchor}">'
                f"{html.escape(results[i].label)}</text>")

    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="{"#1a73e8" if i in front else "#999"}"/>'
        + label(i, x, y) for i, (x, y) in enumerate(points))
    return f"""<h2>Subject vs text alignment</h2>
<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img"
 aria-label="Pareto plot of {METRIC_LABELS[y_name]} against {METRIC_LABELS[x_name]}">
<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>
<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>
<text x="{width / 2}" y="{height - 16}" text-anchor="middle" font-size="13">{METRIC_LABELS[x_name]} →</text>
<text x="18" y="{height / 2}" text-anchor="middle" font-size="13" transform="rotate(-90 18 {height / 2})">{METRIC_LABELS[y_name]} →</text>
<text x="{pad}" y="{height - pad + 16}" font-size="10">{x_low:.2f}</text>
<text x="{width - pad}" y="{height - pad + 16}" font-size="10" text-anchor="end">{x_high:.2f}</text>
<text x="{pad - 6}" y="{height - pad}" font-size="10" text-anchor="end">{y_low:.2f}</text>
<text x="{pad - 6}" y="{pad + 4}" font-size="10" text-anchor="end">{y_high:.2f}</text>
<polyline points="{line}" fill="none" stroke="#1a73e8" stroke-dasharray="5 4"/>
{dots}
</svg>"""


def _span(values: list[float]) -> tuple[float, float]:
    """An axis range holding `values` with a 15% margin, at least MIN_AXIS_SPAN wide (centred on them)."""
    low, high = min(values), max(values)
    margin = (high - low) * 0.15
    low, high = low - margin, high + margin
    if high - low < MIN_AXIS_SPAN:
        centre = (low + high) / 2
        low, high = centre - MIN_AXIS_SPAN / 2, centre + MIN_AXIS_SPAN / 2
    return low, high
