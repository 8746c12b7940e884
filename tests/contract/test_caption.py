"""CaptionService through a real gRPC server and a fake OpenAI-protocol VLM: jobs, instructions, checks, errors."""
import hashlib
import io
import threading

import grpc
import pytest
from fakevlm import DEFAULT_ANSWER, MODEL, Reply, image_bytes, texts
from PIL import Image

from persona.services.caption.instructions import INSTRUCTION_VERSION
from persona.services.runtime.job_store import JobStore
from persona.services.runtime.metadata import SQLiteMetadataStore
from persona.v1 import caption_pb2, common_pb2, subjects_pb2

SUCCEEDED, FAILED, CANCELLED = (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
                                common_pb2.JOB_STATE_CANCELLED)
COMPLIANT = "a photo of a sks dog lying on a green lawn next to a red rubber ball"
DESCRIBES_SUBJECT = "a photo of a brown fluffy dog lying on a rug"


def make_subject(client, photos, class_name="dog"):
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name=class_name, images=[subjects_pb2.ImageUpload(data=p, filename=f"{i:02}.jpg")
                                       for i, p in enumerate(photos)]))


def caption_run(client, subject_id, events=None, **fields):
    """Starts captioning and follows the job to its end; returns the final Job."""
    job = client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(subject_id=subject_id, **fields))
    assert job.kind == "caption" and job.subject_id == subject_id
    return client.wait_for_job(job.job_id, on_event=(events.append if events is not None else lambda e: None))


def captions_of(client, subject_id):
    return list(client.captions.ListCaptions(caption_pb2.ListCaptionsRequest(subject_id=subject_id)).captions)


def ref(subject_id, image_id):
    return common_pb2.ImageRef(subject_id=subject_id, image_id=image_id)


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value


@pytest.fixture
def vlm_client(start_app, client_for, fake_vlm):
    """Factory: vlm_client(**settings) → a client of a server whose VLM is `fake_vlm`."""
    def make(**overrides):
        return client_for("acme", start_app(caption_settings=fake_vlm.settings(**overrides)))
    return make


def test_case_1_works_without_a_vlm(client, dog_photos):
    subject = make_subject(client, dog_photos)
    events = []
    job = caption_run(client, subject.subject_id, events, case=caption_pb2.DESCRIPTION_CASE_1)
    assert job.state == SUCCEEDED and job.progress == 1.0
    assert job.caption_result.captioned == 4 and list(job.caption_result.failed) == []
    captions = captions_of(client, subject.subject_id)
    assert [c.image.image_id for c in captions] == [i.image_id for i in subject.images]
    assert {(c.text, c.source, c.model, c.instruction_version, c.case, c.attempts, c.failure) for c in captions} == {
        ("a photo of a sks dog", caption_pb2.CAPTION_SOURCE_TEMPLATE, "template", INSTRUCTION_VERSION,
         caption_pb2.DESCRIPTION_CASE_1, 0, "")}
    progress = [e for e in events if e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS]
    assert [e.details.image_id for e in progress] == [i.image_id for i in subject.images]
    assert progress[-1].details.done == progress[-1].details.total == 4 and progress[-1].details.stage == "caption"
    got = client.captions.GetCaption(caption_pb2.GetCaptionRequest(image=captions[2].image))
    assert got == captions[2]


def test_case_1_style_mode_uses_the_style_template(client, dog_photos):
    subject = make_subject(client, dog_photos[:1], class_name="painting")
    job = caption_run(client, subject.subject_id, case=caption_pb2.DESCRIPTION_CASE_1,
                      mode=caption_pb2.CAPTION_MODE_STYLE)
    assert job.state == SUCCEEDED
    [caption] = captions_of(client, subject.subject_id)
    assert caption.text == "A painting in the style of sks art" and caption.mode == caption_pb2.CAPTION_MODE_STYLE


