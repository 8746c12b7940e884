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
