"""An evaluation comparing a customcontrast concept (made from a tiny encoder without fine-tuning) with a LoRA concept
of the same subject, through the real server on the tiny model: both drawn through the generate service and
measured; the LoRA concept gets its attention overlay, the customcontrast concept (no diffusers export) a note in the
report instead of a failed job; p3s drawing settings, with no p3s concept among them, refused by name."""
from __future__ import annotations

import json

import grpc
import pytest
from test_evaluate import _train
from test_train_customcontrast import make_concept, train_encoder

from persona.v1 import common_pb2, evaluate_pb2, subjects_pb2

NOTE = "attention maps: not available for customcontrast concepts"


def test_a_report_compares_a_customcontrast_concept_with_a_lora_concept(client, dog_photos, tmp_path):
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))
    final = make_concept(client, subject.subject_id, train_encoder(client, tmp_path))
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concepts = [final.params["concept_id"], _train(client, subject.subject_id, "lora")]

    with pytest.raises(grpc.RpcError) as refused:
        client.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(
            concept_ids=concepts, prompts=["a {} on the beach"], steps=2, p3s_injection_lambda=0.5))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no concept of `concept_ids` is a p3s concept" in refused.value.details()

    job = client.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(
        concept_ids=concepts, prompts=["a {} on the beach"], images_per_prompt=2, steps=2, seed=1,
        metrics=["clip_i", "clip_t", "dino", "attention"]))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error

    report = client.evaluate.GetReport(evaluate_pb2.GetReportRequest(job_id=job.job_id))
    assert list(report.concept_ids) == concepts and report.images == 2 * 2
    measured = {(m.concept_id, m.metric) for m in report.metrics}
    assert {(c, m) for c in concepts for m in ("clip_i", "clip_t", "dino")} <= measured

    client.read_report_file(job.job_id, report.html_artifact_id, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert page.count("<tr><td><b>") == 2 and "· customcontrast ·" in page and "· lora ·" in page
    assert page.count('alt="attention"') == 1 and NOTE in page
    client.read_report_file(job.job_id, report.json_artifact_id, tmp_path / "report.json")
    data = {c["concept_id"]: c for c in json.loads((tmp_path / "report.json").read_text())["concepts"]}
    assert [n.split(" (")[0] for n in data[concepts[0]]["notes"]] == [NOTE] and data[concepts[1]]["notes"] == []
