"""The Kubernetes train dispatcher: the Job manifest (validated offline) and KubernetesDispatcher on a fake client.
The runner's side of dispatching (subprocess workers for real) is in test_job_dispatch.py."""
import re
import sys
from types import SimpleNamespace

import pytest

from persona.services.runtime.dispatch import JobDispatcher
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument
from persona.services.train.dispatch import KubernetesDispatcher, job_name, kubernetes_job_manifest

KUBE_VERSION = "1.30"
JOB_ID = "job_9C1e0a7b3d5f2e4c6a8b"
ARGS = dict(image="registry.example.com/persona/persona:0.1.0", namespace="persona",
            service_account="persona", data_claim="persona-data", models_claim="persona-models")
GPU_ARGS = dict(gpu=2, node_selector={"nvidia.com/gpu.present": "true"},
                tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                env={"PERSONA_TRAIN_DEVICE": "cuda", "HF_HUB_OFFLINE": 1}, backoff_limit=2,
                ttl_seconds_after_finished=600)
GPU_ARGS_FROM = dict(GPU_ARGS, config_map="persona-env", secret="persona-secrets", image_pull_secrets=["regcred"])
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture(scope="module")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("`kubernetes-validate` is not installed: pip install -e '.[dev]' (deploy/README.md)")
    return kubernetes_validate


def job(job_id, concept_id):
    return SimpleNamespace(job_id=job_id, params={"concept_id": concept_id})


def pod_spec(manifest):
    return manifest["spec"]["template"]["spec"]


@pytest.mark.parametrize("extra", [{}, GPU_ARGS, GPU_ARGS_FROM], ids=["default", "gpu", "env-from"])
def test_the_manifest_is_a_valid_job_for_kubernetes_1_30(kubernetes_validate, extra):
    manifest = kubernetes_job_manifest(JOB_ID, **ARGS, **extra)
    kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)  # raises on unknown fields and bad types
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    spec = pod_spec(manifest)
    (container,) = spec["containers"]
    assert container["args"] == ["persona-cli", "run-job", JOB_ID, "--data-dir", "/data"]
    assert spec["restartPolicy"] == "Never"
    assert spec["serviceAccountName"] == "persona"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    assert (mounts["data"], mounts["models"]) == ("/data", "/models")
    assert claims == {"data": "persona-data", "models": "persona-models"}
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    labels = {"app.kubernetes.io/name": "persona", "app.kubernetes.io/component": "train-job",
              "persona.dev/job-id": JOB_ID}
    assert manifest["metadata"]["labels"] == labels
    assert manifest["spec"]["template"]["metadata"]["labels"] == labels
    assert manifest["metadata"]["namespace"] == "persona"