def test_default_is_case_3_through_the_vlm(vlm_client, fake_vlm, dog_photos):
    client = vlm_client()
    subject = make_subject(client, dog_photos)
    job = caption_run(client, subject.subject_id)
    assert job.state == SUCCEEDED, job.error
    assert (job.params["case"], job.params["mode"], job.params["model"]) == (3, "object", MODEL)
    assert len(fake_vlm.requests) == 4
    stored = {i.sha256 for i in subject.images}
    for body in fake_vlm.requests:
        assert body["model"] == MODEL and [m["role"] for m in body["messages"]] == ["user"]
        [image] = image_bytes(body)  # within max_image_side: the stored photo itself
        assert hashlib.sha256(image).hexdigest() in stored
    assert {hashlib.sha256(image_bytes(b)[0]).hexdigest() for b in fake_vlm.requests} == stored
    captions = captions_of(client, subject.subject_id)
    assert len(captions) == 4
    for caption in captions:
        assert caption.text == COMPLIANT
        assert (caption.source, caption.model, caption.instruction_version) == (
            caption_pb2.CAPTION_SOURCE_VLM, MODEL, INSTRUCTION_VERSION)
        assert (caption.case, caption.mode, caption.attempts, caption.failure) == (
            caption_pb2.DESCRIPTION_CASE_3, caption_pb2.CAPTION_MODE_OBJECT, 1, "")


STYLE_ANSWER = "A painting in the style of art, showing a red barn under a blue sky"


@pytest.mark.parametrize("case, mode, class_name, answer, present, absent", [
    (2, caption_pb2.CAPTION_MODE_OBJECT, "dog", "a photo of a dog next to a ball on a lawn",
     ["a photo of a dog", "class names only", "Do not describe the dog itself"], ["in detail"]),
    (3, caption_pb2.CAPTION_MODE_OBJECT, "dog", DEFAULT_ANSWER,
     ["a photo of a dog", "describe every other object", "in detail", "Do not describe the dog itself",
      "Say what the dog is doing, its pose"], ["facial expression", "You may say"]),
    (4, caption_pb2.CAPTION_MODE_OBJECT, "dog", "a photo of a brown fluffy dog on a green lawn",
     ["a photo of a dog", "Describe the dog itself in the same detail"], ["Do not describe the dog"]),
    (3, caption_pb2.CAPTION_MODE_STYLE, "painting", STYLE_ANSWER,
     ["A painting in the style of art,", "Do not describe the style of the painting", "in detail"],
     ["a photo of"]),
    (3, caption_pb2.CAPTION_MODE_EXPRESSION, "dog", "a photo of a smiling dog on a green lawn",
     ["a photo of a dog", "facial expression", "Apart from its facial expression", "describe every other object"],
     []),
])
def test_instruction_sent_per_case_and_mode(vlm_client, fake_vlm, dog_photos, case, mode, class_name, answer,
                                            present, absent):
    fake_vlm.script(answer)
    client = vlm_client(max_image_side=256)
    subject = make_subject(client, dog_photos[:1], class_name=class_name)
    job = caption_run(client, subject.subject_id, case=case, mode=mode)
    assert job.state == SUCCEEDED, job.error
    [body] = fake_vlm.requests
    [instruction] = texts(body)
    for phrase in present:
        assert phrase in instruction
    for phrase in absent:
        assert phrase not in instruction
    [image] = image_bytes(body)
    assert max(Image.open(io.BytesIO(image)).size) == 256  # downscaled to max_image_side
    [caption] = captions_of(client, subject.subject_id)
    assert caption.case == case and caption.mode == mode and caption.attempts == 1
    assert "sks" in caption.text and class_name in caption.text


def test_case_1_sends_nothing_to_the_vlm(vlm_client, fake_vlm, dog_photos):
    client = vlm_client()
    subject = make_subject(client, dog_photos[:2])
    assert caption_run(client, subject.subject_id, case=caption_pb2.DESCRIPTION_CASE_1).state == SUCCEEDED
    assert fake_vlm.requests == []


