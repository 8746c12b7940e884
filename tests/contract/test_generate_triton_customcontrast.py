"""A customcontrast concept drawn on the Triton engine with torch components, through a real gRPC server and the real
`tritonserver` (nvidia-pytriton's, python backend, CPU): made from a tiny encoder trained in the test, hot-loaded as
a `customcontrast_unet` component (base UNet, text encoder, tokenizer and the concept's files) beside the base
model's text encoder and VAE; the image equals the embedded engine's for the same seed and settings (with and
without guidance), differs from the base model's, and a prompt without the identifier is INVALID_ARGUMENT naming
`prompts`, as embedded; the component refuses ids without the placeholder slots by name."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from test_generate_triton import _pixels
from test_generate_triton_p3s import embedded_drawer
from test_train_customcontrast import triton_concept

from persona.services.generate.triton_customcontrast import CUSTOMCONTRAST_COMPONENT
from persona.services.generate.triton_repository import model_name
from persona.services.models.customcontrast.concept import TOKENS_FILE, VISUAL_KV_FILE
from persona.v1 import generate_pb2

# fp32 torch on CPU on both sides, the same modules and loop: equal up to a rounding step of 8-bit pixels (the
# Triton parity tests' bound, as test_generate_triton_p3s).
TOLERANCE = 2
SETTINGS = dict(negative_prompt="blurry", steps=3, height=32, width=32)


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert "Traceback" not in caught.value.details()
    return caught.value


def test_triton_draws_a_customcontrast_concept_as_the_embedded_engine_does(start_app, client_for, dog_photos,
                                                                           tmp_path):
    app, client, concept_id = triton_concept(start_app, client_for, dog_photos, tmp_path, "torch", photos=2)

    def triton(prompt: str = "a sks dog on the beach", **request) -> np.ndarray:
        [image] = client.generate.Generate(generate_pb2.GenerateRequest(
            prompts=[prompt], **(dict(concept_id=concept_id, seed=7) | SETTINGS | request)))
        assert (image.width, image.height, image.engine) == (32, 32, "triton")
        return _pixels(image.png)

    embedded = embedded_drawer(app, tmp_path / "embedded", concept_id, "a sks dog on the beach", seed=7, **SETTINGS)

    def differ(a, b) -> int:
        return int(np.abs(a - b).max())

    drawn = triton()
    assert differ(drawn, embedded()) <= TOLERANCE
    # Without guidance (no unconditional half), and another scheduler and seed.
    for settings, scheduler in ((dict(guidance_scale=1.0), "euler"), (dict(seed=11), "ddim")):
        rpc = generate_pb2.Scheduler.Value(f"SCHEDULER_{scheduler.upper()}")
        assert differ(triton(scheduler=rpc, **settings), embedded(scheduler=scheduler, **settings)) <= TOLERANCE
    assert (triton() == drawn).all()  # the same seed, the same image
    # The subject's tokens change what the base model draws (the base model through the same server).
    assert differ(drawn, triton(concept_id="", base_model="tiny")) > TOLERANCE

    # The repository: the base model's text encoder and VAE, and the concept's own UNet component.
    engine = app.generate.engine
    entry = engine.repository.entry(model_name(concept_id))
    unet = entry.components["unet"]
    assert unet.startswith(f"{CUSTOMCONTRAST_COMPONENT}_")
    assert all((engine.repository.root / unet / "1" / name).is_file() for name in (TOKENS_FILE, VISUAL_KV_FILE))

    # A prompt without the identifier: INVALID_ARGUMENT naming `prompts`, as the embedded engine says it.
    error = _refused(lambda: triton("a dog on the beach"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`prompts`" in error.details()
    assert "identifier 'sks' 0 times" in error.details()
    error = _refused(lambda: triton(p3s_injection_lambda=0.5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`p3s_injection_lambda` is set" in error.details()
    _unet_refuses_ids_without_slots(engine, unet)


def _unet_refuses_ids_without_slots(engine, unet: str) -> None:
    """Another client than persona's engine sending the component plain prompt ids: INVALID_ARG naming them."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, array in (("sample", np.zeros((1, 4, 4, 4), np.float32)), ("timestep", np.full((1,), 500, np.float32)),
                        ("input_ids", np.full((1, 77), 49407, np.int64)),
                        ("negative_ids", np.full((1, 77), 49407, np.int64)),
                        ("location_mask", np.ones((1, 4, 4), np.float32))):
        tensor = grpcclient.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with engine._client() as triton, pytest.raises(InferenceServerException) as caught:
        triton.infer(unet, inputs)
    assert "INVALID_ARG" in str(caught.value.status()) and "`input_ids` hold the placeholder" in caught.value.message()
