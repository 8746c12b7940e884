"""Regularisers through the real server on the tiny model: masked loss on the mask service's masks, SPL and CoRe
on a method that trains the token, each term reported in the job's events and bounded, the concept exporting
and drawing; SID's caption-case ablation; and every combination that cannot work refused before a job starts."""
from __future__ import annotations

import math

import grpc
import pytest

from persona.v1 import common_pb2, generate_pb2, mask_pb2, subjects_pb2, train_pb2


@pytest.fixture
def subject(client, dog_photos) -> subjects_pb2.Subject:
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))


def _start(client, subject_id: str, method: str, regularizers: list[str], steps: int = 30, **options):
    return client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method=method, regularizers=regularizers, captions="class",
        options=train_pb2.TrainingOptions(steps=steps, resolution=32, checkpoint_every=0, **options)))


def _finished(client, job) -> tuple[common_pb2.Job, list[dict]]:
    """The finished job and the loss terms of each training step (JobProgress.losses)."""
    events = []
    final = client.wait_for_job(job.job_id, on_event=events.append, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    steps = [dict(e.details.losses) for e in events if e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS
             and e.details.stage == "train"]
    return final, steps


def _draws(client, concept_id: str) -> None:
    [image] = client.generate.Generate(generate_pb2.GenerateRequest(concept_id=concept_id, prompts=["a sks dog"],
                                                                    steps=2))
    assert image.png.startswith(b"\x89PNG")


def test_masked_loss_trains_on_the_mask_services_masks(client, subject):
    client.masks.MaskFromText(mask_pb2.MaskFromTextRequest(subject_id=subject.subject_id))
    final, steps = _finished(client, _start(client, subject.subject_id, "lora", ["mask"],  # prior stays on
                                            learning_rate=1e-2, num_class_images=2, class_image_steps=2,
                                            unmasked_weight=0.2))
    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=final.params["concept_id"]))
    assert list(concept.regularizers) == ["prior", "mask"] and concept.options.unmasked_weight == 0.2
    assert all(math.isfinite(s["loss"]) and "prior" in s for s in steps)
    _draws(client, concept.concept_id)


def test_spl_and_core_report_their_terms_and_stay_bounded(client, subject):
    final, steps = _finished(client, _start(client, subject.subject_id, "ti", ["spl", "core"], learning_rate=5e-3,
                                            core_variant="pairwise", core_rescale_start=10, core_rescale_end=20))
    assert steps and all({"spl", "core_emb", "core_attn"} <= set(s) for s in steps)
    # The token starts as the class word's embedding: both phrases and contexts start close and stay close.
    assert all(0 <= s["spl"] < 0.5 and 0 <= s["core_emb"] < 0.5 for s in steps)
    exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=final.params["concept_id"], format=train_pb2.EXPORT_FORMAT_TI))
    assert exported.files
    _draws(client, final.params["concept_id"])


def test_a_caption_case_trains_only_on_captions_of_that_case(client, subject):
    refused = _error(lambda: client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", captions="case3",
        options=train_pb2.TrainingOptions(steps=2))))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and "--case 3" in refused.details()
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", captions="case1", regularizers=["none"],
        options=train_pb2.TrainingOptions(steps=2, resolution=32, checkpoint_every=0)))
    final, _ = _finished(client, job)
    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=final.params["concept_id"]))
    assert concept.captions == "class" and {c.text for c in concept.training_captions} == {"a photo of a sks dog"}


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("method, regularizers, options, code, words", [
    ("lora", ["spl"], {}, "INVALID_ARGUMENT", ["`regularizers`", "spl", "`method`", "`train_text_encoder`"]),
    ("dreambooth", ["core"], {}, "INVALID_ARGUMENT", ["core", "`train_text_encoder`"]),
    ("ti", ["prior"], {}, "INVALID_ARGUMENT", ["`regularizers`", "prior", "`method`"]),
    ("lora", ["mask"], {}, "FAILED_PRECONDITION", ["mask", "persona-cli mask"]),
    ("lora", ["none", "prior"], {}, "INVALID_ARGUMENT", ["`regularizers`", "none", "prior"]),
    ("lora", ["sharpen"], {}, "INVALID_ARGUMENT", ["`regularizers`", "sharpen"]),
    ("ti", ["spl"], {"spl_weight": -1}, "INVALID_ARGUMENT", ["`spl_weight`"]),
    ("lora", ["prior"], {"unmasked_weight": 2}, "INVALID_ARGUMENT", ["`unmasked_weight`"]),
    ("ti", ["core"], {"core_variant": "l2"}, "INVALID_ARGUMENT", ["`core_variant`"]),
    ("ti", ["core"], {"core_rescale_start": 50, "core_rescale_end": 10}, "INVALID_ARGUMENT", ["`core_rescale_end`"]),
])
def test_combinations_that_cannot_work_are_refused_before_a_job(app, client, subject, method, regularizers, options,
                                                                 code, words):
    error = _error(lambda: _start(client, subject.subject_id, method, regularizers, steps=2, **options))
    assert error.code().name == code, error.details()
    for word in words:
        assert word in error.details(), error.details()
    assert not app.db.query("SELECT * FROM jobs WHERE kind = 'train'")
    assert not app.db.query("SELECT * FROM concepts")