def test_answer_describing_the_subject_is_corrected(vlm_client, fake_vlm, dog_photos):
    fake_vlm.script(DESCRIBES_SUBJECT, DEFAULT_ANSWER)
    client = vlm_client()
    subject = make_subject(client, dog_photos[:1])
    assert caption_run(client, subject.subject_id).state == SUCCEEDED
    first, second = fake_vlm.requests
    assert second["messages"][0] == first["messages"][0]  # same conversation: the instruction and image
    assert second["messages"][1] == {"role": "assistant", "content": DESCRIBES_SUBJECT}
    correction = texts(second)[2]
    assert second["messages"][2]["role"] == "user"
    assert "describes the dog itself: 'brown', 'fluffy'" in correction and "a photo of a dog" in correction
    [caption] = captions_of(client, subject.subject_id)
    assert (caption.text, caption.attempts, caption.failure) == (COMPLIANT, 2, "")


def test_persistently_non_compliant_image_is_reported_and_others_kept(vlm_client, fake_vlm, dog_photos):
    fake_vlm.script(DESCRIBES_SUBJECT, DESCRIBES_SUBJECT, DESCRIBES_SUBJECT, DEFAULT_ANSWER)
    client = vlm_client(concurrency=1)  # one image at a time: the first image gets the three bad answers
    subject = make_subject(client, dog_photos[:2])
    bad, good = (i.image_id for i in subject.images)
    events = []
    job = caption_run(client, subject.subject_id, events)
    assert job.state == FAILED and job.error.code == "FAILED_PRECONDITION"
    assert bad in job.error.message and "'brown'" in job.error.message and good not in job.error.message
    assert list(job.caption_result.failed) == [bad] and job.caption_result.captioned == 1
    assert len(fake_vlm.requests) == 4
    assert any(e.type == common_pb2.JOB_EVENT_TYPE_WARNING and bad in e.message for e in events)
    failed, kept = captions_of(client, subject.subject_id)
    assert (failed.image.image_id, failed.text, failed.attempts) == (bad, "", 3)
    assert "describes the dog itself" in failed.failure
    assert (kept.image.image_id, kept.text, kept.failure) == (good, COMPLIANT, "")


@pytest.mark.parametrize("reply, code, says", [
    (Reply(drop=True), "UNAVAILABLE", "{url}"),
    (Reply("invalid key", status=401), "FAILED_PRECONDITION", "PERSONA_VLM_API_KEY"),
    (Reply("no such model", status=404), "FAILED_PRECONDITION", "PERSONA_VLM_MODEL"),
    (Reply("slow down", status=429), "RESOURCE_EXHAUSTED", "rate-limiting"),
    (Reply("image input is not supported", status=400), "FAILED_PRECONDITION", "may not accept images"),
])
def test_endpoint_failures_during_the_job(vlm_client, fake_vlm, dog_photos, reply, code, says):
    fake_vlm.script(reply)
    client = vlm_client()
    subject = make_subject(client, dog_photos[:1])
    job = caption_run(client, subject.subject_id)
    assert job.state == FAILED and job.error.code == code
    assert says.format(url=fake_vlm.base_url) in job.error.message


def test_slow_endpoint_fails_the_job_unavailable(vlm_client, fake_vlm, dog_photos):
    release = threading.Event()
    fake_vlm.responder = lambda body: release.wait(30) and DEFAULT_ANSWER
    client = vlm_client(timeout_s=0.2)
    subject = make_subject(client, dog_photos[:1])
    job = caption_run(client, subject.subject_id)
    release.set()
    assert job.state == FAILED and job.error.code == "UNAVAILABLE"
    assert fake_vlm.base_url in job.error.message and "PERSONA_VLM_TIMEOUT_S" in job.error.message


