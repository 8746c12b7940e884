"""The evaluation report renders every part from plain results: grid, overlays, table, Pareto plot, JSON, CSV;
and the Pareto front is what its definition says."""
from __future__ import annotations

import csv
import io
import json

from PIL import Image

from persona.services.evaluate.report import (ConceptResult, PromptResult, ReportMeta, pareto_front, render_csv,
                                              render_html, render_json)


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _results() -> list[ConceptResult]:
    def concept(cid, label, sa, ta):
        return ConceptResult(cid, label, {"sa": sa, "ta": ta, "clip_i": 0.8},
                             [PromptResult("a sks dog on the beach", "reconstruction", [_png("red"), _png("blue")],
                                           _png("yellow"), {"clip_t": 0.3})])
    return [concept("cpt_a", "case 1", 0.7, 0.25), concept("cpt_b", "case 3 <sid>", 0.75, 0.28),
            concept("cpt_c", "no prior", 0.6, 0.2)]


def test_pareto_front_keeps_the_undominated_points():
    assert pareto_front([(0.25, 0.7), (0.28, 0.75), (0.2, 0.6)]) == [1]
    assert pareto_front([(0.1, 0.9), (0.5, 0.5), (0.9, 0.1), (0.4, 0.4)]) == [0, 1, 2]


def test_html_has_the_grid_overlays_table_and_plot_and_needs_no_network():
    page = render_html(_results(), ReportMeta("persona evaluation", {"steps": 50}, {"sa": "CLIP ViT-B/32 on segments"}))
    assert page.count('<img src="data:image/png;base64,') == 3 * 3  # two images + one overlay per concept
    assert "identifier attention" in page and "<table>" in page and "<svg" in page and "polyline" in page
    assert "case 3 &lt;sid&gt;" in page  # labels escaped
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert '<td class="best">0.750</td>' in page  # the best SA marked


def test_json_and_csv_carry_the_numbers():
    data = json.loads(render_json(_results(), ReportMeta("t", {}, {})))
    assert [c["metrics"]["sa"] for c in data["concepts"]] == [0.7, 0.75, 0.6]
    assert "images" not in data["concepts"][0]["prompts"][0]
    rows = list(csv.DictReader(io.StringIO(render_csv(_results()))))
    assert {"concept_id": "cpt_b", "scope": "all", "prompt": "", "kind": "", "metric": "sa",
            "value": "0.750000"} in rows
    assert any(r["scope"] == "prompt" and r["metric"] == "clip_t" for r in rows)


def test_concepts_with_the_same_label_are_told_apart():
    from persona.services.evaluate.report import make_labels_unique

    same = "bruno · lora · sid captions"
    results = [ConceptResult("cpt_a", same), ConceptResult("cpt_b", same), ConceptResult("cpt_c", "bruno · ti")]
    make_labels_unique(results)
    assert [r.label for r in results] == [f"{same} · cpt_a", f"{same} · cpt_b", "bruno · ti"]


def test_pareto_axes_span_a_readable_range():
    """Two concepts 0.001 apart are drawn close together on an axis at least 0.1 wide, not at its corners."""
    results = [ConceptResult("cpt_a", "a", {"sa": 0.7722, "ta": 0.2501}), ConceptResult("cpt_b", "b", {"sa": 0.7731,
                                                                                                   "ta": 0.2509})]
    page = render_html(results, ReportMeta("t", {}, {}))
    svg = page[page.index("<svg"):page.index("</svg>")]
    ticks = [float(t.split(">")[1]) for t in svg.split("</text>") if t.rsplit(">", 1)[-1].replace(".", "").isdigit()]
    x_low, x_high, y_low, y_high = ticks
    assert x_high - x_low >= 0.1 - 1e-9 and y_high - y_low >= 0.1 - 1e-9  # (the labels have two decimals)
    assert x_low < 0.2501 < 0.2509 < x_high and y_low < 0.7722 < 0.7731 < y_high
    circles = [float(c.split('cx="')[1].split('"')[0]) for c in svg.split("<circle")[1:]]
    assert abs(circles[0] - circles[1]) < 10  # pixels apart, on a 400-pixel axis


def test_images_without_a_found_subject_are_counted_in_every_form():
    results = _results()
    results[1].no_subject_images, results[1].images = 2, 8
    page = render_html(results, ReportMeta("t", {}, {}))
    assert "Grounded-SAM found no subject in 2 of 8 images of <b>case 3 &lt;sid&gt;</b>" in page
    assert json.loads(render_json(results, ReportMeta("t", {}, {})))["concepts"][1]["no_subject_images"] == 2
    rows = list(csv.DictReader(io.StringIO(render_csv(results))))
    assert {"concept_id": "cpt_b", "scope": "all", "prompt": "", "kind": "", "metric": "no_subject_images",
            "value": "2"} in rows


def test_an_empty_mask_is_an_empty_segment_only_when_asked():
    import numpy as np
    import pytest

    from persona.services.evaluate.metrics import SEGMENT_SIZE, subject_segment
    from persona.services.runtime.errors import InvalidArgument

    image, empty = Image.new("RGB", (40, 30), "red"), np.zeros((30, 40), dtype=bool)
    with pytest.raises(InvalidArgument, match="`mask` selects no pixel"):
        subject_segment(image, empty)
    segment = subject_segment(image, empty, empty_ok=True)
    assert segment.size == (SEGMENT_SIZE, SEGMENT_SIZE) and segment.getextrema() == ((0, 0),) * 3
