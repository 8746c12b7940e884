"""Tenants through a real server configured as `persona-cli serve` is (API keys, model paths off): every RPC called
by tenant B with tenant A's ids, and every model field with server paths (A's concept folders, /etc, …), answers
NOT_FOUND or INVALID_ARGUMENT and never data; the model allow-list still serves `tiny` and the models root."""
from __future__ import annotations

import grpc
import pytest

from persona.v1 import (caption_pb2, common_pb2, evaluate_pb2, generate_pb2, mask_pb2, subjects_pb2, train_pb2)

REFUSED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_cache, mask_models, eval_models, dreambench):
    """A server as `serve` runs it, tenant A with a subject, caption, mask, trained concept (exported and drawn,
    so its folders exist on the server) and evaluation; tenant B with a subject of its own."""
    from persona.client.sdk import PersonaClient
    from persona.services.app import build_app
    from persona.services.evaluate.settings import EvaluateSettings
    from persona.services.generate.settings import GenerateSettings
    from persona.services.mask.settings import MaskSettings
    from persona.services.runtime.settings import RuntimeSettings
    from persona.services.train.settings import TrainSettings

    data = tmp_path_factory.mktemp("tenancy") / "data"
    settings = RuntimeSettings(data_dir=data, auth="api-key", model_paths=False)
    app = build_app(settings, train_settings=TrainSettings(base_model_cache_dir=model_cache, device="cpu"),
                    generate_settings=GenerateSettings(device="cpu"),
                    mask_settings=MaskSettings(clip_model=str(mask_models["clip"]), device="cpu",
                                               clipseg_model=str(mask_models["clipseg"]),
                                               detector_model=str(mask_models["detector"]),
                                               segmenter_model=str(mask_models["segmenter"])),
                    evaluate_settings=EvaluateSettings(work_dir=data / "evaluate", clip_model=str(eval_models["clip"]),
                                                       dino_model=str(eval_models["dino"]), device="cpu"))
    a = PersonaClient.connect(app.address, app.authenticator.create_key("tenant-a")[1])
    b = PersonaClient.connect(app.address, app.authenticator.create_key("tenant-b")[1])
    photos = [p.read_bytes() for p in sorted((dreambench / "dog").glob("*.jpg"))[:2]]

    def subject(client):
        return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
            class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in photos]))

    sa, sb = subject(a), subject(b)
    image = sa.images[0]
    caption_job = a.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(subject_id=sa.subject_id, case=1))
    a.wait_for_job(caption_job.job_id, timeout_s=300)
    a.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(subject_id=sa.subject_id, image_id=image.image_id,
                                                          positive=[mask_pb2.Point(x=20, y=20)]))
    train_job = a.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=sa.subject_id, base_model="tiny", method="lora", regularizers=["none"],
        options=train_pb2.TrainingOptions(steps=2, learning_rate=1e-2, resolution=32, checkpoint_every=0)))
    assert a.wait_for_job(train_job.job_id, timeout_s=600).state == common_pb2.JOB_STATE_SUCCEEDED
    concept = a.train.GetConcept(train_pb2.GetConceptRequest(concept_id=train_job.params["concept_id"]))
    a.train.ExportConcept(train_pb2.ExportConceptRequest(concept_id=concept.concept_id,
                                                         format=train_pb2.EXPORT_FORMAT_DIFFUSERS))
    list(a.generate.Generate(generate_pb2.GenerateRequest(concept_id=concept.concept_id, prompts=["a sks dog"],
                                                          steps=1, width=32, height=32)))
    eval_job = a.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(
        concept_ids=[concept.concept_id], prompts=["a {} on the beach"], images_per_prompt=1, steps=1,
        resolution=32, metrics=["clip_t"]))
    assert a.wait_for_job(eval_job.job_id, timeout_s=600).state == common_pb2.JOB_STATE_SUCCEEDED
    report = a.evaluate.GetReport(evaluate_pb2.GetReportRequest(job_id=eval_job.job_id))
    # Server paths B might try as a model: A's concept as drawn and as trained, the data dir, and the system's.
    folders = [p for p in (data / "generate" / concept.concept_id, data / "train" / concept.concept_id)
               if p.is_dir()]
    assert folders, "the concept was never materialised on the server: the path attack would prove nothing"
    paths = [*map(str, folders), str(data), str(model_cache / "tiny-sd"), "/etc", "/etc/passwd", "/nonexistent",
             "~", "../data", "./tiny-sd", f"file://{folders[0]}"]
    yield dict(app=app, a=a, b=b, sa=sa, sb=sb, image=image, concept=concept, eval_job=eval_job, report=report,
               train_job=train_job, paths=paths)
    a.close()
    b.close()
    app.stop(0)