def test_no_endpoint_configured_is_failed_precondition(client, dog_photos):
    subject = make_subject(client, dog_photos[:1])
    error = rpc_error(client.captions.StartCaptioning, caption_pb2.StartCaptioningRequest(
        subject_id=subject.subject_id, case=caption_pb2.DESCRIPTION_CASE_3))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "PERSONA_VLM_BASE_URL" in error.details()
    assert list(client.jobs.ListJobs(common_pb2.ListJobsRequest(kind="caption")).jobs) == []


def test_endpoint_down_is_unavailable_at_once(start_app, client_for, fake_vlm, dead_vlm_url, dog_photos):
    client = client_for("acme", start_app(caption_settings=fake_vlm.settings(vlm_base_url=dead_vlm_url)))
    subject = make_subject(client, dog_photos[:1])
    request = caption_pb2.StartCaptioningRequest(subject_id=subject.subject_id)
    error = rpc_error(client.captions.StartCaptioning, request)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and dead_vlm_url in error.details()


def test_bad_input_is_rejected_and_stored_captions_stay(client, client_for, dog_photos):
    subject = make_subject(client, dog_photos[:2])
    sid, image_id = subject.subject_id, subject.images[0].image_id
    assert caption_run(client, sid, case=caption_pb2.DESCRIPTION_CASE_1).state == SUCCEEDED
    before = captions_of(client, sid)
    other = client_for("globex")
    start = caption_pb2.StartCaptioningRequest
    bad = [
        (client.captions.StartCaptioning, start(subject_id=sid, case=5), "INVALID_ARGUMENT", "`case`"),
        (client.captions.StartCaptioning, start(subject_id=sid, mode=9), "INVALID_ARGUMENT", "`mode`"),
        (client.captions.StartCaptioning, start(subject_id=sid, case=1, image_ids=["img_nope"]), "NOT_FOUND",
         "`image_ids`"),
        (client.captions.StartCaptioning, start(subject_id="subj_nope"), "NOT_FOUND", "`subject_id`"),
        (client.captions.ListCaptions, caption_pb2.ListCaptionsRequest(subject_id="subj_nope"), "NOT_FOUND",
         "`subject_id`"),
        (client.captions.GetCaption, caption_pb2.GetCaptionRequest(image=ref(sid, "img_nope")), "NOT_FOUND",
         "`image_id`"),
        (client.captions.SetCaption, caption_pb2.SetCaptionRequest(image=ref(sid, image_id), text="a photo of a dog"),
         "INVALID_ARGUMENT", "`text`"),
        (client.captions.SetCaption, caption_pb2.SetCaptionRequest(image=ref(sid, image_id), text="  "),
         "INVALID_ARGUMENT", "`text`"),
        (client.captions.SetCaption, caption_pb2.SetCaptionRequest(image=ref(sid, image_id), text="sks " * 300),
         "INVALID_ARGUMENT", "`text`"),
        (other.captions.StartCaptioning, start(subject_id=sid, case=1), "NOT_FOUND", "`subject_id`"),
        (other.captions.ListCaptions, caption_pb2.ListCaptionsRequest(subject_id=sid), "NOT_FOUND", "`subject_id`"),
        (other.captions.GetCaption, caption_pb2.GetCaptionRequest(image=ref(sid, image_id)), "NOT_FOUND",
         "`subject_id`"),
        (other.captions.SetCaption, caption_pb2.SetCaptionRequest(image=ref(sid, image_id), text="a sks dog"),
         "NOT_FOUND", "`subject_id`"),
    ]
    for call, request, code, field in bad:
        error = rpc_error(call, request)
        assert (error.code().name, field) == (code, field) and field in error.details(), error.details()
        assert captions_of(client, sid) == before


