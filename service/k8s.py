"""Kubernetes manifests for one run: a ConfigMap holding the job spec and a KubeRay RayJob that trains it.

`render_rayjob` builds the same RayJob as the kustomize base in k8s/base (tests/test_k8s.py renders both and
compares them), here as Python data because service/ is installed as a package and k8s/ is not shipped with it.
Pod sizes follow from the spec: one worker pod per `gpus_per_worker` training workers, each with the CPUs the
spec asks for (Ray Train's reservation plus the DataLoader processes, which Ray does not count).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

from service.spec import Spec, SpecError, load_spec

RAY_VERSION = "2.60.0"
IMAGE = "progan-service:0.1.0"
ENTRYPOINT = "python -m service.train /config/job.yaml"
SPEC_KEY = "job.yaml"
S3_SECRET = "progan-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
AUTH_SECRET = "progan-ray-auth"  # key auth_token, the key KubeRay's authOptions.secretName expects
AUTH_KEY = "auth_token"
RAY_METRICS_PORT = 8080  # KubeRay starts Ray with --metrics-export-port=8080
APP_LABEL = {"app.kubernetes.io/name": "progan"}
# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds: room for the run's last checkpoint.
RUNTIME_ENV_YAML = "env_vars:\n  RAY_JOB_STOP_WAIT_TIME_S: \"300\"\n"
RAY_UID, RAY_GID = 1000, 100  # the `ray` user and `users` group of the rayproject/ray images
MAX_NAME = 47  # KubeRay appends a suffix to a RayJob's name for its RayCluster and pods


def job_name(run: str) -> str:
    """A RayJob name from a run name: a DNS-1035 label that KubeRay accepts."""
    return ("progan-" + re.sub(r"[^a-z0-9]+", "-", run))[:MAX_NAME].rstrip("-")


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


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict:
    amount = {"cpu": cpu, "memory": memory} | ({"nvidia.com/gpu": gpus} if gpus else {})
    return {"requests": dict(amount), "limits": dict(amount)}


def _container_security() -> dict:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _shm(size_gi: int) -> dict:
    """Ray's object store and the DataLoader workers share memory through /dev/shm; the default 64 MiB is too small."""
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{size_gi}Gi"}}


def _ray_pod(component: str, container: dict, volumes: list[dict], gpu: bool) -> dict:
    spec = {"securityContext": _pod_security(), "containers": [container], "volumes": volumes}
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": APP_LABEL | {"app.kubernetes.io/component": component}}, "spec": spec}


def _head(spec: Spec, image: str, config_map: str) -> dict:
    cpu, memory_gi = (4, 16) if spec.use_gpu else (2, 4)
    container = {
        "name": "ray-head",
        "image": image,
        "ports": [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            {"name": "metrics", "containerPort": RAY_METRICS_PORT},
            {"name": "progan-metrics", "containerPort": spec.metrics_port},
        ],
        "env": _env(),
        "resources": _resources(str(cpu), f"{memory_gi}Gi"),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "job-spec", "mountPath": "/config", "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    volumes = [{"name": "job-spec", "configMap": {"name": config_map}}, _shm(memory_gi // 2)]
    return {"rayStartParams": {}, "template": _ray_pod("ray-head", container, volumes, gpu=False)}


def _workers(spec: Spec, image: str, gpus_per_worker: int) -> dict:
    workers = max(spec.workers.values())
    per_pod = gpus_per_worker if spec.use_gpu else 1
    replicas = math.ceil(workers / per_pod)
    cpu = math.ceil(per_pod * (spec.cpus_per_worker + spec.data_workers))
    memory_gi = per_pod * (32 if spec.use_gpu else 4)
    container = {
        "name": "ray-worker",
        "image": image,
        "ports": [{"name": "metrics", "containerPort": RAY_METRICS_PORT}],
        "env": _env(),
        "resources": _resources(str(cpu), f"{memory_gi}Gi", per_pod if spec.use_gpu else 0),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    return {
        "groupName": "workers",
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas,
        "rayStartParams": {},
        "template": _ray_pod("ray-worker", container, [_shm(memory_gi // 2)], gpu=spec.use_gpu),
    }


def _submitter(image: str) -> dict:
    """The pod that runs `ray job submit`; KubeRay fills in the command. It needs the token like every Ray client."""
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "env": _auth_env(),
        "resources": _resources("500m", "1Gi"),
        "securityContext": _container_security(),
    }
    return {
        "metadata": {"labels": APP_LABEL | {"app.kubernetes.io/component": "submitter"}},
        "spec": {"restartPolicy": "Never", "securityContext": _pod_security(), "containers": [container]},
    }


def _metadata(name: str, namespace: str | None) -> dict:
    return {"name": name, "labels": dict(APP_LABEL)} | ({"namespace": namespace} if namespace else {})


def rayjob_manifest(spec: Spec, name: str, config_map: str, image: str = IMAGE, namespace: str | None = None,
                    gpus_per_worker: int = 1) -> dict:
    """The RayJob for a validated spec, as a dict."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(name, namespace),
        "spec": {
            "entrypoint": ENTRYPOINT,
            "runtimeEnvYAML": RUNTIME_ENV_YAML,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 2,  # a retry resumes the run from its last committed phase
            "activeDeadlineSeconds": (14 if spec.use_gpu else 1) * 24 * 3600,
            "submitterPodTemplate": _submitter(image),
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
                "headGroupSpec": _head(spec, image, config_map),
                "workerGroupSpecs": [_workers(spec, image, gpus_per_worker)],
            },
        },
    }


def check_for_kubernetes(spec: Spec, source: str) -> None:
    """What a spec needs to run on Kubernetes beyond being valid: storage all pods reach, a port Prometheus finds."""
    for field in ("dataset", "storage"):
        if not getattr(spec, field).startswith("s3://"):
            raise SpecError(f"{source}: {field}: the pods of a RayJob share no file system; use an s3:// URL")
    if spec.metrics_port == 0:
        raise SpecError(f"{source}: metrics_port: 0 picks a random port that Prometheus cannot find; set a fixed port")


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the spec file) as literal blocks, so the ConfigMap reads like the file."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def render_rayjob(spec_path: Path, image: str, namespace: str | None = None, gpus_per_worker: int = 1) -> str:
    """The ConfigMap with the spec file and the RayJob that trains it, as YAML for `kubectl apply -f -`.
    With use_gpu, each worker pod holds `gpus_per_worker` GPUs (and as many training workers); without, one worker."""
    if gpus_per_worker < 1:
        raise ValueError(f"gpus_per_worker must be at least 1, got {gpus_per_worker}")
    spec = load_spec(spec_path)
    check_for_kubernetes(spec, str(spec_path))
    name = job_name(spec.run)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(f"{name}-job", namespace),
        "data": {SPEC_KEY: Path(spec_path).read_text()},
    }
    rayjob = rayjob_manifest(spec, name, f"{name}-job", image, namespace, gpus_per_worker)
    return yaml.dump_all([config_map, rayjob], Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
