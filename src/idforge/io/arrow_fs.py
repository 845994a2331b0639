"""pyarrow's S3 filesystem built from our storage config: the one Ray Train writes its checkpoints through.

Left to itself Ray resolves ``s3://`` with pyarrow's defaults, which means AWS (and whatever credentials chain the
node has). :func:`ray_storage` gives Ray the configured endpoint, the credentials of the environment variables the
config names, the signing region and the CA bundle, the same settings :class:`~idforge.io.storage.S3Storage` uses.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from idforge.io.storage import ca_bundle, resolve_endpoint, s3_credentials, s3_region
from idforge.io.uri import is_s3_uri, parse_s3_uri

if TYPE_CHECKING:
    from idforge.config import StorageConfig

__all__ = ["s3_filesystem", "ray_storage"]


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
