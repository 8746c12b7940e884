"""A p3s concept drawn on the Triton engine with torch components, through a real gRPC server and the real
`tritonserver` (nvidia-pytriton's, python backend, CPU): trained for a few steps on the tiny model (photos clicked
with the real mask service), its UNet served as a conditioned torch component beside the base model's text encoder
and VAE; the image equals the embedded engine's for the same seed and settings, the weight schedule, λ and the
reference photo set per request change it, and bad p3s settings are INVALID_ARGUMENT naming the field — at the
Generate RPC, at `sd_pipeline` and at the UNet component. One server start for the module."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from test_generate_triton import _pixels
from test_train_p3s import _click, _start

from persona.services.generate.domain import EmbeddedEngine, GenerateDomain, GenerateRequest
from persona.services.generate.sampling import SamplingSettings
from persona.services.generate.settings import GenerateSettings
from persona.services.generate.triton_p3s import P3S_COMPONENT
from persona.services.generate.triton_repository import model_name
from persona.services.runtime.errors import InvalidArgument
from persona.v1 import common_pb2, generate_pb2, subjects_pb2

TENANT = "acme"
# fp32 torch on CPU on both sides, the same modules and loop: equal up to a rounding step of 8-bit pixels (the
# Triton parity tests' bound).
TOLERANCE = 2


@pytest.fixture
def triton_app(start_app):
    return start_app(generate_settings=GenerateSettings(engine="triton", triton_gpu=False,
                                                        triton_component_backend="torch"))


def embedded_drawer(app, cache, concept_id: str, prompt: str, **fixed):
    """draw(**settings) → the pixels the embedded engine draws for `concept_id` on `app`'s model library (the same
    concept the Triton server draws), with `fixed` settings unless `settings` override them."""
    settings = GenerateSettings(device="cpu")
    domain = GenerateDomain(app.models, EmbeddedEngine(settings), settings, cache)

    def draw(**settings) -> np.ndarray:
        [image] = list(domain.generate(TENANT, GenerateRequest(prompts=(prompt,), concept_id=concept_id,
                                                               **(fixed | settings))))
        assert image.engine == "embedded"
        return _pixels(image.png)

    return draw


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert "Traceback" not in caught.value.details()
    return caught.value


def test_triton_draws_a_p3s_concept_as_the_embedded_engine_does(triton_app, client_for, dog_photos, tmp_path):
    client = client_for(TENANT, triton_app)
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))
    for image in subject.images:
        _click(client, subject, image)
    # lr 1e-3: the zero convs leave zero within a few steps, so the copy's features change the drawing.
    job = _start(client, subject.subject_id, steps=20, learning_rate=1e-3, p3s_consistency_weight=0.0)
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concept_id = final.params["concept_id"]

    def triton(**settings) -> np.ndarray:
        [image] = client.generate.Generate(generate_pb2.GenerateRequest(
            concept_id=concept_id, prompts=["a dog"], negative_prompt="blurry", seed=7, steps=3, **settings))
        assert (image.width, image.height, image.engine) == (32, 32, "triton")
        return _pixels(image.png)

    embedded = embedded_drawer(triton_app, tmp_path / "embedded", concept_id, "a dog", negative_prompt="blurry",
                               seed=7, steps=3)

    def differ(a, b) -> int:
        return int(np.abs(a - b).max())

    drawn = triton()
    assert differ(drawn, embedded()) <= TOLERANCE
    # The schedule, λ and photo each request sets: the embedded engine's image each time, and another image.
    for settings in (dict(p3s_weight_schedule="constant"), dict(p3s_weight_alpha=-3.0, p3s_weight_k=1.5),
                     dict(p3s_injection_lambda=5.0), dict(p3s_reference=1)):
        other = triton(**settings)
        assert differ(other, embedded(**settings)) <= TOLERANCE, settings
        assert differ(other, drawn) > 4 * TOLERANCE, settings
    # Unset is the concept's trained schedule (the paper's decreasing, α 0.5, β 0.2, k 2; λ 0.2), to the bit; and
    # with ε_t = 1 − 0·(t/T)^k − 1 = 0 the copy's features vanish, so which photo conditions the image no longer
    # matters.
    assert (triton(p3s_weight_schedule="decreasing", p3s_weight_alpha=0.5, p3s_injection_lambda=0.2) == drawn).all()
    off = dict(p3s_weight_alpha=0.0, p3s_weight_beta=-1.0)
    assert (triton(p3s_reference=0, **off) == triton(p3s_reference=1, **off)).all()

    # The repository: the base model's text encoder and VAE, and a p3s UNet with the condition beside its weights.
    engine = triton_app.generate.engine
    entry = engine.repository.entry(model_name(concept_id))
    assert entry.p3s_photos == 2 and entry.components["unet"].startswith(f"{P3S_COMPONENT}_")
    assert (engine.repository.root / entry.components["unet"] / "1" / "p3s_condition.safetensors").is_file()

    # Bad settings at the RPC: INVALID_ARGUMENT naming the field, nothing drawn.
    for settings, named in ((dict(p3s_reference=2), "`p3s_reference` is 2"),
                            (dict(p3s_weight_k=0.0), "`p3s_weight_k`"),
                            (dict(p3s_injection_lambda=11.0), "`p3s_injection_lambda`")):
        error = _refused(lambda: triton(**settings))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and named in error.details(), error.details()

    # Bad parameters sent to Triton itself (another client than persona's engine): sd_pipeline refuses them by name
    # before drawing, and so does the UNet component.
    _, _, tokenizer = engine._loaded[concept_id]
    batch = [SamplingSettings("a dog", seed=7, steps=2, scheduler="ddim", height=32, width=32)]
    good = {"p3s_weight_schedule": "decreasing", "p3s_weight_alpha": 0.5, "p3s_weight_beta": 0.2,
            "p3s_weight_k": 2.0, "p3s_injection_lambda": 0.2, "p3s_reference": 0}
    for extra, named in (({**good, "p3s_reference": 5}, "`p3s_reference` is 5"),
                         ({**good, "p3s_weight_schedule": "sideways"}, "`p3s_weight_schedule` is 'sideways'"),
                         ({**good, "p3s_weight_alpha": "much"}, "`p3s_weight_alpha` is 'much'"),
                         ({k: v for k, v in good.items() if k != "p3s_weight_k"}, "`p3s_weight_k` is missing")):
        with pytest.raises(InvalidArgument, match=named):
            engine._infer(entry, tokenizer, batch, extra)
    assert engine._infer(entry, tokenizer, batch, good).shape == (1, 32, 32, 3)
    _unet_refuses_bad_parameters(engine, entry.components["unet"], good)


def _unet_refuses_bad_parameters(engine, unet: str, good: dict) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, array in (("sample", np.zeros((1, 4, 4, 4), np.float32)), ("timestep", np.full((1,), 500, np.float32)),
                        ("encoder_hidden_states", np.zeros((1, 77, 32), np.float32))):
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with engine._client() as triton:
        # As sd_pipeline forwards them: floats as text (BLS parameters are bool, int or str).
        text = {k: repr(v) if isinstance(v, float) else v for k, v in good.items()}
        assert triton.infer(unet, inputs, parameters=text).as_numpy("out_sample") is not None
        with pytest.raises(InferenceServerException) as caught:
            triton.infer(unet, inputs, parameters={**text, "p3s_injection_lambda": "-1.0"})
    assert "INVALID_ARG" in str(caught.value.status()) and "`p3s_injection_lambda` is -1" in caught.value.message()