def test_captions_of_a_deleted_subject_are_not_found(app, client, dog_photos):
    subject = make_subject(client, dog_photos[:2])
    sid, image = subject.subject_id, ref(subject.subject_id, subject.images[0].image_id)
    assert caption_run(client, sid, case=caption_pb2.DESCRIPTION_CASE_1).state == SUCCEEDED
    client.subjects.DeleteSubject(subjects_pb2.DeleteSubjectRequest(subject_id=sid))
    for call, request in [
        (client.captions.ListCaptions, caption_pb2.ListCaptionsRequest(subject_id=sid)),
        (client.captions.GetCaption, caption_pb2.GetCaptionRequest(image=image)),
        (client.captions.SetCaption, caption_pb2.SetCaptionRequest(image=image, text="a photo of a sks dog")),
        (client.captions.StartCaptioning, caption_pb2.StartCaptioningRequest(subject_id=sid, case=1)),
    ]:
        assert rpc_error(call, request).code() == grpc.StatusCode.NOT_FOUND
    assert app.db.query("SELECT * FROM captions WHERE subject_id = :s", {"s": sid}) == []


def test_user_caption_survives_recaption_unless_overwritten(client, dog_photos):
    subject = make_subject(client, dog_photos[:2])
    sid, first = subject.subject_id, subject.images[0].image_id
    text = "a photo of my sks dog asleep on a striped beach towel"
    written = client.captions.SetCaption(caption_pb2.SetCaptionRequest(image=ref(sid, first), text=f"  {text} "))
    assert (written.text, written.source, written.model, written.instruction_version) == (
        text, caption_pb2.CAPTION_SOURCE_USER, "user", "user")
    assert [c.source for c in captions_of(client, sid)] == [caption_pb2.CAPTION_SOURCE_USER]

    job = caption_run(client, sid, case=caption_pb2.DESCRIPTION_CASE_1)
    assert job.state == SUCCEEDED and list(job.caption_result.skipped) == [first] and job.caption_result.captioned == 1
    kept, templated = captions_of(client, sid)
    assert (kept.text, kept.source) == (text, caption_pb2.CAPTION_SOURCE_USER)
    assert templated.source == caption_pb2.CAPTION_SOURCE_TEMPLATE

    job = caption_run(client, sid, case=caption_pb2.DESCRIPTION_CASE_1, overwrite_user_captions=True,
                      image_ids=[first])
    assert job.state == SUCCEEDED and job.caption_result.captioned == 1
    replaced = client.captions.GetCaption(caption_pb2.GetCaptionRequest(image=ref(sid, first)))
    assert (replaced.text, replaced.source) == ("a photo of a sks dog", caption_pb2.CAPTION_SOURCE_TEMPLATE)


def blocking_responder(arrived: threading.Event, release: threading.Event):
    def respond(body):
        arrived.set()
        assert release.wait(30), "the test never released the fake VLM"
        return DEFAULT_ANSWER
    return respond


def test_cancel_stops_before_the_next_image(vlm_client, fake_vlm, dog_photos):
    arrived, release = threading.Event(), threading.Event()
    fake_vlm.responder = blocking_responder(arrived, release)
    client = vlm_client(concurrency=1)
    subject = make_subject(client, dog_photos[:3])
    job = client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(subject_id=subject.subject_id))
    assert arrived.wait(30)
    client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
    release.set()
    assert client.wait_for_job(job.job_id).state == CANCELLED
    assert len(fake_vlm.requests) == 1
    assert [c.image.image_id for c in captions_of(client, subject.subject_id)] == [subject.images[0].image_id]


def test_subject_deleted_mid_job_fails_it_not_found(vlm_client, fake_vlm, dog_photos):
    arrived, release = threading.Event(), threading.Event()
    fake_vlm.responder = blocking_responder(arrived, release)
    client = vlm_client()
    subject = make_subject(client, dog_photos[:1])
    job = client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(subject_id=subject.subject_id))
    assert arrived.wait(30)
    client.subjects.DeleteSubject(subjects_pb2.DeleteSubjectRequest(subject_id=subject.subject_id))
    release.set()
    job = client.wait_for_job(job.job_id)
    assert job.state == FAILED and job.error.code == "NOT_FOUND" and "deleted" in job.error.message