def _code(call):
    """The status of `call()` (OK, and the response, when it answered); streams are read to the end."""
    try:
        response = call()
        if hasattr(response, "__next__"):
            response = list(response)
        return grpc.StatusCode.OK, response
    except grpc.RpcError as e:
        return e.code(), e.details()


def _calls_with_a_ids(w):
    """(name, call) of every RPC that takes an id, as tenant B naming tenant A's."""
    b, sid, iid, cid = w["b"], w["sa"].subject_id, w["image"].image_id, w["concept"].concept_id
    ref = common_pb2.ImageRef(subject_id=sid, image_id=iid)
    weights = w["concept"].files[0].artifact_id
    job, eval_job = w["train_job"].job_id, w["eval_job"].job_id
    return [
        ("GetSubject", lambda: b.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=sid))),
        ("DeleteSubject", lambda: b.subjects.DeleteSubject(subjects_pb2.DeleteSubjectRequest(subject_id=sid))),
        ("GetSubjectImage", lambda: b.subjects.GetSubjectImage(subjects_pb2.GetSubjectImageRequest(image=ref))),
        ("StartCaptioning", lambda: b.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(subject_id=sid))),
        ("ListCaptions", lambda: b.captions.ListCaptions(caption_pb2.ListCaptionsRequest(subject_id=sid))),
        ("GetCaption", lambda: b.captions.GetCaption(caption_pb2.GetCaptionRequest(image=ref))),
        ("SetCaption", lambda: b.captions.SetCaption(caption_pb2.SetCaptionRequest(image=ref, text="a sks dog"))),
        ("MaskFromPoints", lambda: b.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
            subject_id=sid, image_id=iid, positive=[mask_pb2.Point(x=5, y=5)]))),
        ("MaskFromText", lambda: b.masks.MaskFromText(mask_pb2.MaskFromTextRequest(subject_id=sid))),
        ("GetMask", lambda: b.masks.GetMask(mask_pb2.GetMaskRequest(subject_id=sid, image_id=iid))),
        ("StartTraining", lambda: b.train.StartTraining(train_pb2.StartTrainingRequest(subject_id=sid,
                                                                                        base_model="tiny"))),
        ("StartTraining parent", lambda: b.train.StartTraining(train_pb2.StartTrainingRequest(
            subject_id=w["sb"].subject_id, base_model="tiny", method="lora", parent_concept_id=cid))),
        ("GetConcept", lambda: b.train.GetConcept(train_pb2.GetConceptRequest(concept_id=cid))),
        ("DeleteConcept", lambda: b.train.DeleteConcept(train_pb2.DeleteConceptRequest(concept_id=cid))),
        ("ExportConcept", lambda: b.train.ExportConcept(train_pb2.ExportConceptRequest(
            concept_id=cid, format=train_pb2.EXPORT_FORMAT_DIFFUSERS))),
        ("StartExport", lambda: b.train.StartExport(train_pb2.ExportConceptRequest(
            concept_id=cid, format=train_pb2.EXPORT_FORMAT_LORA))),
        ("ReadConceptFile", lambda: b.train.ReadConceptFile(train_pb2.ReadConceptFileRequest(
            concept_id=cid, artifact_id=weights))),
        ("Generate", lambda: b.generate.Generate(generate_pb2.GenerateRequest(concept_id=cid, prompts=["a dog"],
                                                                                steps=1))),
        ("LoadConcept", lambda: b.generate.LoadConcept(generate_pb2.LoadConceptRequest(concept_id=cid))),
        ("UnloadConcept", lambda: b.generate.UnloadConcept(generate_pb2.UnloadConceptRequest(concept_id=cid))),
        ("StartEvaluation", lambda: b.evaluate.StartEvaluation(evaluate_pb2.StartEvaluationRequest(
            concept_ids=[cid]))),
        ("GetReport", lambda: b.evaluate.GetReport(evaluate_pb2.GetReportRequest(job_id=eval_job))),
        ("ReadReportFile", lambda: b.evaluate.ReadReportFile(evaluate_pb2.ReadReportFileRequest(
            job_id=eval_job, artifact_id=w["report"].html_artifact_id))),
        ("GetJob", lambda: b.jobs.GetJob(common_pb2.GetJobRequest(job_id=job))),
        ("WatchJob", lambda: b.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job))),
        ("CancelJob", lambda: b.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job))),
    ]


