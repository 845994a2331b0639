"""The S3 clients besides minio, configured from the same StorageConfig (endpoint, credentials from the
environment, region, TLS and its CA bundle), so none of them falls back to AWS or to its own trust store.

- pyarrow's ``S3FileSystem``: what Ray Train writes its checkpoints through. Left to itself Ray resolves ``s3://``
  with pyarrow's defaults, which means AWS (and whatever credentials chain the node has); :func:`ray_storage` gives
  it the configured endpoint.
- DVC (s3fs underneath): :func:`dvc_remote_options` are the ``dvc remote modify`` settings of a remote on the
  configured endpoint. Credentials are not among them: DVC reads them from the same environment variables.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from idforge.io.storage import ca_bundle, endpoint_url, resolve_endpoint, s3_credentials, s3_region
from idforge.io.uri import is_s3_uri, parse_s3_uri

if TYPE_CHECKING:
    from idforge.config import StorageConfig

__all__ = ["s3_filesystem", "ray_storage", "dvc_remote_options"]


def s3_filesystem(cfg: StorageConfig | None = None, *, connect_timeout_s: float = 5.0,
                  request_timeout_s: float = 120.0) -> Any:
    """A ``pyarrow.fs.S3FileSystem`` on the configured endpoint (TLS and CA bundle included).

    Raises:
        StorageError: no credentials in the environment, a malformed endpoint, a missing CA bundle.
    """
    from pyarrow.fs import S3FileSystem

    from idforge.config import StorageConfig

    cfg = cfg or StorageConfig()
    host, secure, _ = resolve_endpoint(cfg)
    url = f"{'https' if secure else 'http'}://{host}"
    access, secret = s3_credentials(cfg, url)
    return S3FileSystem(
        access_key=access, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        region=s3_region(cfg, host), scheme="https" if secure else "http",
        endpoint_override=None if host == "s3.amazonaws.com" else host, tls_ca_file_path=ca_bundle(cfg),
        connect_timeout=connect_timeout_s, request_timeout=request_timeout_s,
    )  # fmt: skip


def ray_storage(storage_path: str, cfg: StorageConfig | None = None) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``.

    An ``s3://bucket/prefix`` becomes ``bucket/prefix`` on :func:`s3_filesystem` (with a filesystem given, Ray takes
    paths without a scheme); a local path is returned as is with ``None`` (Ray's local filesystem).
    """
    if not is_s3_uri(storage_path):
        return storage_path, None
    loc = parse_s3_uri(storage_path)
    return f"{loc.bucket}/{loc.key}".rstrip("/"), s3_filesystem(cfg)


def dvc_remote_options(cfg: StorageConfig | None = None) -> dict[str, str]:
    """``{option: value}`` for ``dvc remote modify REMOTE OPTION VALUE``: the endpoint URL, the signing region and,
    with a CA bundle, ``ssl_verify`` pointing at it (DVC's S3 remote verifies TLS against that file)."""
    from idforge.config import StorageConfig

    cfg = cfg or StorageConfig()
    host, _, _ = resolve_endpoint(cfg)
    options = {"endpointurl": endpoint_url(cfg)}
    region = s3_region(cfg, host)
    if region:
        options["region"] = region
    bundle = ca_bundle(cfg)
    if bundle:
        options["ssl_verify"] = bundle
    return options
