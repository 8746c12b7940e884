"""Offline checks of the Helm chart in deploy/helm/persona: helm lint/template and strict Kubernetes schemas."""
import pytest
from chart import (CHART, GPU_VALUES, SPLIT_VALUES, SPLIT_SERVICES, JOB_DISPATCHER_RULES, SPLIT_MINIMAL, KUBE_VERSION,
                   SIDECAR, container, env_of, find, pod_spec, render, run_helm)

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


def test_limits_and_the_model_allow_list_reach_the_config_map(helm):
    config = find(render(helm), "ConfigMap", "demo-persona-env")["data"]
    assert {k: config[k] for k in ("PERSONA_RPC_WORKERS", "PERSONA_GENERATE_QUEUE", "PERSONA_GENERATE_MAX_PIXELS",
                                   "PERSONA_MAX_UPLOAD_PIXELS", "PERSONA_GENERATE_MAX_MEGAPIXEL_STEPS")} == {
        "PERSONA_RPC_WORKERS": "32", "PERSONA_GENERATE_QUEUE": "8", "PERSONA_GENERATE_MAX_PIXELS": "1048576",
        "PERSONA_MAX_UPLOAD_PIXELS": "256000000", "PERSONA_GENERATE_MAX_MEGAPIXEL_STEPS": "256"}
    assert "PERSONA_MODELS_ROOT" not in config and "PERSONA_ALLOWED_MODELS" not in config  # persona's defaults
    config = find(render(helm, "--set", "persona.limits.generateQueue=2", "--set", "persona.models.root=/base-models",
                         "--set", "persona.models.allowed={owner/a,owner/b}"), "ConfigMap", "demo-persona-env")["data"]
    assert config["PERSONA_GENERATE_QUEUE"] == "2" and config["PERSONA_MODELS_ROOT"] == "/base-models"
    assert config["PERSONA_ALLOWED_MODELS"] == "owner/a,owner/b"


@pytest.mark.parametrize("setting", ["persona.limits.generateQueue=-1", "persona.limits.maxWatchStreams=0",
                                     "persona.limits.generateMaxImages=65", "persona.limits.queue=3",
                                     "persona.models.root=relative/path"])
def test_bad_limits_are_refused_by_the_schema(helm, setting):
    result = run_helm(helm, "template", "demo", str(CHART), "--set", setting)
    assert result.returncode != 0 and "values don't meet the specifications of the schema" in result.stderr, setting
