"""Kubernetes manifests, validated offline: `kubectl kustomize` renders every overlay, core objects and pod
templates pass the Kubernetes schemas (kubernetes-validate, strict), RayJobs pass KubeRay v1.7.0's CRD schemas
(with unknown fields rejected, as server-side field validation would), every Secret or ConfigMap key a pod names
exists, and `render_rayjob` builds the same RayJob as kustomize."""

import copy
import functools
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.k8s import job_name, render_rayjob
from service.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared/schemas/kuberay"
RUNS = ["base", "overlays/cpu-smoke", "overlays/gpu-8x"]
GPU_RUNS = ["base", "overlays/gpu-8x"]
CORE_KINDS = {"ConfigMap", "Secret", "PodTemplate"}

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
needs_crds = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {SCHEMAS}")


@functools.cache
def _kustomize(path: str) -> str:
    result = subprocess.run(["kubectl", "kustomize", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def kustomize(name: str) -> list[dict]:
    return list(yaml.safe_load_all(_kustomize(str(K8S / name))))


def rendered(spec: Path, image: str = "progan-service:0.1.0", **kw) -> list[dict]:
    return list(yaml.safe_load_all(render_rayjob(spec, image, **kw)))


def example_secrets() -> list[dict]:
    return list(yaml.safe_load_all((K8S / "examples/secrets.yaml").read_text()))


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def pod_templates(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"], "submitter": rayjob["spec"]["submitterPodTemplate"]}
    templates |= {f"worker {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]}
    return templates


def head(rayjob: dict) -> dict:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def job_config_map(objects: list[dict]) -> dict:
    """The ConfigMap mounted at /config on the head."""
    rayjob = one(objects, "RayJob")
    (mount,) = [m for m in head(rayjob)["containers"][0]["volumeMounts"] if m["mountPath"] == "/config"]
    (volume,) = [v for v in head(rayjob)["volumes"] if v["name"] == mount["name"]]
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"
                     and o["metadata"]["name"] == volume["configMap"]["name"]]
    return config_map


# Sources of manifests: every kustomization, and render_rayjob on every spec that ships for Kubernetes.
def manifests(source: str) -> list[dict]:
    if source.startswith("render:"):
        return rendered(ROOT / source.removeprefix("render:"))
    return kustomize(source)


SOURCES = RUNS + ["render:configs/celeba-hq-1024-8gpu.yaml", "render:k8s/overlays/cpu-smoke/job.yaml"]


# -- validators -------------------------------------------------------------------------------------------------


def core_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{obj['kind']} {obj['metadata'].get('name')}: {e.message} at {'.'.join(map(str, e.path))}"]
    return []


def _strict(schema: dict) -> dict:
    """A CRD schema that rejects unknown fields, where the API server would drop them silently."""
    schema = dict(schema)
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {k: _strict(v) for k, v in schema[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(s) for s in schema[key]]
    return schema


@functools.cache
def crd_validator(filename: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((SCHEMAS / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(rayjob: dict) -> list[str]:
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"},
               "spec": rayjob["spec"]["rayClusterSpec"]}
    errors = [("RayJob", e) for e in crd_validator("ray.io_rayjobs.yaml").iter_errors(rayjob)]
    errors += [("RayCluster", e) for e in crd_validator("ray.io_rayclusters.yaml").iter_errors(cluster)]
    return [f"{kind}: {e.message} at {'.'.join(map(str, e.absolute_path))}" for kind, e in errors]


def references(obj: object, where: str = "") -> list[tuple[str, str, str | None, str]]:
    """(kind, name, key or None, where) for every Secret or ConfigMap an object's pods would read."""
    found = []
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            found += references(item, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            at = f"{where}.{key}"
            if key in ("secretKeyRef", "configMapKeyRef") and not value.get("optional"):
                found.append(("Secret" if key == "secretKeyRef" else "ConfigMap", value["name"], value["key"], at))
            elif key in ("secretRef", "configMapRef") and not value.get("optional"):
                found.append(("Secret" if key == "secretRef" else "ConfigMap", value["name"], None, at))
            elif key == "volumes":
                for volume in value:
                    source = volume.get("configMap") or volume.get("secret")
                    if source and not source.get("optional"):
                        kind = "ConfigMap" if "configMap" in volume else "Secret"
                        name = source.get("name") or source.get("secretName")
                        keys = [item["key"] for item in source.get("items", [])] or [None]
                        found += [(kind, name, k, f"{at}.{volume['name']}") for k in keys]
            elif key == "authOptions" and value.get("secretName"):
                found.append(("Secret", value["secretName"], "auth_token", at))  # the key KubeRay reads
            else:
                found += references(value, at)
    return found


def missing_references(objects: list[dict], available: list[dict]) -> list[str]:
    keys = {(o["kind"], o["metadata"]["name"]): set(o.get("data", {})) | set(o.get("stringData", {}))
            for o in available if o["kind"] in ("Secret", "ConfigMap")}
    missing = []
    for obj in objects:
        for kind, name, key, where in references(obj):
            if (kind, name) not in keys:
                missing.append(f"{obj['kind']}{where}: {kind} {name} does not exist")
            elif key is not None and key not in keys[kind, name]:
                missing.append(f"{obj['kind']}{where}: {kind} {name} has no key {key}")
    return missing


# -- kustomize and render_rayjob ---------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", RUNS + ["monitoring"])
def test_kustomize_renders_and_core_objects_validate(name):
    objects = kustomize(name)
    assert objects
    core = [o for o in objects if o["kind"] in CORE_KINDS]
    assert core
    assert [e for o in core for e in core_errors(o)] == []


@needs_kubectl
@pytest.mark.parametrize("source", SOURCES)
def test_pod_templates_validate_as_kubernetes_pod_templates(source):
    rayjob = one(manifests(source), "RayJob")
    errors = []
    for role, template in pod_templates(rayjob).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.replace(" ", "-")},
                   "template": template}
        errors += core_errors(wrapped)
    assert errors == []


@needs_kubectl
@needs_crds
@pytest.mark.parametrize("source", SOURCES)
def test_rayjob_validates_against_kuberay_crds(source):
    assert crd_errors(one(manifests(source), "RayJob")) == []


def test_pod_template_validation_catches_a_misspelt_field():
    rayjob = one(rendered(ROOT / "configs/celeba-hq-1024-8gpu.yaml"), "RayJob")
    template = pod_templates(rayjob)["head"]
    template["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalations"] = False
    errors = core_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "h"}, "template": template})
    assert len(errors) == 1 and "allowPrivilegeEscalations" in errors[0]


@needs_crds
def test_crd_validation_catches_a_misspelt_field():
    rayjob = one(rendered(ROOT / "configs/celeba-hq-1024-8gpu.yaml"), "RayJob")
    rayjob["spec"]["shutdownAfterJobFinish"] = rayjob["spec"].pop("shutdownAfterJobFinishes")
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "8"
    errors = crd_errors(rayjob)
    assert any("shutdownAfterJobFinish" in e for e in errors) and any("'8' is not of type" in e for e in errors)


@needs_kubectl
@pytest.mark.parametrize("source", SOURCES)
def test_job_spec_is_mounted_where_the_entrypoint_reads_it(source):
    objects = manifests(source)
    rayjob = one(objects, "RayJob")
    python, flag, module, spec_path = rayjob["spec"]["entrypoint"].split()
    assert (python, flag) == ("python", "-m")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module} is not a module of this repository"
    config_map = job_config_map(objects)
    assert spec_path == "/config/" + next(iter(config_map["data"]))
    spec = parse_spec(config_map["data"]["job.yaml"], source)
    container = head(rayjob)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["progan-metrics"] == spec.metrics_port and ports["metrics"] == 8080
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == max(spec.workers.values())
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == spec.use_gpu


@needs_kubectl
@pytest.mark.parametrize("source", SOURCES)
def test_every_secret_and_config_map_key_exists(source):
    objects = manifests(source)
    found = references(one(objects, "RayJob"))
    assert len(found) == 9  # auth: KubeRay, submitter, head, worker; S3: head and worker twice; the spec volume
    assert {(kind, name, key) for kind, name, key, _ in found} == {
        ("Secret", "progan-ray-auth", "auth_token"),
        ("Secret", "progan-s3", "AWS_ACCESS_KEY_ID"),
        ("Secret", "progan-s3", "AWS_SECRET_ACCESS_KEY"),
        ("ConfigMap", job_config_map(objects)["metadata"]["name"], None),
    }
    assert missing_references(objects, objects + example_secrets()) == []


@needs_kubectl
def test_a_missing_key_or_object_is_caught():
    objects = kustomize("base")
    rayjob = one(objects, "RayJob")
    env = head(rayjob)["containers"][0]["env"]
    next(e for e in env if e["name"] == "AWS_SECRET_ACCESS_KEY")["valueFrom"]["secretKeyRef"]["key"] = "secret"
    head(rayjob)["volumes"][0]["configMap"]["name"] = "progan-job-old"
    missing = missing_references(objects, objects + example_secrets())
    assert len(missing) == 2
    assert any("progan-s3 has no key secret" in m for m in missing)
    assert any("ConfigMap progan-job-old does not exist" in m for m in missing)
    assert missing_references(objects, objects) != []  # the Secrets are not part of the manifests


@needs_kubectl
@pytest.mark.parametrize("source", SOURCES)
def test_pods_are_sized_and_locked_down(source):
    rayjob = one(manifests(source), "RayJob")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 0 and spec["activeDeadlineSeconds"] > 0
    for role, template in pod_templates(rayjob).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000, role
        for container in pod["containers"]:
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[part]), f"{role}: {part}"
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False, role
            assert security["capabilities"]["drop"] == ["ALL"], role
            assert {e["name"] for e in container["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, role


@needs_kubectl
@pytest.mark.parametrize("name", GPU_RUNS)
def test_gpu_workers_request_and_tolerate_gpus(name):
    rayjob = one(kustomize(name), "RayJob")
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "nvidia.com/gpu" not in json.dumps(head(rayjob))


@needs_kubectl
def test_cpu_smoke_needs_no_gpu():
    text = _kustomize(str(K8S / "overlays/cpu-smoke"))
    assert "nvidia.com/gpu" not in text
    assert "image: progan-service:0.1.0-cpu" in text


@needs_kubectl
def test_no_secret_values_in_the_manifests():
    for name in RUNS + ["monitoring"]:
        assert [o for o in kustomize(name) if o["kind"] == "Secret"] == [], name
    for path in [*(K8S / "base").rglob("*.yaml"), *(K8S / "overlays").rglob("*.yaml")]:
        assert "kind: Secret" not in path.read_text(), path
    for secret in example_secrets():
        assert set(secret["stringData"].values()) == {"REPLACE_ME"}


@needs_kubectl
@pytest.mark.parametrize("name", RUNS)
def test_render_rayjob_builds_what_kustomize_builds(name):
    """The Python template and k8s/base agree: rendering an overlay's spec with its image gives its RayJob."""
    objects = kustomize(name)
    rayjob = one(objects, "RayJob")
    image = head(rayjob)["containers"][0]["image"]
    config_map, rendered_job = rendered(K8S / name / "job.yaml", image)
    assert config_map["data"] == job_config_map(objects)["data"]
    assert config_map["metadata"]["labels"] == job_config_map(objects)["metadata"]["labels"]

    def normalised(job: dict) -> dict:
        job = copy.deepcopy(job)
        job["metadata"]["name"] = "-"
        head(job)["volumes"][0]["configMap"]["name"] = "-"
        return job

    assert normalised(rendered_job) == normalised(rayjob)
    assert head(rendered_job)["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]


def test_render_rayjob_sizes_pods_from_the_spec(tmp_path):
    config_map, rayjob = rendered(ROOT / "configs/celeba-hq-1024-8gpu.yaml", "registry/progan:1", namespace="ml",
                                  gpus_per_worker=4)
    assert config_map["metadata"]["namespace"] == rayjob["metadata"]["namespace"] == "ml"
    assert rayjob["metadata"]["name"] == "progan-celeba-hq-1024"
    assert config_map["data"]["job.yaml"] == (ROOT / "configs/celeba-hq-1024-8gpu.yaml").read_text()
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 2  # 8 training workers, 4 GPUs a pod
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "56", "memory": "128Gi", "nvidia.com/gpu": 4}  # 4 × (8 CPUs + 6 data workers)
    images = {c["image"] for t in pod_templates(rayjob).values() for c in t["spec"]["containers"]}
    assert images == {"registry/progan:1"}
    assert missing_references([config_map, rayjob], [config_map, *example_secrets()]) == []


def test_job_names_are_valid_dns_labels():
    assert job_name("celeba-hq-1024") == "progan-celeba-hq-1024"
    assert job_name("9.runs_v2") == "progan-9-runs-v2"
    assert len(job_name("a" * 63)) <= 47 and not job_name("a" * 40 + "-b").endswith("-")


@pytest.mark.parametrize(
    "change, message",
    [
        ("resolution: 48\n", "resolution"),
        ("dataset: data/local\n", "dataset: the pods of a RayJob share no file system"),
        ("storage: runs\n", "storage: the pods of a RayJob share no file system"),
        ("metrics_port: 0\n", "metrics_port: 0 picks a random port"),
    ],
)
def test_render_rayjob_rejects_specs_kubernetes_cannot_run(tmp_path, change, message):
    spec = tmp_path / "job.yaml"
    base = yaml.safe_load((K8S / "base/job.yaml").read_text()) | yaml.safe_load(change)
    spec.write_text(yaml.safe_dump(base))
    with pytest.raises(SpecError, match=message) as e:
        render_rayjob(spec, "progan-service:0.1.0")
    assert str(e.value).startswith(str(spec))


def test_render_rayjob_rejects_zero_gpus_per_worker():
    with pytest.raises(ValueError, match="gpus_per_worker"):
        render_rayjob(K8S / "base/job.yaml", "progan-service:0.1.0", gpus_per_worker=0)


def test_gpu_8x_runs_the_8_gpu_preset():
    """kustomize reads files only inside the overlay, so the overlay holds a copy of the preset."""
    assert (K8S / "overlays/gpu-8x/job.yaml").read_text() == (ROOT / "configs/celeba-hq-1024-8gpu.yaml").read_text()


@needs_kubectl
def test_monitoring_scrapes_the_head_and_ships_the_dashboard():
    objects = kustomize("monitoring")
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    rayjob = one(kustomize("base"), "RayJob")
    head_labels = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= head_labels.items()
    head_ports = {p["name"] for p in head(rayjob)["containers"][0]["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"progan-metrics", "metrics"} <= head_ports
    dashboard = one(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"] == {"progan-training.json": (ROOT / "deploy/grafana/progan-training.json").read_text()}
