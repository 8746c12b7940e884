"""GenerateService on the Triton engine, through a real gRPC server and the real `tritonserver` (bundled in
nvidia-pytriton, python backend) under numpy 2: concepts load from their ONNX exports without a restart, images
equal diffusers' StableDiffusionPipeline on the concept's weights, a second concept hot-loads while the first
serves, and a Triton that dies is UNAVAILABLE at once and serves again when it is back."""
from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from persona.services.generate.settings import GenerateSettings
from persona.services.generate.triton_server import TritonServer, free_port
from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2



def _train(client, photos, method: str = "lora", steps: int = 3) -> str:
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in photos[:2]]))
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method=method, regularizers=["none"],
        options=train_pb2.TrainingOptions(steps=steps, learning_rate=1e-2, checkpoint_every=0)))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    return job.params["concept_id"]


def test_these_tests_run_under_numpy_2():
    """The Triton python backend's stub (and its python models, which import this environment's numpy) misreads
    numpy 2 arrays (services/generate/triton_models.py says how); `.[dev]` requires numpy ≥ 2 so that the tests
    below prove persona's path avoids that, on the numpy every current CUDA stack has."""
    assert int(np.__version__.split(".")[0]) >= 2, f"numpy {np.__version__}: reinstall with pip install -e '.[dev]'"


@pytest.fixture
def triton_app(start_app, tmp_path):
    """A persona server whose generate engine is a tritonserver it starts itself (the `persona-cli up` way)."""
    return start_app(generate_settings=GenerateSettings(engine="triton", triton_gpu=False, onnx_fp16=False))


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def _diffusers_image(client, concept_id: str, folder, prompt: str, scheduler: str, seed: int, steps: int):
    from diffusers import StableDiffusionPipeline

    from persona.services.generate.sampling import make_scheduler

    exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=concept_id, format=train_pb2.EXPORT_FORMAT_DIFFUSERS))
    for file in exported.files:
        client.read_concept_file(concept_id, file.artifact_id, folder / file.path)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, negative_prompt="blurry", num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_triton_draws_what_diffusers_draws_and_hot_loads_concepts(triton_app, client_for, dog_photos, tmp_path):
    client = client_for("acme", triton_app)
    lora = _train(client, dog_photos, "lora")
    ti = _train(client, dog_photos, "ti")

    # Parity with diffusers' pipeline on the concept's own weights, for DDIM and DPM-Solver++ (fp32 ONNX on CPU:
    # the graphs match torch to ~1e-6, so images agree to a rounding step of 8-bit pixels).
    for scheduler, enum in (("ddim", generate_pb2.SCHEDULER_DDIM), ("dpmpp", generate_pb2.SCHEDULER_DPMPP)):
        [image] = client.generate.Generate(generate_pb2.GenerateRequest(
            concept_id=lora, prompts=["a sks dog on the beach"], negative_prompt="blurry", seed=11, steps=4,
            scheduler=enum))
        assert image.engine == "triton" and (image.width, image.height) == (64, 64) and image.seed == 11
        expected = _diffusers_image(client, lora, tmp_path / f"lora-{scheduler}", "a sks dog on the beach",
                                    scheduler, 11, 4)
        assert np.abs(_pixels(image.png) - np.asarray(expected, dtype=np.int16)).max() <= 2, scheduler

    # A second concept (TI: its own text encoder and tokenizer) hot-loads while the first keeps serving.
    results: dict[str, list] = {}

    def keep_drawing():
        results["lora"] = list(client.generate.Generate(generate_pb2.GenerateRequest(
            concept_id=lora, prompts=["a sks dog in the snow"], seed=3, steps=4, images_per_prompt=3)))

    drawer = threading.Thread(target=keep_drawing)
    drawer.start()
    loaded = client.generate.LoadConcept(generate_pb2.LoadConceptRequest(concept_id=ti))
    drawer.join(timeout=300)
    assert [i.seed for i in results["lora"]] == [3, 4, 5]
    assert loaded.concept_id == ti and loaded.engine == "triton" and loaded.load_seconds > 0
    listed = {c.concept_id for c in client.generate.ListLoadedConcepts(
        generate_pb2.ListLoadedConceptsRequest()).concepts}
    assert listed == {lora, ti}

    [ti_image] = client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=ti, prompts=["a sks dog on the beach"], negative_prompt="blurry", seed=11, steps=4,
        scheduler=generate_pb2.SCHEDULER_DDIM))
    expected = _diffusers_image(client, ti, tmp_path / "ti", "a sks dog on the beach", "ddim", 11, 4)
    assert np.abs(_pixels(ti_image.png) - np.asarray(expected, dtype=np.int16)).max() <= 2

    # The two concepts share the base's VAE graph in the repository: one vae_decoder model, two UNets.
    models = sorted(p.name for p in (triton_app.settings.data_dir / "triton" / "models").iterdir())
    assert len([m for m in models if m.startswith("vae_decoder_")]) == 1
    assert len([m for m in models if m.startswith("unet_")]) == 2

    # Unloading one leaves the other serving.
    client.generate.UnloadConcept(generate_pb2.UnloadConceptRequest(concept_id=lora))
    assert [c.concept_id for c in client.generate.ListLoadedConcepts(
        generate_pb2.ListLoadedConceptsRequest()).concepts] == [ti]
    [again] = client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=ti, prompts=["a sks dog on the beach"], negative_prompt="blurry", seed=11, steps=4,
        scheduler=generate_pb2.SCHEDULER_DDIM))
    assert (_pixels(again.png) == _pixels(ti_image.png)).all()


