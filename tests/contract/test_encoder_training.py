"""CustomContrast encoder training through the real server (issue 21): StartEncoderTraining on the tiny base model
and toy-world views queues an "encoder_train" job that reports typed progress and ends with the encoder stored under
the data dir; a dataset or base model it cannot train on is refused naming the field; a server that takes no paths
finds datasets by name under its datasets root only; a cancelled run keeps its checkpoint and resumes from it."""
from __future__ import annotations

import shutil

import grpc
import pytest

from persona.bench.toyworld_views import write_multiview_dataset
from persona.client.sdk import PersonaClient
from persona.services.models.customcontrast.files import META_FILE, WEIGHTS_FILE, read_encoder_meta
from persona.services.runtime.jobs import JobContext
from persona.services.train.checkpoint import CHECKPOINT_FILE
from persona.v1 import common_pb2, train_pb2, train_pb2_grpc


@pytest.fixture
def server(start_app):
    def start(**runtime):
        app = start_app(auth="none", **runtime)
        client = PersonaClient.connect(app.address)
        return app, client, train_pb2_grpc.TrainServiceStub(client.channel)
    return start


@pytest.fixture
def views(tmp_path):
    return write_multiview_dataset(tmp_path / "views", subjects=2, views=2, seed=0, size=64)


def test_an_encoder_trains_as_a_job_and_is_stored_under_the_data_dir(server, views):
    app, client, train = server()
    job = train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(
        dataset=str(views), base_model="tiny", steps=2, learning_rate=1e-3, checkpoint_every=1))
    assert job.kind == "encoder_train"
    events = []
    final = client.wait_for_job(job.job_id, on_event=events.append, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error

    progress = [e.details for e in events if e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS]
    assert [(p.stage, p.step, p.steps) for p in progress] == [("encoder_train", 1, 2), ("encoder_train", 2, 2)]
    assert set(progress[-1].losses) == {"loss", "diffusion", "cscl", "macl", "location"}

    result = final.encoder_train_result
    assert result.encoder_id.startswith("enc_") and result.steps == 2 and result.base_model == "tiny"
    folder = app.settings.data_dir / "encoders" / result.encoder_id
    assert result.path == str(folder)
    assert (folder / WEIGHTS_FILE).stat().st_size > 0 and (folder / META_FILE).is_file()
    assert read_encoder_meta(folder).base_model_sha256 == result.base_model_sha256
    assert (read_encoder_meta(folder).config.width, read_encoder_meta(folder).config.num_layers) == (16, 1)
    assert not (folder / "work").exists()  # the checkpoint goes once the encoder is saved
    client.close()


def test_bad_datasets_and_base_models_are_refused_naming_the_field(server, views, tmp_path):
    _, client, train = server()
    one_view = tmp_path / "one-view"
    shutil.copytree(views, one_view)
    subject = sorted(p for p in one_view.iterdir() if p.is_dir())[0]
    for view in sorted(subject.glob("*.png"))[1:]:
        view.unlink()
    with pytest.raises(grpc.RpcError) as refused:
        train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(dataset=str(one_view), base_model="tiny"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "`dataset`" in refused.value.details() and "has 1 view(s)" in refused.value.details()

    with pytest.raises(grpc.RpcError) as refused:
        train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(
            dataset=str(views), base_model=str(tmp_path / "no-such-model")))
    assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert "`base_model`" in refused.value.details()

    with pytest.raises(grpc.RpcError) as refused:
        train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(dataset=str(views), base_model="tiny",
                                                                         batch_size=3))
    assert "`batch_size` 3 must be between 2 and the dataset's 2 subjects" in refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(dataset=str(views), base_model="tiny",
                                                                         steps=2_000_000))
    assert refused.value.details().startswith("`steps` is 2000000: at most 1000000")
    assert not client.jobs.ListJobs(common_pb2.ListJobsRequest(kind="encoder_train")).jobs
    client.close()


def test_a_server_without_paths_takes_dataset_names_under_its_datasets_root(server, views, tmp_path):
    app, client, train = server(data_dir=tmp_path / "data", model_paths=False)
    with pytest.raises(grpc.RpcError) as refused:
        train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(dataset=str(views), base_model="tiny"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "`dataset` is not a dataset this server offers" in refused.value.details()
    assert str(views) not in refused.value.details()

    shutil.copytree(views, tmp_path / "data" / "datasets" / "toy")
    job = train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(dataset="toy", base_model="tiny", steps=1))
    assert job.params["dataset"] == "toy"  # the name, not the server's folder
    final = client.wait_for_job(job.job_id, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    client.close()


class _NeverCancelled(JobContext):
    def cancel_poll(self, every_s: float = 0.5):
        return lambda: False


def test_a_cancelled_run_keeps_its_checkpoint_and_the_job_resumes_from_it(server, views):
    app, client, train = server()
    job = train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(
        dataset=str(views), base_model="tiny", steps=12, learning_rate=1e-3, checkpoint_every=100))

    def cancel_after_the_first_step(event):
        if event.type == common_pb2.JOB_EVENT_TYPE_PROGRESS and event.details.step >= 1:
            client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))

    final = client.wait_for_job(job.job_id, on_event=cancel_after_the_first_step, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_CANCELLED, final.error
    work = app.settings.data_dir / "encoders" / job.params["encoder_id"] / "work"
    assert (work / CHECKPOINT_FILE).is_file()  # written when the run stopped, though checkpoint_every is 100

    # What a restarted server does with an interrupted job: run its handler again on the same params.
    result = app.encoders._run(_NeverCancelled(app.runner.store, app.runner.store.get(job.job_id)))
    assert 1 <= result["resumed_from_step"] < 12 and result["steps"] == 12
    assert (app.settings.data_dir / "encoders" / job.params["encoder_id"] / WEIGHTS_FILE).is_file()
    client.close()


def test_an_image_encoder_folder_of_another_input_size_trains_at_its_own_size(server, views, tmp_path):
    """A local CLIP image encoder (e.g. one trained on toy-world views) is fed pixels at its config's image_size, not
    at ViT-L/14's 224 (which fails on its position embeddings)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    folder = tmp_path / "clip48"
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=48,
        patch_size=8, projection_dim=32)).save_pretrained(folder)
    _, client, train = server()
    job = train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(
        dataset=str(views), base_model="tiny", image_encoder=str(folder), steps=1, learning_rate=1e-3))
    final = client.wait_for_job(job.job_id, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.encoder_train_result.steps == 1
    client.close()


def test_a_trained_tiny_shaped_base_gets_the_papers_depth_at_its_own_width(server, views, tmp_path):
    """Only the built-in random tiny model gets the one-layer, 16-wide test encoder; another tiny-shaped base (the toy
    world's) gets 4 Q-Former layers and 16 visual tokens, 128 wide."""
    from persona.services.models.builders import build_tiny_base_model

    base = build_tiny_base_model(tmp_path / "base")
    app, client, train = server()
    job = train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(
        dataset=str(views), base_model=str(base), steps=1, learning_rate=1e-3))
    final = client.wait_for_job(job.job_id, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    config = read_encoder_meta(app.settings.data_dir / "encoders" / final.encoder_train_result.encoder_id).config
    assert (config.width, config.num_layers, config.num_visual_tokens) == (128, 4, 16)
    client.close()
