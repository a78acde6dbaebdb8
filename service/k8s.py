"""Kubernetes manifests for one run: a ConfigMap holding the job spec, a ServiceAccount and a NetworkPolicy of
its own, and a KubeRay RayJob that trains it.

`render_rayjob` builds the same objects as the kustomize base in k8s/base and its overlays (tests/test_k8s.py
renders both and compares them), here as Python data because service/ is installed as a package and k8s/ is
not shipped with it. The ConfigMap holds the validated spec written out again, never the file's own text, with
`metrics_host: 0.0.0.0` so that Prometheus reaches the exporter on the pod's address.

Topology: a worker pod holds `gpus_per_node` GPUs (one pod per GPU node, so the ranks on it talk over NVLink),
and Ray Train packs ranks by node (the spec's `placement`, `pack` by default). The spec's largest `workers`
decides how many pods there are; with `autoscale`, KubeRay's in-tree autoscaler starts them as phases ask for
workers (minReplicas 0), so the low resolutions that train on fewer workers leave GPU nodes free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from service.spec import Spec, SpecError, load_spec, max_workers

RAY_VERSION = "2.60.0"
IMAGE = "progan-service:0.1.0"
ENTRYPOINT = "python -m service.train /config/job.yaml"
SPEC_KEY = "job.yaml"
S3_SECRET = "progan-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
AUTH_SECRET = "progan-ray-auth"  # key auth_token, the key KubeRay's authOptions.secretName expects
AUTH_KEY = "auth_token"
RAY_METRICS_PORT = 8080  # KubeRay starts Ray with --metrics-export-port=8080
DASHBOARD_PORT = 8265  # the Jobs API: the submitter pod and the KubeRay operator call it
POD_METRICS_HOST = "0.0.0.0"  # in a pod the exporter must answer on the pod's address
MONITORING_NAMESPACE = "monitoring"  # where Prometheus runs; the NetworkPolicy lets it scrape
# The KubeRay Helm chart's operator pods; an expression, so that kustomize's `labels:` leaves it as it is.
OPERATOR_SELECTOR = {"key": "app.kubernetes.io/name", "operator": "In", "values": ["kuberay-operator"]}
GPUS_PER_NODE = 8
# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds: room for the run's last checkpoint.
RUNTIME_ENV_YAML = "env_vars:\n  RAY_JOB_STOP_WAIT_TIME_S: \"300\"\n"
RAY_UID, RAY_GID = 1000, 100  # the `ray` user and `users` group of the rayproject/ray images
MAX_NAME = 47  # KubeRay appends a suffix to a RayJob's name for its RayCluster and pods
# The root file system is read-only; what Ray and torch write goes to these emptyDirs (name, path, size limit).
# Ray's temp dir is mounted as KubeRay's own `ray-logs` volume, which KubeRay then shares with the autoscaler.
SCRATCH = [("tmp", "/tmp", "4Gi"), ("ray-logs", "/tmp/ray", "8Gi"), ("cache", "/home/ray/.cache", "2Gi")]
EPHEMERAL = {"requests": "8Gi", "limits": "16Gi"}  # the scratch volumes plus the containers' logs
# The autoscaler sidecar alone gets the ServiceAccount's token, to scale the worker group through the API.
TOKEN_VOLUME = "autoscaler-token"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def job_name(run: str) -> str:
    """A RayJob name from a run name: a DNS-1035 label that KubeRay accepts."""
    return ("progan-" + re.sub(r"[^a-z0-9]+", "-", run))[:MAX_NAME].rstrip("-")


def labels(name: str) -> dict[str, str]:
    """Every object and pod of one job; the NetworkPolicy tells the job's own pods apart by `instance`."""
    return {"app.kubernetes.io/name": "progan", "app.kubernetes.io/instance": name}


@dataclass(frozen=True)
class Topology:
    """How the spec's training workers map to worker pods."""

    pods: int  # worker pods when every phase runs: the group's maxReplicas
    workers_per_pod: int  # training workers (GPUs with use_gpu) on one pod
    first_pods: int  # pods the first phase needs: the group's replicas at start under autoscaling
    autoscale: bool


