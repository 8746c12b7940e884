"""runtime.model_loading: process-wide state a load leaves patched is put back, and a process whose loads broke stops
reporting SERVING."""
from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from persona.services.runtime import model_loading
from persona.services.runtime.server import create_server


def test_a_load_that_leaves_modules_on_the_meta_device_is_undone():
    from accelerate import init_empty_weights

    with model_loading.loading_models():
        torch.nn.Linear(2, 2)  # the first load: what the state is before any load
    with model_loading.loading_models():
        # What two interleaved loads used to leave behind: the meta-device patch, installed for good.
        left_open = init_empty_weights()  # entered and never exited (kept referenced: collecting it would exit)
        left_open.__enter__()
        torch.set_default_dtype(torch.float16)
        assert torch.nn.Linear(2, 2).weight.device.type == "meta"
    probe = torch.nn.Linear(2, 2)
    assert (probe.weight.device.type, probe.weight.dtype) == ("cpu", torch.float32)
    assert model_loading.broken() == ""
    del left_open


def test_a_failed_load_that_breaks_module_building_turns_health_not_serving(monkeypatch):
    monkeypatch.setattr(model_loading, "_broken", "")
    server = create_server([], "127.0.0.1:0", interceptors=[], max_message_bytes=1 << 20)
    try:
        server.set_serving(True)
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING

            # Breakage the put-back state does not cover: every new Linear gets NaN weights.
            monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                                lambda self: torch.nn.init.constant_(self.weight, float("nan")))
            with pytest.raises(RuntimeError), model_loading.loading_models():
                raise RuntimeError("Cannot copy out of meta tensor; no data!")
            assert "cannot be loaded" in model_loading.broken()
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            server.set_serving(True)  # nothing turns it back on while loads are broken
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(0)