def test_resumed_job_skips_images_it_already_captioned(start_app, client_for, fake_vlm, dog_photos, tmp_path):
    data_dir = tmp_path / "resume"
    first = start_app(data_dir=data_dir, caption_settings=fake_vlm.settings())
    client = client_for("acme", first)
    subject = make_subject(client, dog_photos[:3])
    job = caption_run(client, subject.subject_id)
    assert job.state == SUCCEEDED and len(fake_vlm.requests) == 3
    first.stop(0)
    # As if the server had died with the job running and the last image not yet captioned.
    db = SQLiteMetadataStore(data_dir / "metadata.sqlite3")
    db.execute("UPDATE jobs SET state = 'RUNNING' WHERE job_id = :id", {"id": job.job_id})
    db.execute("DELETE FROM captions WHERE image_id = :id", {"id": subject.images[2].image_id})
    finished_at = JobStore(db).events_after(job.job_id, 0)[-1].sequence
    db.close()

    second = start_app(data_dir=data_dir, caption_settings=fake_vlm.settings())
    client = client_for("acme", second)
    for _ in client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id, after_sequence=finished_at)):
        pass  # the replay of the first run ends at its SUCCEEDED event: follow only the resumed run
    resumed = client.jobs.GetJob(common_pb2.GetJobRequest(job_id=job.job_id))
    assert resumed.state == SUCCEEDED and resumed.interrupted and resumed.attempts == 2
    assert resumed.caption_result.captioned == 3
    assert len(fake_vlm.requests) == 4  # only the missing image was asked for again
    assert {c.text for c in captions_of(client, subject.subject_id)} == {COMPLIANT}


@pytest.mark.parametrize("first, stored, attempts", [
    # Repaired in place: no second request.
    ("A dog named Max lying on a green lawn next to a red rubber ball", COMPLIANT, 1),
    ("a photo of a dog, a corgi, lying on a green lawn next to a red rubber ball", COMPLIANT, 1),
    # Not repairable: asked again in the same conversation, with the broken rule named.
    ("a photo of a dog lying on a green lawn; the puppy has brown fur", COMPLIANT, 2),
    ("a photo of a dog on a green lawn. It has brown fluffy fur.", COMPLIANT, 2),
    ("a photo of a dog", COMPLIANT, 2),
    ("On a green lawn lies a dog next to a red rubber ball", COMPLIANT, 2),
])
def test_sid_rules_are_repaired_or_asked_again(vlm_client, fake_vlm, dog_photos, first, stored, attempts):
    fake_vlm.script(first, DEFAULT_ANSWER)
    client = vlm_client()
    subject = make_subject(client, dog_photos[:1])
    assert caption_run(client, subject.subject_id).state == SUCCEEDED
    [caption] = captions_of(client, subject.subject_id)
    assert (caption.text, caption.attempts, caption.failure) == (stored, attempts, "")
    assert len(fake_vlm.requests) == attempts
    if attempts == 2:
        assert fake_vlm.requests[1]["messages"][1] == {"role": "assistant", "content": first}
        assert "does not follow the instructions" in texts(fake_vlm.requests[1])[2]


def test_material_words_break_case_2_through_the_service(vlm_client, fake_vlm, dog_photos):
    fake_vlm.script("a photo of a dog next to a leather purse on a sofa")  # every answer: attempts run out
    client = vlm_client(max_attempts=2)
    subject = make_subject(client, dog_photos[:1])
    job = caption_run(client, subject.subject_id, case=caption_pb2.DESCRIPTION_CASE_2)
    assert job.state == FAILED and "'leather'" in job.error.message and len(fake_vlm.requests) == 2
    [caption] = captions_of(client, subject.subject_id)
    assert (caption.text, caption.attempts) == ("", 2) and "'leather'" in caption.failure