def test_gpu_limit_node_selector_tolerations_and_env_follow_the_arguments():
    default = kubernetes_job_manifest(JOB_ID, **ARGS)
    assert pod_spec(default)["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert "nodeSelector" not in pod_spec(default) and "tolerations" not in pod_spec(default)
    assert (default["spec"]["backoffLimit"], default["spec"]["ttlSecondsAfterFinished"]) == (0, 3600)

    cpu = kubernetes_job_manifest(JOB_ID, **ARGS, gpu=0)
    assert "resources" not in pod_spec(cpu)["containers"][0]

    gpu = kubernetes_job_manifest(JOB_ID, **ARGS, **GPU_ARGS)
    spec = pod_spec(gpu)
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == GPU_ARGS["tolerations"]
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    assert env == {"HOME": "/tmp", "PERSONA_HOME": "/data", "PERSONA_TRAIN_DEVICE": "cuda", "HF_HUB_OFFLINE": "1"}
    assert (gpu["spec"]["backoffLimit"], gpu["spec"]["ttlSecondsAfterFinished"]) == (2, 600)
    assert "envFrom" not in spec["containers"][0]

    # The server's settings reach the worker by reference: the DSN and keys never appear in the Job spec.
    from_refs = pod_spec(kubernetes_job_manifest(JOB_ID, **ARGS, config_map="persona-env", secret="persona-secrets"))
    assert from_refs["containers"][0]["envFrom"] == [{"configMapRef": {"name": "persona-env"}},
                                                     {"secretRef": {"name": "persona-secrets"}}]
    assert from_refs["automountServiceAccountToken"] is False and "imagePullSecrets" not in from_refs
    private = pod_spec(kubernetes_job_manifest(JOB_ID, **ARGS, image_pull_secrets=["regcred"]))
    assert private["imagePullSecrets"] == [{"name": "regcred"}]
    assert from_refs["containers"][0]["args"] == ["persona-cli", "run-job", JOB_ID, "--data-dir", "/data"]


@pytest.mark.parametrize("job_id", [JOB_ID, "job_" + "A" * 59, "a", "Job.With.Dots_and-Dashes"])
def test_job_names_are_dns_1123_labels_and_distinct(job_id):
    name = kubernetes_job_manifest(job_id, **ARGS)["metadata"]["name"]
    assert name.startswith("persona-train-") and len(name) <= 63 and DNS_LABEL.match(name), name


def test_job_names_keep_ids_apart_that_only_differ_in_what_dns_cannot_spell():
    assert job_name(JOB_ID).startswith("persona-train-job-9c1e0a7b3d5f2e4c6a8b")
    assert job_name("job-abc") == "persona-train-job-abc"  # already DNS-safe: used as is
    names = {job_name(i) for i in ("job_abc", "job-abc", "JOB_ABC", "job_" + "a" * 59, "job_" + "a" * 58 + "b")}
    assert len(names) == 5


@pytest.mark.parametrize("override, argument", [
    ({"image": ""}, "image"), ({"image": "  "}, "image"),
    ({"gpu": -1}, "gpu"), ({"gpu": True}, "gpu"), ({"backoff_limit": -1}, "backoff_limit"),
    ({"ttl_seconds_after_finished": -5}, "ttl_seconds_after_finished"),
    ({"namespace": "Persona"}, "namespace"), ({"namespace": "per_sona"}, "namespace"),
    ({"namespace": ""}, "namespace"), ({"namespace": "a" * 64}, "namespace"),
    ({"service_account": ""}, "service_account"), ({"data_claim": "Data"}, "data_claim"),
    ({"models_claim": "models/x"}, "models_claim"),
    ({"node_selector": {"gpu": True}}, "node_selector"), ({"tolerations": ["gpu"]}, "tolerations"),
    ({"env": {"A=B": "c"}}, "env"),
])
def test_bad_arguments_are_named(override, argument):
    with pytest.raises(InvalidArgument, match=f"`{argument}`"):
        kubernetes_job_manifest(JOB_ID, **{**ARGS, **override})


@pytest.mark.parametrize("job_id", ["", "_job", "job id", "j" * 64])
def test_bad_job_ids_are_named(job_id):
    with pytest.raises(InvalidArgument, match="`job_id`"):
        kubernetes_job_manifest(job_id, **ARGS)


class ApiException(Exception):
    """Like kubernetes.client.ApiException: carries the HTTP status."""

    def __init__(self, status):
        super().__init__(f"({status})")
        self.status = status


class FakeBatchV1Api:
    """Records calls with the signatures of kubernetes.client.BatchV1Api:
    create_namespaced_job(namespace, body), read_namespaced_job(name, namespace) -> V1Job (with .status),
    delete_namespaced_job(name, namespace, propagation_policy=...)."""

    def __init__(self):
        self.calls = []
        self.status = SimpleNamespace(active=None, succeeded=None, failed=None, ready=None, conditions=None)
        self.jobs = set()

    def create_namespaced_job(self, namespace, body, **kwargs):
        self.calls.append(("create_namespaced_job", (namespace, body), kwargs))
        self.jobs.add(body["metadata"]["name"])
        return body

    def read_namespaced_job(self, name, namespace, **kwargs):
        self.calls.append(("read_namespaced_job", (name, namespace), kwargs))
        if name not in self.jobs:
            raise ApiException(404)
        return SimpleNamespace(metadata=SimpleNamespace(name=name), status=self.status)

    def delete_namespaced_job(self, name, namespace, **kwargs):
        self.calls.append(("delete_namespaced_job", (name, namespace), kwargs))
        if name not in self.jobs:
            raise ApiException(404)
        self.jobs.discard(name)


@pytest.fixture
def fake():
    return FakeBatchV1Api()


@pytest.fixture
def dispatcher(fake):
    return KubernetesDispatcher("persona", ARGS["image"], service_account="persona", data_claim="persona-data",
                                models_claim="persona-models", client=fake)


def test_submit_creates_the_job_in_the_namespace(kubernetes_validate, fake, dispatcher):
    assert isinstance(dispatcher, JobDispatcher) and dispatcher.name == "kubernetes"
    handle = dispatcher.submit(job(JOB_ID, "concept_1"))
    [(method, (namespace, body), kwargs)] = fake.calls
    assert (method, namespace, kwargs) == ("create_namespaced_job", "persona", {})
    expected = kubernetes_job_manifest(JOB_ID, **ARGS)
    expected["metadata"]["annotations"] = {"persona.dev/concept-id": "concept_1"}
    assert body == expected
    kubernetes_validate.validate(body, KUBE_VERSION, strict=True)
    assert handle == body["metadata"]["name"]


@pytest.mark.parametrize("status, state", [
    ({}, "pending"),
    ({"active": 1, "ready": 0}, "pending"),  # pod waiting for a GPU node
    ({"active": 1, "ready": 1}, "running"),
    ({"active": 1}, "running"),  # a server without the `ready` count
    ({"succeeded": 1}, "succeeded"),
    ({"failed": 1}, "failed"),  # backoff_limit 0: the first failed pod fails the Job
    ({"failed": 1, "conditions": [SimpleNamespace(type="Failed", status="True")]}, "failed"),
    ({"conditions": [SimpleNamespace(type="Complete", status="True")], "succeeded": 1}, "succeeded"),
])
def test_state_maps_the_job_status(fake, dispatcher, status, state):
    handle = dispatcher.submit(job(JOB_ID, "concept_1"))
    for name, value in status.items():
        setattr(fake.status, name, value)
    assert dispatcher.state(handle) == state
    # GET jobs/{name} (the Role grants batch `jobs` get), not the `jobs/status` subresource it does not grant.
    assert fake.calls[-1] == ("read_namespaced_job", (handle, "persona"), {})


def test_a_failed_pod_within_the_backoff_limit_is_not_a_failed_job(fake):
    dispatcher = KubernetesDispatcher("persona", ARGS["image"], service_account="persona", data_claim="persona-data",
                                      models_claim="persona-models", backoff_limit=2, client=fake)
    handle = dispatcher.submit(job(JOB_ID, "concept_1"))
    fake.status.failed = 1
    assert dispatcher.state(handle) == "pending"
    fake.status.active, fake.status.ready = 1, 1
    assert dispatcher.state(handle) == "running"
    fake.status.active, fake.status.failed = 0, 3
    assert dispatcher.state(handle) == "failed"


def test_cancel_deletes_the_job_in_the_background_and_is_idempotent(fake, dispatcher):
    handle = dispatcher.submit(job(JOB_ID, "concept_1"))
    dispatcher.cancel(handle)
    assert fake.calls[-1] == ("delete_namespaced_job", (handle, "persona"), {"propagation_policy": "Background"})
    dispatcher.cancel(handle)  # gone (404): nothing to do
    assert dispatcher.state(handle) == "gone"


def test_other_api_errors_pass_through(fake, dispatcher):
    def forbidden(*args, **kwargs):
        raise ApiException(403)

    fake.delete_namespaced_job = forbidden
    with pytest.raises(ApiException):
        dispatcher.cancel("persona-train-x")


def test_bad_arguments_fail_at_construction(fake):
    with pytest.raises(InvalidArgument, match="`gpu`"):
        KubernetesDispatcher("persona", ARGS["image"], service_account="persona", data_claim="persona-data",
                             models_claim="persona-models", gpu=-1, client=fake)


def test_without_the_kubernetes_package_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # import kubernetes -> ImportError
    with pytest.raises(FailedPrecondition, match="pip install kubernetes"):
        KubernetesDispatcher("persona", ARGS["image"], service_account="persona", data_claim="persona-data",
                             models_claim="persona-models")


def test_dispatcher_settings_come_from_the_environment_and_bad_ones_are_named(monkeypatch):
    from persona.services.train.dispatch import train_dispatcher
    from persona.services.train.settings import TrainSettings

    monkeypatch.setenv("PERSONA_TRAIN_DISPATCHER", "kubernetes")
    monkeypatch.setenv("PERSONA_K8S_NAMESPACE", "persona")
    monkeypatch.setenv("PERSONA_K8S_GPU", "2")
    monkeypatch.setenv("PERSONA_K8S_NODE_SELECTOR", '{"nvidia.com/gpu.present": "true"}')
    monkeypatch.setenv("PERSONA_K8S_TOLERATIONS", '[{"key": "nvidia.com/gpu", "operator": "Exists"}]')
    monkeypatch.setenv("PERSONA_K8S_IMAGE_PULL_SECRETS", "regcred, mirror")
    settings = TrainSettings.from_env()
    k = settings.kubernetes
    assert (settings.dispatcher, k.namespace, k.gpu, k.node_selector, k.image_pull_secrets) == (
        "kubernetes", "persona", 2, {"nvidia.com/gpu.present": "true"}, ["regcred", "mirror"])
    with pytest.raises(FailedPrecondition, match="needs PERSONA_K8S_IMAGE"):
        train_dispatcher(settings, "/data", database_url="postgresql://db/persona")

    monkeypatch.setenv("PERSONA_K8S_TOLERATIONS", '{"key": "x"}')
    with pytest.raises(FailedPrecondition, match="PERSONA_K8S_TOLERATIONS is .*set a JSON list"):
        TrainSettings.from_env()
    monkeypatch.setenv("PERSONA_K8S_TOLERATIONS", "[{")
    with pytest.raises(FailedPrecondition, match="PERSONA_K8S_TOLERATIONS"):
        TrainSettings.from_env()
    monkeypatch.setenv("PERSONA_TRAIN_DISPATCHER", "slurm")
    with pytest.raises(FailedPrecondition, match="PERSONA_TRAIN_DISPATCHER is 'slurm': use thread, subprocess or kubernetes"):
        TrainSettings.from_env()
    monkeypatch.setenv("PERSONA_TRAIN_DISPATCHER", "")
    assert TrainSettings.from_env().dispatcher == "thread"
    assert train_dispatcher(TrainSettings.from_env(), "/data") is None