def topology(spec: Spec, source: str, gpus_per_node: int = GPUS_PER_NODE, nodes: int | None = None,
             autoscale: bool = False) -> Topology:
    """Pods for a spec: with GPUs, `gpus_per_node` workers a pod (fewer when the spec never uses that many);
    without, one worker a pod. `nodes`, when given, must be what the spec's largest `workers` fills."""
    if gpus_per_node < 1:
        raise SpecError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
    if nodes is not None and nodes < 1:
        raise SpecError(f"--nodes must be at least 1, got {nodes}")
    largest = max(max_workers(w) for w in spec.workers.values())
    per_pod = min(gpus_per_node, largest) if spec.use_gpu else 1
    if largest % per_pod:
        raise SpecError(f"{source}: workers: the largest, {largest}, is not a whole number of {per_pod}-GPU nodes; "
                        f"use a multiple of {per_pod} or another --gpus-per-node")
    pods = largest // per_pod
    if nodes is not None and nodes != pods:
        unit = f"node(s) of {per_pod} GPUs" if spec.use_gpu else "CPU worker pod(s)"
        raise SpecError(f"{source}: workers: the largest, {largest}, fills {pods} {unit}, not --nodes {nodes}; "
                        "change the spec's workers or --nodes so that they agree")
    first = math.ceil(max_workers(spec.workers[min(spec.workers)]) / per_pod)
    return Topology(pods, per_pod, first if autoscale else pods, autoscale)


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _auth_env() -> list[dict]:
    """Ray token authentication (Ray >= 2.52); every node and every client needs the same token."""
    return [{"name": "RAY_AUTH_MODE", "value": "token"}, _secret_env("RAY_AUTH_TOKEN", AUTH_SECRET, AUTH_KEY)]


def _env() -> list[dict]:
    return _auth_env() + [
        _secret_env("AWS_ACCESS_KEY_ID", S3_SECRET, "AWS_ACCESS_KEY_ID"),
        _secret_env("AWS_SECRET_ACCESS_KEY", S3_SECRET, "AWS_SECRET_ACCESS_KEY"),
    ]


def _resources(cpu: str, memory: str, gpus: int = 0, ephemeral: dict = EPHEMERAL) -> dict:
    amount = {"cpu": cpu, "memory": memory} | ({"nvidia.com/gpu": gpus} if gpus else {})
    return {part: amount | {"ephemeral-storage": ephemeral[part]} for part in ("requests", "limits")}


def _container_security() -> dict:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def _pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _shm(size_gi: int) -> dict:
    """Ray's object store and the DataLoader workers share memory through /dev/shm; the default 64 MiB is too small."""
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{size_gi}Gi"}}


def _scratch() -> tuple[list[dict], list[dict]]:
    """The writable paths under a read-only root: volumes and their mounts."""
    volumes = [{"name": name, "emptyDir": {"sizeLimit": size}} for name, _, size in SCRATCH]
    return volumes, [{"name": name, "mountPath": path} for name, path, _ in SCRATCH]


def _ray_pod(name: str, component: str, container: dict, volumes: list[dict], gpu: bool) -> dict:
    spec = {"serviceAccountName": name, "automountServiceAccountToken": False, "securityContext": _pod_security(),
            "containers": [container], "volumes": volumes}
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels(name) | {"app.kubernetes.io/component": component}}, "spec": spec}


