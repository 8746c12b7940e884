"""The chart's split topology (a Deployment per service over Postgres), the Kubernetes train dispatcher's settings
and RBAC, and where Triton runs (a shared Deployment or a sidecar of every drawing pod)."""
import json

from chart import (CHART, SPLIT_VALUES, SPLIT_SERVICES, GRPC_SERVICES, GPU_TOLERATION, JOB_DISPATCHER_RULES,
                   SPLIT_MINIMAL, SIDECAR, container, env_of, find, pod_spec, render, run_helm)


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