def test_a_dead_triton_is_unavailable_at_once_and_serves_again_when_back(start_app, tmp_path):
    """An external Triton (a URL, as on Kubernetes): killed → UNAVAILABLE within the deadline; back (a fresh
    process, nothing loaded) → the next call loads what it needs and draws."""
    repository = tmp_path / "repository"
    repository.mkdir()
    port = free_port()

    def triton() -> TritonServer:
        return TritonServer(repository, grpc_port=port, http_port=None, metrics_port=None,
                            log_file=tmp_path / "triton.log").start(timeout_s=120)

    server = triton()
    try:
        app = start_app(auth="none", generate_settings=GenerateSettings(
            engine="triton", triton_url=f"127.0.0.1:{port}", triton_repository=repository, triton_gpu=False,
            onnx_fp16=False, triton_rpc_timeout_s=5))
        from persona.client.sdk import PersonaClient

        client = PersonaClient.connect(app.address, None)
        request = generate_pb2.GenerateRequest(base_model="tiny", prompts=["a dog"], seed=1, steps=2)
        [first] = client.generate.Generate(request)

        server.process.kill()  # SIGKILL: no goodbye
        server.stop()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(client.generate.Generate(request, timeout=60))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Triton" in caught.value.details()
        assert time.monotonic() - started < 15

        server = triton()  # back, with nothing loaded
        [second] = client.generate.Generate(request)
        assert (_pixels(second.png) == _pixels(first.png)).all()
        client.close()
    finally:
        server.stop()


def test_a_managed_triton_that_died_is_started_again_by_the_next_call(triton_app):
    from persona.client.sdk import PersonaClient

    _, key = triton_app.authenticator.create_key("acme")
    client = PersonaClient.connect(triton_app.address, key)
    request = generate_pb2.GenerateRequest(base_model="tiny", prompts=["a dog"], seed=2, steps=2)
    [first] = client.generate.Generate(request)
    endpoint = triton_app.generate.engine.endpoint
    endpoint.server.process.kill()
    endpoint.server.process.wait(timeout=10)
    [second] = client.generate.Generate(request)
    assert endpoint.restarts == 1 and endpoint.server.is_running()
    assert (_pixels(second.png) == _pixels(first.png)).all()
    client.close()