# CoRe's two stages: a ti concept learns the token with CoRe, then a child trains the UNet with that embedding frozen.

def _child(client, subject_id: str, parent_id: str, method: str = "lora", regularizers=("none",), steps: int = 4,
           **options):
    return client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method=method, regularizers=list(regularizers), captions="class",
        parent_concept_id=parent_id,
        options=train_pb2.TrainingOptions(steps=steps, resolution=32, checkpoint_every=0, **options)))


def _ti_parent(client, subject_id: str) -> str:
    final, _ = _finished(client, _start(client, subject_id, "ti", ["core"], steps=4, learning_rate=5e-3))
    return final.params["concept_id"]


def _exported(client, concept_id: str, fmt, folder):
    exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(concept_id=concept_id, format=fmt))
    for file in exported.files:
        client.read_concept_file(concept_id, file.artifact_id, folder / file.path)
    return folder


def test_a_lora_child_continues_from_a_ti_concept_with_its_embedding_frozen(client, subject, tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    parent_id = _ti_parent(client, subject.subject_id)
    final, steps = _finished(client, _child(client, subject.subject_id, parent_id))
    child = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=final.params["concept_id"]))
    assert child.state == train_pb2.CONCEPT_STATE_READY and child.method == "lora"
    assert child.parent_concept_id == parent_id and len(steps) >= 1
    assert {f.path for f in child.files} >= {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors"}

    [(token, learned)] = load_file(_exported(client, parent_id, train_pb2.EXPORT_FORMAT_TI, tmp_path / "ti")
                                   / "learned_embeds.safetensors").items()
    assert token == subject.token
    folder = _exported(client, child.concept_id, train_pb2.EXPORT_FORMAT_DIFFUSERS, tmp_path / "child")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert token in tokenizer.get_vocab()
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert tokenizer(f"a {token} dog").input_ids.count(token_id) == 1
    row = CLIPTextModel.from_pretrained(folder / "text_encoder").get_input_embeddings().weight[token_id]
    assert (row.detach().float() - learned.reshape(-1).float()).abs().max() < 1e-6
    _draws(client, child.concept_id)


def test_continuing_from_a_parent_is_refused_when_it_cannot_work(app, client, client_for, subject, dog_photos):
    parent_id = _ti_parent(client, subject.subject_id)
    other = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[2:4]]))
    other_parent = _ti_parent(client, other.subject_id)
    final, _ = _finished(client, _start(client, subject.subject_id, "lora", ["none"], steps=2))
    lora_id = final.params["concept_id"]
    concepts = len(app.db.query("SELECT * FROM concepts"))
    cases = [
        (dict(parent_id=other_parent), "INVALID_ARGUMENT", ["`parent_concept_id`", "`subject_id`"]),
        (dict(parent_id=lora_id), "INVALID_ARGUMENT", ["`parent_concept_id`", "lora", "only ti"]),
        (dict(parent_id=parent_id, method="ti"), "INVALID_ARGUMENT", ["`method`", "`parent_concept_id`"]),
        (dict(parent_id=parent_id, train_text_encoder=True), "INVALID_ARGUMENT",
         ["`train_text_encoder`", "`parent_concept_id`"]),
        (dict(parent_id=parent_id, regularizers=["spl"]), "INVALID_ARGUMENT",
         ["`regularizers`", "spl", "`parent_concept_id`"]),
        (dict(parent_id="cpt_missing"), "NOT_FOUND", ["`parent_concept_id`"]),
    ]
    for given, code, words in cases:
        error = _error(lambda: _child(client, subject.subject_id, given.pop("parent_id"), **given))
        assert error.code().name == code, error.details()
        for word in words:
            assert word in error.details(), error.details()
    # Another tenant cannot continue from this tenant's concept.
    stranger = client_for("globex")
    theirs = stranger.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))
    assert _error(lambda: _child(stranger, theirs.subject_id, parent_id)).code() == grpc.StatusCode.NOT_FOUND
    assert len(app.db.query("SELECT * FROM concepts")) == concepts
