"""An evaluation comparing a p3s concept with a LoRA concept of the same subject, through the real server on the tiny
model: both drawn through the generate service and measured; the LoRA concept gets its attention overlays, the p3s
concept (no diffusers export to redraw from) none, with a note in the report instead of a failed job; the request's
p3s settings (λ, weight schedule) change how the p3s concept is drawn and leave the LoRA concept as it was."""
from __future__ import annotations

import json

import grpc
import pytest
from test_evaluate import _train
from test_train_p3s import _click

from persona.v1 import common_pb2, evaluate_pb2, subjects_pb2, train_pb2

from persona.services.evaluate.domain import METRICS

NOTE = "attention maps: not available for p3s concepts"


def test_a_report_compares_a_p3s_concept_with_a_lora_concept(client, dog_photos, tmp_path):
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))
    for image in subject.images:
        _click(client, subject, image)
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method="p3s", captions="class",
        options=train_pb2.TrainingOptions(steps=20, learning_rate=1e-3, resolution=32, checkpoint_every=0)))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concepts = [final.params["concept_id"], _train(client, subject.subject_id, "lora")]

    job = client.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(
        concept_ids=concepts, prompts=["a {} on the beach"], images_per_prompt=2, steps=2, seed=1,
        metrics=["clip_i", "clip_t", "dino", "sa", "ta", "clip_i_var", "attention"]))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error

    report = client.evaluate.GetReport(evaluate_pb2.GetReportRequest(job_id=job.job_id))
    assert list(report.concept_ids) == concepts and report.images == 2 * 2
    measured = {(m.concept_id, m.metric) for m in report.metrics}
    assert {(c, m) for c in concepts for m in ("clip_i", "clip_t", "dino", "sa", "ta", "clip_i_var")} <= measured
    assert "attention" in METRICS

    client.read_report_file(job.job_id, report.html_artifact_id, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    # Both rows of the table; 2 images each, and one overlay for the LoRA concept only.
    assert page.count("<tr><td><b>") == 2 and "· p3s ·" in page and "· lora ·" in page
    assert page.count('src="data:image/png;base64,') == 2 * 2 + 1
    assert page.count('alt="attention"') == 1 and NOTE in page
    client.read_report_file(job.job_id, report.json_artifact_id, tmp_path / "report.json")
    data = {c["concept_id"]: c for c in json.loads((tmp_path / "report.json").read_text())["concepts"]}
    assert [n.split(" (")[0] for n in data[concepts[0]]["notes"]] == [NOTE] and data[concepts[1]]["notes"] == []

    # The same evaluation with the p3s concept drawn at another λ and schedule: its images (so its scores) change,
    # the LoRA concept's do not, and the report says what the p3s concepts were drawn with.
    job = client.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(
        concept_ids=concepts, prompts=["a {} on the beach"], images_per_prompt=2, steps=2, seed=1, metrics=["clip_i"],
        p3s_injection_lambda=5.0, p3s_weight_schedule="constant"))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    report = client.evaluate.GetReport(evaluate_pb2.GetReportRequest(job_id=job.job_id))
    client.read_report_file(job.job_id, report.json_artifact_id, tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["settings"]["p3s concepts drawn with"].startswith("p3s_weight_schedule constant, "
                                                                   "p3s_injection_lambda 5.0")
    redrawn = {c["concept_id"]: c for c in again["concepts"]}

    def clip_i(concepts_by_id, concept_id) -> float:
        return concepts_by_id[concept_id]["prompts"][0]["scores"]["clip_i"]

    assert clip_i(redrawn, concepts[0]) != clip_i(data, concepts[0])
    assert clip_i(redrawn, concepts[1]) == clip_i(data, concepts[1])

    # Refused up front, naming the field: p3s settings with no p3s concept to draw, and one out of its bounds.
    for concept_ids, settings, named in (([concepts[1]], dict(p3s_reference=1), "`p3s_reference` is set"),
                                         (concepts, dict(p3s_weight_k=0.0), "`p3s_weight_k` is 0")):
        with pytest.raises(grpc.RpcError) as refused:
            client.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(
                concept_ids=concept_ids, prompts=["a {} on the beach"], steps=2, **settings))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in refused.value.details()