def test_every_rpc_with_another_tenants_ids_is_refused(world):
    for name, call in _calls_with_a_ids(world):
        code, answer = _code(call)
        assert code in REFUSED, (name, code, answer)
    # A's things are all still there, untouched.
    a = world["a"]
    assert a.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=world["sa"].subject_id)).images
    assert a.train.GetConcept(train_pb2.GetConceptRequest(concept_id=world["concept"].concept_id)).files


def test_lists_show_another_tenant_nothing(world):
    b, sid, cid = world["b"], world["sa"].subject_id, world["concept"].concept_id
    assert [s.subject_id for s in b.subjects.ListSubjects(subjects_pb2.ListSubjectsRequest()).subjects] == \
        [world["sb"].subject_id]
    assert not b.train.ListConcepts(train_pb2.ListConceptsRequest()).concepts
    assert not b.train.ListConcepts(train_pb2.ListConceptsRequest(subject_id=sid)).concepts
    assert not b.jobs.ListJobs(common_pb2.ListJobsRequest(subject_id=sid)).jobs
    assert all(c.concept_id != cid for c in b.generate.ListLoadedConcepts(
        generate_pb2.ListLoadedConceptsRequest()).concepts)


def test_server_paths_as_models_are_refused_alike(world):
    b, sb = world["b"], world["sb"]
    model_fields = {
        "Generate": lambda p: b.generate.Generate(generate_pb2.GenerateRequest(base_model=p, prompts=["a dog"],
                                                                               steps=1, width=32, height=32)),
        "StartTraining": lambda p: b.train.StartTraining(train_pb2.StartTrainingRequest(
            subject_id=sb.subject_id, base_model=p, method="lora", regularizers=["none"],
            options=train_pb2.TrainingOptions(steps=1))),
        "MaskFromPoints": lambda p: b.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
            subject_id=sb.subject_id, image_id=sb.images[0].image_id, positive=[mask_pb2.Point(x=5, y=5)], model=p)),
    }
    for name, call in model_fields.items():
        messages = set()
        for path in world["paths"]:
            code, answer = _code(lambda: call(path))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, path, code, answer)
            messages.add(answer)
        # No file-system oracle: an existing folder, a file and nothing at all get the same words.
        assert len(messages) == 1, (name, messages)
    assert not b.jobs.ListJobs(common_pb2.ListJobsRequest()).jobs
    assert not b.train.ListConcepts(train_pb2.ListConceptsRequest()).concepts


def test_the_allow_list_serves_tiny_and_the_models_root(world):
    b = world["b"]
    for ref in ("tiny", "tiny-sd"):  # built in; a folder under the models root (the model cache), by name
        images = list(b.generate.Generate(generate_pb2.GenerateRequest(base_model=ref, prompts=["a dog"], steps=1,
                                                                       width=32, height=32)))
        assert len(images) == 1 and images[0].png and images[0].base_model == ref
