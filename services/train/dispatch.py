"""Training jobs as Kubernetes Jobs (DESIGN, "Scaling past one machine"), and the choice of dispatcher.

`KubernetesDispatcher` is a `JobDispatcher` (runtime/dispatch.py): for each train job the train service
creates one `batch/v1` Job (one GPU pod, the same image, `persona-cli run-job JOB_ID` as its command) with
the official `kubernetes` client — an optional dependency, imported lazily — and the JobRunner follows it.
The worker pod reaches the same metadata store (Postgres: PERSONA_DATABASE_URL) and the same data and
model volumes (ReadWriteMany) as the server. The chart's Role (`rbac.create`) grants exactly what it uses.

`train_dispatcher(settings, data_dir)` picks the dispatcher from PERSONA_TRAIN_DISPATCHER: `thread` (the
runner's own threads, the default), `subprocess` (a child process per job, on this machine) or
`kubernetes` (PERSONA_K8S_* settings, see TrainSettings).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from persona.services.runtime import dispatch
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument, InvalidSetting

from .settings import TrainSettings

NAME_PREFIX = "persona-train-"
DATA_DIR, MODELS_DIR = "/data", "/models"
# The chart's uid/gid (values.yaml persona.podSecurityContext).
RUN_AS = 10001
LABEL_NAME, LABEL_COMPONENT, LABEL_JOB_ID = "app.kubernetes.io/name", "app.kubernetes.io/component", "persona.dev/job-id"
ANNOTATION_CONCEPT_ID = "persona.dev/concept-id"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123 label: namespaces, ≤ 63
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # ≤ 253
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")  # ≤ 63

def train_dispatcher(settings: TrainSettings, data_dir: Path,
                     database_url: str = "") -> "dispatch.JobDispatcher | None":
    """The dispatcher train jobs go through, from TrainSettings (None: the runner's own threads). `database_url`
    is the server's PERSONA_DATABASE_URL: workers in other pods need it (SQLite cannot be shared with them), and a
    subprocess worker gets it with the server's model settings, so that settings given in code reach it too."""
    if settings.dispatcher == "subprocess":
        return dispatch.SubprocessDispatcher(data_dir, env={
            "PERSONA_MODEL_CACHE": str(settings.base_model_cache_dir),
            "PERSONA_BASE_MODEL": settings.default_base_model, "PERSONA_TRAIN_DEVICE": settings.device or "",
            "PERSONA_DATABASE_URL": database_url})
    if settings.dispatcher == "kubernetes":
        if not database_url:
            raise FailedPrecondition(
                "PERSONA_TRAIN_DISPATCHER=kubernetes runs training in other pods, which cannot share this server's "
                "SQLite file: set PERSONA_DATABASE_URL to a PostgreSQL database (Helm: database.postgresDsn)")
        k = settings.kubernetes
        if not k.image:
            raise InvalidSetting("PERSONA_TRAIN_DISPATCHER=kubernetes needs PERSONA_K8S_IMAGE: the image the "
                                 "worker pods run (the persona image), e.g. registry.example.com/persona:0.1.0")
        return KubernetesDispatcher(
            k.namespace, k.image, service_account=k.service_account, data_claim=k.data_claim,
            models_claim=k.models_claim, gpu=k.gpu, node_selector=k.node_selector, tolerations=k.tolerations,
            config_map=k.config_map, secret=k.secret, image_pull_secrets=k.image_pull_secrets)
    return None


def job_name(job_id: str) -> str:
    """`persona-train-<job id>` as a DNS-1123 label (≤ 63: the Job controller copies it into pod labels)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    name = NAME_PREFIX + slug
    if len(name) > 63 or slug != job_id.lower():
        # Truncated or rewritten: a hash of the exact id keeps distinct ids distinct ("a_b" vs "a-b").
        digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]
        name = f"{name[:63 - 9].rstrip('-')}-{digest}"
    return name


def kubernetes_job_manifest(job_id: str, *, image: str, namespace: str, service_account: str, data_claim: str,
                            models_claim: str, gpu: int = 1, node_selector: dict | None = None,
                            tolerations: list | None = None, env: dict | None = None, config_map: str = "",
                            secret: str = "", image_pull_secrets: list[str] | None = None, backoff_limit: int = 0,
                            ttl_seconds_after_finished: int = 3600) -> dict:
    """The `batch/v1` Job that runs one train job in a worker pod, as a plain dict (kubernetes client body).

    One container runs `persona-cli run-job JOB_ID --data-dir /data` with the data and models PVCs at /data
    and /models, the server's settings from `config_map` and `secret` (envFrom: PERSONA_DATABASE_URL and
    the VLM key stay in the Secret, never in the Job spec), non-root like the chart's pods, `nvidia.com/gpu: gpu` when gpu > 0, restartPolicy Never; `backoff_limit` retries
    (0: a failed pod fails the Job; the train handler resumes from its checkpoint when retried) and the
    finished Job is garbage-collected after `ttl_seconds_after_finished` — the job's outcome lives in the
    JobStore, not in the Job object.
    """
    if not isinstance(job_id, str) or len(job_id) > 63 or not _LABEL_VALUE.match(job_id):
        raise InvalidArgument(f"`job_id` {job_id!r} is not a job id: letters, digits, '-', '_' and '.', "
                              f"at most 63 characters, e.g. job_9c1e0a")
    if not isinstance(image, str) or not image.strip():
        raise InvalidArgument("`image` is empty: pass the persona image, e.g. registry.example.com/persona/persona:0.1.0")
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise InvalidArgument(f"`namespace` {namespace!r} is not a Kubernetes namespace name: lowercase letters, "
                              f"digits and '-', at most 63 characters, e.g. persona")
    for arg, value in (("service_account", service_account), ("data_claim", data_claim),
                       ("models_claim", models_claim), ("config_map", config_map or "x"), ("secret", secret or "x"),
                       *((f"image_pull_secrets[{i}]", name) for i, name in enumerate(image_pull_secrets or []))):
        if not isinstance(value, str) or len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
            raise InvalidArgument(f"`{arg}` {value!r} is not a Kubernetes object name: lowercase letters, digits, "
                                  f"'-' and '.', e.g. persona-data")
    for arg, count in (("gpu", gpu), ("backoff_limit", backoff_limit),
                       ("ttl_seconds_after_finished", ttl_seconds_after_finished)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidArgument(f"`{arg}` is {count!r}: pass a whole number ≥ 0")
    node_selector = dict(node_selector or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in node_selector.items()):
        raise InvalidArgument(f"`node_selector` {node_selector!r} must map label names to string values, "
                              f"e.g. {{'nvidia.com/gpu.present': 'true'}}")
    tolerations = list(tolerations or [])
    if not all(isinstance(t, dict) for t in tolerations):
        raise InvalidArgument(f"`tolerations` {tolerations!r} must be a list of Kubernetes tolerations (dicts), "
                              f"e.g. [{{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}}]")
    variables = {"HOME": "/tmp", "PERSONA_HOME": DATA_DIR}
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not name or "=" in name:
            raise InvalidArgument(f"`env` has the variable name {name!r}: pass non-empty names without '='")
        variables[name] = str(value)

    labels = {LABEL_NAME: "persona", LABEL_COMPONENT: "train-job", LABEL_JOB_ID: job_id}
    container: dict[str, Any] = {
        "name": "train",
        "image": image,
        # `args` like the chart's server container, so the same image (and its entrypoint) runs both.
        "args": ["persona-cli", "run-job", job_id, "--data-dir", DATA_DIR],
        "env": [{"name": k, "value": v} for k, v in variables.items()],
        **({"envFrom": [*([{"configMapRef": {"name": config_map}}] if config_map else []),
                        *([{"secretRef": {"name": secret}}] if secret else [])]} if config_map or secret else {}),
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}, {"name": "models", "mountPath": MODELS_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    if gpu > 0:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpu}}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,  # the worker talks to the store, not to the Kubernetes API
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": data_claim}},
                    {"name": "models", "persistentVolumeClaim": {"claimName": models_claim}},
                    {"name": "tmp", "emptyDir": {}}],
    }
    if image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in image_pull_secrets]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(job_id), "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "backoffLimit": backoff_limit,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }


def _kubernetes_batch_api() -> Any:
    try:
        import kubernetes
    except ImportError:
        raise FailedPrecondition("the Kubernetes train dispatcher needs the kubernetes client: "
                                 "`pip install kubernetes` in the server's environment") from None
    try:
        kubernetes.config.load_incluster_config()  # in a pod: the service account's token
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # elsewhere: ~/.kube/config
    return kubernetes.client.BatchV1Api()


def _is_not_found(error: Exception) -> bool:
    return getattr(error, "status", None) == 404  # kubernetes.client.ApiException, without importing it


class KubernetesDispatcher:
    """Runs each train job as a Kubernetes Job in `namespace`; its handle is the Job's name.

    `client` is a `kubernetes.client.BatchV1Api` (built from the in-cluster or kube config when None).
    The manifest arguments are those of `kubernetes_job_manifest` and are checked here, at construction.
    """

    name = "kubernetes"

    def __init__(self, namespace: str, image: str, *, service_account: str, data_claim: str, models_claim: str,
                 gpu: int = 1, node_selector: dict | None = None, tolerations: list | None = None,
                 env: dict | None = None, config_map: str = "", secret: str = "",
                 image_pull_secrets: list[str] | None = None, backoff_limit: int = 0,
                 ttl_seconds_after_finished: int = 3600, client: Any = None):
        self.namespace = namespace
        self.backoff_limit = backoff_limit
        self._manifest_args = dict(image=image, namespace=namespace, service_account=service_account,
                                   data_claim=data_claim, models_claim=models_claim, gpu=gpu,
                                   node_selector=node_selector, tolerations=tolerations, env=env,
                                   config_map=config_map, secret=secret, image_pull_secrets=image_pull_secrets,
                                   backoff_limit=backoff_limit,
                                   ttl_seconds_after_finished=ttl_seconds_after_finished)
        kubernetes_job_manifest("job_check", **self._manifest_args)  # InvalidArgument now, not at the first submit
        self.client = client if client is not None else _kubernetes_batch_api()

    def manifest(self, job_id: str, concept_id: str = "") -> dict:
        body = kubernetes_job_manifest(job_id, **self._manifest_args)
        if concept_id:
            body["metadata"]["annotations"] = {ANNOTATION_CONCEPT_ID: concept_id}
        return body

    def submit(self, job) -> str:
        body = self.manifest(job.job_id, job.params.get("concept_id", ""))
        self.client.create_namespaced_job(self.namespace, body)
        return body["metadata"]["name"]

    def state(self, handle: str) -> str:
        try:
            # read_namespaced_job, not read_namespaced_job_status: both return the V1Job with its status, but
            # the latter is the `jobs/status` subresource, which the chart's Role (batch `jobs` only) does not grant.
            job = self.client.read_namespaced_job(handle, self.namespace)
        except Exception as e:
            if _is_not_found(e):
                return dispatch.GONE  # deleted, or garbage-collected after ttlSecondsAfterFinished
            raise
        status = job.status
        conditions = {c.type for c in (status.conditions or []) if c.status == "True"}
        if "Complete" in conditions or (status.succeeded or 0) > 0:
            return dispatch.SUCCEEDED
        if "Failed" in conditions or (status.failed or 0) > self.backoff_limit:
            return dispatch.FAILED
        if (status.active or 0) > 0:
            # `active` counts pods still waiting for a node (a GPU); `ready` (Kubernetes ≥ 1.24) tells them apart.
            ready = getattr(status, "ready", None)
            return dispatch.RUNNING if ready is None or ready > 0 else dispatch.PENDING
        return dispatch.PENDING  # created, no pod yet (or between retries)

    def cancel(self, handle: str) -> None:
        try:
            # Background: the Job goes now, the garbage collector then deletes its pod (the chart's Role allows it).
            self.client.delete_namespaced_job(handle, self.namespace, propagation_policy="Background")
        except Exception as e:
            if not _is_not_found(e):
                raise