def _token_volume() -> dict:
    """What the API server would mount in every container, here for the autoscaler sidecar only."""
    return {"name": TOKEN_VOLUME, "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]}}  # fmt: skip


def _head(spec: Spec, name: str, image: str, config_map: str, autoscale: bool) -> dict:
    cpu, memory_gi = (4, 16) if spec.use_gpu else (2, 4)
    scratch_volumes, scratch_mounts = _scratch()
    container = {
        "name": "ray-head",
        "image": image,
        "ports": [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "client", "containerPort": 10001},
            {"name": "metrics", "containerPort": RAY_METRICS_PORT},
            {"name": "progan-metrics", "containerPort": spec.metrics_port},
        ],
        "env": _env(),
        "resources": _resources(str(cpu), f"{memory_gi}Gi"),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "job-spec", "mountPath": "/config", "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}, *scratch_mounts],
    }
    volumes = [{"name": "job-spec", "configMap": {"name": config_map}}, _shm(memory_gi // 2), *scratch_volumes]
    if autoscale:
        volumes.append(_token_volume())
    return {"rayStartParams": {}, "template": _ray_pod(name, "ray-head", container, volumes, gpu=False)}


def _workers(spec: Spec, name: str, image: str, shape: Topology) -> dict:
    per_pod = shape.workers_per_pod
    cpu = math.ceil(per_pod * (spec.cpus_per_worker + spec.data_workers))
    memory_gi = per_pod * (32 if spec.use_gpu else 4)
    scratch_volumes, scratch_mounts = _scratch()
    container = {
        "name": "ray-worker",
        "image": image,
        "ports": [{"name": "metrics", "containerPort": RAY_METRICS_PORT}],
        "env": _env(),
        "resources": _resources(str(cpu), f"{memory_gi}Gi", per_pod if spec.use_gpu else 0),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *scratch_mounts],
    }
    volumes = [_shm(memory_gi // 2), *scratch_volumes]
    return {
        "groupName": "workers",
        "replicas": shape.first_pods,
        "minReplicas": 0 if shape.autoscale else shape.pods,
        "maxReplicas": shape.pods,
        "rayStartParams": {},
        "template": _ray_pod(name, "ray-worker", container, volumes, gpu=spec.use_gpu),
    }


def _autoscaler() -> dict:
    """KubeRay's in-tree autoscaler: it adds worker pods when a phase's placement group waits for GPUs and removes
    pods idle this long. It runs as a sidecar of the head, with the ServiceAccount's token mounted in it alone."""
    return {
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 120,
            "resources": _resources("500m", "512Mi", ephemeral={"requests": "256Mi", "limits": "512Mi"}),
            "securityContext": _container_security(),
            "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_PATH, "readOnly": True}],
        },
    }


def _submitter(name: str, image: str) -> dict:
    """The pod that runs `ray job submit`; KubeRay fills in the command. It needs the token like every Ray client."""
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "env": _auth_env(),
        "resources": _resources("500m", "1Gi", ephemeral={"requests": "256Mi", "limits": "512Mi"}),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "metadata": {"labels": labels(name) | {"app.kubernetes.io/component": "submitter"}},
        "spec": {"restartPolicy": "Never", "serviceAccountName": name, "automountServiceAccountToken": False,
                 "securityContext": _pod_security(), "containers": [container],
                 "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]},
    }


def _metadata(name: str, instance: str, namespace: str | None) -> dict:
    return {"name": name, "labels": labels(instance)} | ({"namespace": namespace} if namespace else {})


def rayjob_manifest(spec: Spec, name: str, config_map: str, shape: Topology, image: str = IMAGE,
                    namespace: str | None = None) -> dict:
    """The RayJob for a validated spec, as a dict."""
    cluster = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        **(_autoscaler() if shape.autoscale else {}),
        "headGroupSpec": _head(spec, name, image, config_map, shape.autoscale),
        "workerGroupSpecs": [_workers(spec, name, image, shape)],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(name, name, namespace),
        "spec": {
            "entrypoint": ENTRYPOINT,
            "runtimeEnvYAML": RUNTIME_ENV_YAML,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 2,  # a retry resumes the run from its last committed phase
            "activeDeadlineSeconds": (14 if spec.use_gpu else 1) * 24 * 3600,
            "submitterPodTemplate": _submitter(name, image),
            "rayClusterSpec": cluster,
        },
    }


def service_account(name: str, namespace: str | None = None) -> dict:
    """The job's own identity, with no token in its pods: nothing in a run calls the Kubernetes API (the
    autoscaler sidecar, when on, gets a token of its own mount; KubeRay grants this account its Role)."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(name, name, namespace),
            "automountServiceAccountToken": False}


def network_policy(name: str, metrics_port: int, namespace: str | None = None) -> dict:
    """Ingress to the job's pods: any port from the job's own pods (Ray's GCS, raylets, object transfer, NCCL),
    the metrics ports from the monitoring namespace, and the Jobs API from the KubeRay operator. Nothing else."""
    def tcp(port: int) -> dict:
        return {"protocol": "TCP", "port": port}

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, name, namespace),
        "spec": {
            "podSelector": {"matchLabels": labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": labels(name)}}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}}}],
                 "ports": [tcp(RAY_METRICS_PORT), tcp(metrics_port)]},
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchExpressions": [OPERATOR_SELECTOR]}}],
                 "ports": [tcp(DASHBOARD_PORT)]},
            ],
        },
    }  # fmt: skip


def check_for_kubernetes(spec: Spec, source: str) -> None:
    """What a spec needs to run on Kubernetes beyond being valid: storage all pods reach, a port Prometheus finds."""
    for field in ("dataset", "storage"):
        if not getattr(spec, field).startswith("s3://"):
            raise SpecError(f"{source}: {field}: the pods of a RayJob share no file system; use an s3:// URL")
    if spec.metrics_port == 0:
        raise SpecError(f"{source}: metrics_port: 0 picks a random port that Prometheus cannot find; set a fixed port")


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the spec) as literal blocks, so the ConfigMap reads like a spec file."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def render_rayjob(spec_path: Path, image: str, namespace: str | None = None, gpus_per_node: int = GPUS_PER_NODE,
                  nodes: int | None = None, autoscale: bool = False, name: str | None = None) -> str:
    """The ConfigMap with the validated spec, the ServiceAccount, the NetworkPolicy and the RayJob that trains
    it, as YAML for `kubectl apply -f -`. See `topology` for gpus_per_node, nodes and autoscale."""
    spec = load_spec(spec_path)
    check_for_kubernetes(spec, str(spec_path))
    shape = topology(spec, str(spec_path), gpus_per_node, nodes, autoscale)
    name = name or job_name(spec.run)
    pod_spec = spec.model_copy(update={"metrics_host": POD_METRICS_HOST})
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(f"{name}-job", name, namespace),
        "data": {SPEC_KEY: pod_spec.to_yaml()},
    }
    objects = [config_map, service_account(name, namespace), network_policy(name, spec.metrics_port, namespace),
               rayjob_manifest(pod_spec, name, f"{name}-job", shape, image, namespace)]
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
