"""Contract: persona's tritonserver runner against the real binary (the one bundled in nvidia-pytriton,
or PERSONA_TRITONSERVER / PATH), no mocks: start, explicit load, infer over gRPC, new version, unload,
a model that fails in initialize, stop. Every wait has a timeout, and a per-test alarm turns anything
that still hangs into a failure."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from persona.services.generate import triton_client
from persona.services.generate import triton_install
from persona.services.generate import triton_server as ts
from persona.services.generate.triton_config import TensorSpec, model_config
from persona.services.runtime.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

TEST_LIMIT_S = 60

# Through persona's DLPack helpers, as every persona model reads and writes tensors (the stub's numpy bridge reads
# wrong values under numpy 2: triton_models says why).
TOY_MODEL = '''\
import triton_python_backend_utils as pb_utils

from persona.services.generate.triton_models import from_triton, to_triton


class TritonPythonModel:
    def initialize(self, args):
        self.op = {op!r}

    def execute(self, requests):
        responses = []
        for request in requests:
            a = from_triton(pb_utils.get_input_tensor_by_name(request, "A"))
            b = from_triton(pb_utils.get_input_tensor_by_name(request, "B"))
            out = a + b if self.op == "add" else a * b
            responses.append(pb_utils.InferenceResponse([to_triton(pb_utils, "OUT", out.float())]))
        return responses
'''

HANGING_MODEL = '''\
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(3600)

    def execute(self, requests):
        return []
'''

FAILING_MODEL = '''\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("toy initialize failed on purpose")

    def execute(self, requests):
        return []
'''

TOY_IO = dict(inputs=[("A", "FP32", [-1]), ("B", np.float32, [-1])], outputs=[TensorSpec("OUT", "TYPE_FP32")])


@pytest.fixture(autouse=True)
def _alarm():
    """A hung call fails the test instead of hanging CI (the helpers have their own timeouts too)."""

    def fire(signum, frame):
        raise TimeoutError(f"test exceeded {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def install() -> triton_install.TritonInstall:
    try:
        return triton_install.find_tritonserver()
    except FailedPrecondition as e:
        pytest.fail(f"no tritonserver: {e.message} (nvidia-pytriton is a dependency: reinstall with "
                    "pip install -e '.[dev]')")


def write_model(repo: Path, name: str, version: int, source: str, **config) -> Path:
    folder = repo / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(model_config(name, **config))
    (folder / str(version) / "model.py").write_text(source)
    return folder


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "model_repository"
    write_model(repo, "toy", 1, TOY_MODEL.format(op="add"), max_batch_size=8, dynamic_batching=True, **TOY_IO)
    write_model(repo, "broken", 1, FAILING_MODEL, **TOY_IO)
    write_model(repo, "stuck", 1, HANGING_MODEL, **TOY_IO)
    return repo


@pytest.fixture
def server(install, repo, tmp_path):
    server = ts.TritonServer(repo, log_file=tmp_path / "tritonserver.log", install=install)
    server.start(timeout_s=30)
    yield server
    server.stop(grace_s=5)


def infer(client, a, b, version: str = "") -> np.ndarray:
    inputs = []
    for name, value in (("A", a), ("B", b)):
        tensor = grpcclient.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = client.infer("toy", inputs, model_version=version, client_timeout=10)
    return result.as_numpy("OUT")


def test_find_tritonserver_names_the_missing_path_and_how_to_install(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "tritonserver"
    monkeypatch.setenv(triton_install.ENV_TRITONSERVER, str(missing))
    with pytest.raises(FailedPrecondition) as err:
        triton_install.find_tritonserver()
    assert triton_install.ENV_TRITONSERVER in err.value.message
    assert str(missing) in err.value.message
    assert "nvidia-pytriton" in err.value.message and "/opt/tritonserver" in err.value.message
    assert err.value.code == "FAILED_PRECONDITION"


def test_no_tritonserver_anywhere_names_the_install_command(tmp_path, monkeypatch):
    """nvidia-pytriton is not a dependency of persona (its metadata pins numpy < 2): without it, and with no server
    on PATH or in /opt, the error gives the one command that installs the bundled server, and the production way."""
    monkeypatch.delenv(triton_install.ENV_TRITONSERVER, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(triton_install, "DEFAULT_INSTALL_ROOT", tmp_path / "opt-tritonserver")
    monkeypatch.setattr(triton_install, "_pytriton_root", lambda: None)  # as if the wheel were not installed
    with pytest.raises(FailedPrecondition) as err:
        triton_install.find_tritonserver()
    assert "pip install --no-deps nvidia-pytriton==0.7.0" in err.value.message
    assert "PERSONA_TRITON_URL" in err.value.message and "nvcr.io/nvidia/tritonserver" in err.value.message


def test_python_stub_preparation_is_idempotent_under_a_race(install, tmp_path):
    if install.source != "pytriton":
        pytest.skip("only the nvidia-pytriton bundle needs its stub copied")
    stubs = install.binary.parent.parent / "python_backend_stubs"
    backends = tmp_path / "backends"
    (backends / "python").mkdir(parents=True)
    results, errors = [], []

    def prepare():
        try:
            results.append(triton_install.prepare_python_stub(backends, stubs))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(results) == 6
    stub = backends / "python" / "triton_python_backend_stub"
    assert os.access(stub, os.X_OK)
    assert sorted(p.name for p in (backends / "python").iterdir()) == ["triton_python_backend_stub"]  # no temp left
    with pytest.raises(FailedPrecondition, match="no stub for Python 2.7"):
        triton_install.prepare_python_stub(backends, stubs, version="2.7")


def test_python_model_config_rejects_what_triton_would():
    with pytest.raises(InvalidArgument, match="dynamic_batching"):
        model_config("m", **TOY_IO, dynamic_batching=True)
    with pytest.raises(InvalidArgument, match=r"input\[0\].dtype"):
        model_config("m", inputs=[("A", "FLOAT")], outputs=[("OUT", "FP32")])
    with pytest.raises(InvalidArgument, match="used twice"):
        model_config("m", inputs=[("A", "FP32"), ("A", "FP32")], outputs=[("OUT", "FP32")])
    with pytest.raises(InvalidArgument, match="instance_kind"):
        model_config("m", **TOY_IO, instance_kind="KIND_TPU")
    text = model_config("m", inputs=[("PROMPT", "BYTES", [1])], outputs=[("IMAGE", "UINT8", [-1, -1, 3])],
                                  instance_kind="gpu", parameters={"EXECUTION_ENV_PATH": "$$TRITON_MODEL_DIRECTORY/env"})
    assert 'backend: "python"' in text and "TYPE_STRING" in text and "dims: [ -1, -1, 3 ]" in text
    assert "kind: KIND_GPU" in text and 'key: "EXECUTION_ENV_PATH"' in text


def test_start_load_infer_new_version_unload_stop(server, repo):
    assert server.startup_s is not None and server.grpc_url.startswith("127.0.0.1:")
    client = server.client()
    try:
        assert client.is_server_live(client_timeout=5) and client.is_server_ready(client_timeout=5)
        assert not client.is_model_ready("toy", client_timeout=5)  # explicit mode: nothing loaded at start

        load_s = triton_client.load_model(client, "toy", timeout_s=30)
        assert client.is_model_ready("toy", client_timeout=5)
        a = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
        b = np.array([[10.0, 20.0, 30.0]], dtype=np.float32)
        np.testing.assert_allclose(infer(client, a, b), a + b)

        # A new version with other behaviour: loading again serves it (version policy: latest 1).
        write_model(repo, "toy", 2, TOY_MODEL.format(op="mul"), max_batch_size=8, dynamic_batching=True, **TOY_IO)
        reload_s = triton_client.load_model(client, "toy", timeout_s=30)
        np.testing.assert_allclose(infer(client, a, b), a * b)
        np.testing.assert_allclose(infer(client, a, b, version="2"), a * b)

        unload_s = triton_client.unload_model(client, "toy", timeout_s=30)
        assert not client.is_model_ready("toy", client_timeout=5)
        with pytest.raises(InferenceServerException) as err:
            infer(client, a, b)
        assert "NOT_FOUND" in str(err.value.status()) and "toy" in err.value.message()
        print(f"\nstartup {server.startup_s:.2f} s, load {load_s:.2f} s, reload v2 {reload_s:.2f} s, "
              f"unload {unload_s:.2f} s")
    finally:
        client.close()

    pid = server.pid
    assert server.stop(grace_s=5) is not None
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no python-backend stub outlives the server
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))

    # The server is down: helpers say UNAVAILABLE, promptly.
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            triton_client.load_model(client, "toy", timeout_s=5)
        assert time.monotonic() - started < 6
    finally:
        client.close()


def test_model_failing_in_initialize_reports_tritons_message(server):
    client = server.client()
    try:
        with pytest.raises(FailedPrecondition) as err:
            triton_client.load_model(client, "broken", timeout_s=30)
        assert "toy initialize failed on purpose" in err.value.message
        assert "broken" in err.value.message
        assert not client.is_model_ready("broken", client_timeout=5)
        with pytest.raises(NotFound, match="no folder `missing`"):
            triton_client.load_model(client, "missing", timeout_s=10)
    finally:
        client.close()
    # The server survives a failed load and still serves the good model.
    server.load_model("toy", timeout_s=30)
    with pytest.raises(FailedPrecondition, match="config.pbtxt"):
        (server.model_repository / "toy" / "config.pbtxt").write_text('name: "toy" backend: "python" input [ { name')
        server.load_model("toy", timeout_s=10)


def test_a_stuck_load_times_out_and_the_server_still_stops(server):
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="not ready after 3 s"):
        server.load_model("stuck", timeout_s=3)
    assert time.monotonic() - started < 6
    pid = server.pid
    server.stop(grace_s=2)  # Triton waits on the stuck load; the SIGKILL after the grace ends it
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_exit_during_start_reports_the_log(install, tmp_path):
    repo = tmp_path / "empty"
    repo.mkdir()
    server = ts.TritonServer(repo, install=install, extra_args=["--no-such-flag"], log_file=tmp_path / "bad.log")
    with pytest.raises(FailedPrecondition, match="exited with code") as err:
        server.start(timeout_s=20)
    assert "no-such-flag" in err.value.message
    assert not server.is_running()
