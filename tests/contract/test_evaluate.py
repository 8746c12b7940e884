"""EvaluateService through a real gRPC server on tiny models: an evaluation job draws two concepts through the
generate service, measures every metric, and writes a report (HTML with grids, attention overlays, table and
plot; JSON; CSV) read back over ReadReportFile; bad requests name the field and queue nothing."""
from __future__ import annotations

import csv
import io
import json

import grpc
import pytest

from persona.v1 import common_pb2, evaluate_pb2, subjects_pb2, train_pb2

from persona.services.evaluate.domain import METRICS


def _train(client, subject_id: str, method: str) -> str:
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method=method, regularizers=["none"] if method == "lora" else [],
        options=train_pb2.TrainingOptions(steps=2, learning_rate=1e-2, resolution=32, checkpoint_every=0)))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    return job.params["concept_id"]


@pytest.fixture
def concepts(client, dog_photos) -> list[str]:
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))
    return [_train(client, subject.subject_id, "lora"), _train(client, subject.subject_id, "ti")]


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_an_evaluation_measures_every_metric_and_writes_the_report(app, client, concepts, tmp_path):
    job = client.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(
        concept_ids=concepts, prompts=["a {} on the beach", "E: a red {}"], images_per_prompt=2, steps=2, seed=3))
    assert job.kind == "evaluate"
    events = []
    final = client.wait_for_job(job.job_id, on_event=events.append, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert any("prompt 2/2" in e.message for e in events)

    report = client.evaluate.GetReport(evaluate_pb2.GetReportRequest(job_id=job.job_id))
    assert list(report.concept_ids) == concepts and report.images == 2 * 2 * 2
    measured = {(m.concept_id, m.metric): m for m in report.metrics}
    for concept in concepts:
        for metric in set(METRICS) - {"attention"}:
            assert (concept, metric) in measured, metric
    assert measured[(concepts[0], "clip_i_var")].value >= 0
    assert -1 <= measured[(concepts[0], "sa")].value <= 1 and 0 <= measured[(concepts[0], "nsd")].value <= 2
    assert "ViT" in measured[(concepts[0], "dino")].source or "dino" in measured[(concepts[0], "dino")].source

    html = tmp_path / "report.html"
    client.read_report_file(job.job_id, report.html_artifact_id, html)
    page = html.read_text()
    assert page.count('src="data:image/png;base64,') == 2 * 2 * (2 + 1)  # concepts × prompts × (images + overlay)
    assert "identifier attention" in page and "<table>" in page and "<svg" in page
    client.read_report_file(job.job_id, report.json_artifact_id, tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert [c["concept_id"] for c in data["concepts"]] == concepts
    assert [p["kind"] for p in data["concepts"][0]["prompts"]] == ["reconstruction", "editing"]
    client.read_report_file(job.job_id, report.csv_artifact_id, tmp_path / "report.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert {r["metric"] for r in rows if r["scope"] == "all"} == set(METRICS) - {"attention"} | {"no_subject_images"}

    # The reference photos' masks were made (Grounded-SAM on the class) and stored for the next report.
    subject_id = app.models.get("acme", concepts[0]).subject_id
    assert len(app.db.query("SELECT * FROM masks WHERE subject_id = :s", {"s": subject_id})) == 2

    # A file that is not the report's is refused.
    refused = _error(lambda: list(client.evaluate.ReadReportFile(evaluate_pb2.ReadReportFileRequest(
        job_id=job.job_id, artifact_id="0" * 64))))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("changes, code, words", [
    (dict(concept_ids=["cpt_nope"]), "NOT_FOUND", ["cpt_nope"]),
    (dict(concept_ids=[]), "INVALID_ARGUMENT", ["`concept_ids`"]),
    (dict(prompts=["# only a comment"]), "INVALID_ARGUMENT", ["`prompts`"]),
    (dict(prompt_set="imagenet", prompts=[]), "INVALID_ARGUMENT", ["`prompt_set`", "dreambench"]),
    (dict(prompt_set="dreambench"), "INVALID_ARGUMENT", ["`prompt_set`", "`prompts`"]),
    (dict(images_per_prompt=0), "INVALID_ARGUMENT", ["`images_per_prompt`"]),
    (dict(metrics=["clip_i", "fid"]), "INVALID_ARGUMENT", ["`metrics`", "fid"]),
    (dict(steps=0), "INVALID_ARGUMENT", ["`steps`"]),
    (dict(resolution=30), "INVALID_ARGUMENT", ["`resolution`"]),
])
def test_bad_requests_name_the_field_and_queue_nothing(app, client, dog_photos, changes, code, words):
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=dog_photos[0])]))
    concept = _train(client, subject.subject_id, "lora") if "concept_ids" not in changes else ""
    fields = dict(concept_ids=[concept], prompts=["a {} on the beach"])
    fields.update(changes)
    error = _error(lambda: client.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(**fields)))
    assert error.code().name == code, error.details()
    for word in words:
        assert word in error.details()
    assert not app.db.query("SELECT * FROM jobs WHERE kind = 'evaluate'")


def test_the_report_of_a_running_or_unknown_job_is_refused(client):
    unknown = _error(lambda: client.evaluate.GetReport(evaluate_pb2.GetReportRequest(job_id="job_nope")))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    empty = _error(lambda: client.evaluate.GetReport(evaluate_pb2.GetReportRequest()))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and "`job_id`" in empty.details()


def test_images_where_grounded_sam_finds_nothing_are_scored_and_counted(app, client, dog_photos, tmp_path):
    """The real GroundingDINO + SAM, with a box threshold no detection reaches: every generated image has no subject.
    R/E-CI and R/E-DI score them as images without the subject, the report counts them, the job succeeds."""
    from persona.services.mask.grounded import GroundedSamMasker
    from persona.v1 import mask_pb2

    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))
    for image in subject.images:  # the reference photos' masks from clicks, so only generated images are segmented
        client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
            subject_id=subject.subject_id, image_id=image.image_id,
            positive=[mask_pb2.Point(x=image.width // 2, y=image.height // 2)]))
    first, second = _train(client, subject.subject_id, "lora"), _train(client, subject.subject_id, "lora")
    settings = app.masks.settings
    app.masks.models._loaded[("grounded-sam", settings.detector_model, settings.segmenter_model)] = GroundedSamMasker(
        settings.detector_model, settings.segmenter_model, device="cpu", box_threshold=1.01)  # detects nothing

    job = client.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(
        concept_ids=[first, second], prompts=["a {} on the beach", "E: a red {}"], images_per_prompt=2, steps=2,
        metrics=["r_ci", "e_ci", "r_di", "e_di", "sa", "ta"]))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    report = client.evaluate.GetReport(evaluate_pb2.GetReportRequest(job_id=job.job_id))
    measured = {(m.concept_id, m.metric): m.value for m in report.metrics}
    assert measured[(first, "no_subject_images")] == measured[(second, "no_subject_images")] == 4.0
    assert all(-1 <= measured[(c, m)] <= 1 for c in (first, second) for m in ("r_ci", "e_ci", "r_di", "e_di"))

    client.read_report_file(job.job_id, report.json_artifact_id, tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    labels = [c["label"] for c in data["concepts"]]
    assert len(set(labels)) == 2 and first in labels[0] and second in labels[1]  # same subject and method
    assert [c["no_subject_images"] for c in data["concepts"]] == [4, 4]
    client.read_report_file(job.job_id, report.html_artifact_id, tmp_path / "report.html")
    assert "Grounded-SAM found no subject in 4 of 4 images" in (tmp_path / "report.html").read_text()
