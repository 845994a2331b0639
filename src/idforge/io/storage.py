"""One storage interface over local paths and S3/MinIO (``s3://bucket/key``).

``open_storage(uri_or_path, cfg)`` picks the backend from the URI; every method then takes full URIs (or paths for
the local backend). What both backends promise:

- Writes are atomic: a reader sees the old object or the complete new one, never half. Locally that is a temp file
  renamed into place; on S3 a PUT (or a completed multipart upload) is atomic by protocol, and streams of unknown
  length are spooled to a local temp file first so a failing producer uploads nothing.
- ``list`` is sorted by key (code point order = S3's UTF-8 byte order) and treats its argument as a directory.
- Objects written here carry their sha256 (S3: ``x-amz-meta-sha256``), so directory syncs skip unchanged files
  without downloading them.
- Bad input raises :class:`~idforge.errors.StorageError` with one line naming the URI and the fix.

Credentials come only from the environment variables that :class:`~idforge.config.StorageConfig` names.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, ClassVar, TypeVar
from xml.etree import ElementTree

from idforge.errors import StorageError
from idforge.io.atomic import atomic_path
from idforge.io.uri import (
    S3Location,
    is_local,
    is_s3_uri,
    join_uri,
    local_path,
    parent_uri,
    parse_s3_uri,
    uri_name,
)

if TYPE_CHECKING:
    from idforge.config import StorageConfig

__all__ = [
    "ObjectInfo",
    "SyncResult",
    "COMMIT_LAST",
    "commit_last",
    "Storage",
    "LocalStorage",
    "S3Storage",
    "open_storage",
    "resolve_endpoint",
    "endpoint_url",
    "localize",
    "ENDPOINT_ENV_VARS",
    "s3_credentials",
    "s3_region",
    "ca_bundle",
    # URI helpers, re-exported so callers need one import
    "S3Location",
    "is_local",
    "is_s3_uri",
    "join_uri",
    "local_path",
    "parent_uri",
    "parse_s3_uri",
    "uri_name",
]

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # bytes per read when streaming/hashing: bounded memory whatever the object size
MIN_PART_SIZE = 5 * 1024 * 1024  # the S3 protocol's smallest multipart part (except the last)
# Checked in this order when StorageConfig.endpoint is unset: ours, the AWS SDKs', then MLflow's (so a machine set up
# for an MLflow server on MinIO needs nothing more).
ENDPOINT_ENV_VARS = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_SHA256_META = "sha256"
# What readers open first in each kind of output, uploaded after everything else (the last one last): the curated
# dataset's tables with its manifest last, a prepared cache's index then prepared.json, generate's index then record.
COMMIT_LAST = ("embeddings.npy", "identities.parquet", "report.json", "index.parquet", "generate.json",
               "prepared.json", "manifest.parquet")
_TMP_PREFIX = ".idforge-"
_T = TypeVar("_T")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object or file.

    Attributes:
        uri: its URI (or path, for the local backend), spelled like the URI the caller gave.
        size: bytes.
        mtime: last modification, seconds since the epoch (UTC); None where the server does not say.
        etag: the S3 ETag (None locally).
        sha256: hex digest when known without reading the content (recorded at upload, or computed while writing).
    """

    uri: str
    size: int
    mtime: float | None
    etag: str | None = None
    sha256: str | None = None


@dataclass
class SyncResult:
    """What ``upload_dir``/``download_dir`` did, by path relative to the synced directory ("a/b.png")."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # stale objects removed (upload_dir with prune)

    @property
    def total(self) -> int:
        return len(self.copied) + len(self.skipped)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_hashing(src: IO[bytes], dst: IO[bytes]) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` in chunks; return (bytes copied, sha256 hex)."""
    h = hashlib.sha256()
    n = 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def commit_last(rels: Sequence[str], commit: Sequence[str]) -> list[str]:
    """``rels`` (relative paths) in upload order: everything else sorted, then the commit points in ``commit``'s
    order (a name matches that file, or every file under a folder so named, e.g. a parquet dataset of parts)."""

    def rank(rel: str) -> int:
        for i, name in enumerate(commit):
            if rel == name or rel.startswith(name.rstrip("/") + "/"):
                return i + 1
        return 0

    return sorted(rels, key=lambda rel: (rank(rel), rel))


def _local_files(root: Path) -> list[str]:
    """Relative posix paths of the regular files under ``root``, sorted."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_file():
                out.append(full.relative_to(root).as_posix())
    return sorted(out)


def _checked_relative(rel: str, uri: str) -> str:
    """``rel`` (a listed key relative to the synced prefix) if it is safe to join onto a local directory.

    A key is the server's to name: one spelled ``../x``, ``/etc/x`` or ``a//b`` would otherwise write outside the
    destination (or somewhere unexpected inside it).

    Raises:
        StorageError: an absolute key, an empty, '.' or '..' segment, a backslash or a NUL character.
    """
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or any(p in {"", ".", ".."} for p in parts):
        raise StorageError(f"refusing to download {uri}: its key {rel!r} would not stay inside the destination "
                           "directory (absolute, empty, '.' or '..' segments): rename the object")
    return rel


def _progress(items: list[str], enabled: bool, desc: str):  # type: ignore[no-untyped-def]
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file")


class Storage(ABC):
    """The operations every backend offers. URIs are full (``s3://bucket/key``) or paths (local backend)."""

    scheme: ClassVar[str]

    # ---- primitives each backend implements --------------------------------------------------------------------

    @abstractmethod
    def put_file(self, local: str | os.PathLike[str], uri: str) -> ObjectInfo:
        """Upload/copy the local file ``local`` to ``uri`` atomically; returns what was written (sha256 included)."""

    @abstractmethod
    def get_file(self, uri: str, local: str | os.PathLike[str]) -> Path:
        """Download/copy ``uri`` to the local path ``local`` atomically (temp then rename); returns ``local``."""

    @abstractmethod
    @contextlib.contextmanager
    def open_read(self, uri: str) -> Iterator[BinaryIO]:
        """A binary reader over the object's content (streamed, not read into memory)."""

    @abstractmethod
    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        """A binary writer; the object appears at ``uri`` only if the block exits without an exception."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """True for an object/file, or a directory/prefix that holds at least one (local: any existing path)."""

    @abstractmethod
    def stat(self, uri: str) -> ObjectInfo:
        """Size and mtime of one object/file. Raises StorageError when it does not exist."""

    @abstractmethod
    def list_info(self, prefix: str, recursive: bool = True) -> list[ObjectInfo]:
        """Objects under the directory ``prefix``, sorted by URI; non-recursive listings include sub-directories
        as entries whose URI ends in "/" (size 0, mtime None). A missing directory lists as []."""

    @abstractmethod
    def delete(self, uri: str, recursive: bool = False) -> None:
        """Remove the object/file at ``uri`` (no error if absent); ``recursive`` also removes everything under it."""

    # ---- everything else, shared -------------------------------------------------------------------------------

    def list(self, prefix: str, recursive: bool = True) -> list[str]:
        """URIs under the directory ``prefix``, sorted (see :meth:`list_info`)."""
        return [info.uri for info in self.list_info(prefix, recursive=recursive)]

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as fh:
            return fh.read()

    def write_bytes(self, uri: str, data: bytes) -> ObjectInfo:
        return self.write_stream(uri, io.BytesIO(data))

    def read_text(self, uri: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(uri).decode(encoding)

    def write_text(self, uri: str, text: str, encoding: str = "utf-8") -> ObjectInfo:
        return self.write_bytes(uri, text.encode(encoding))

    @abstractmethod
    def write_stream(self, uri: str, stream: IO[bytes]) -> ObjectInfo:
        """Copy a binary stream to ``uri``; if reading the stream raises, nothing is written (and the exception
        propagates)."""

    def sha256(self, uri: str) -> str:
        """The sha256 hex digest of the content, streamed in 1 MiB chunks (always read, never taken from metadata)."""
        h = hashlib.sha256()
        with self.open_read(uri) as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def _known_sha256(self, info: ObjectInfo) -> str:
        """The digest of a listed object: recorded metadata when the backend has it, else read."""
        return info.sha256 or self.sha256(info.uri)

    def upload_dir(self, local_dir: str | os.PathLike[str], uri: str, progress: bool = False, *,
                   commit: Sequence[str] = COMMIT_LAST, prune: bool = False) -> SyncResult:
        """Copy every file under ``local_dir`` to ``uri``/<relative path>, skipping files whose content (sha256)
        already matches the destination. Each file is written atomically.

        A dataset is published with its commit point last: the files named in ``commit`` (or lying under a folder
        so named; the manifest, the index, the record file) go after everything else, in ``commit``'s order. A
        reader (or an upload killed half-way) therefore sees the previous manifest until the new one is complete,
        and a manifest never names an object that is not there yet. With ``prune``, objects under ``uri`` that
        ``local_dir`` no longer has (an earlier version's) are deleted, after the commit point, so the previous
        manifest stays valid until it is replaced. Without it nothing at the destination is deleted.

        Raises:
            StorageError: ``local_dir`` is not a directory, or the destination fails.
        """
        root = local_path(local_dir)
        if not root.is_dir():
            raise StorageError(f"upload_dir: {root} is not a directory: give the folder to upload")
        remote = {self._rel(uri, info.uri): info for info in self.list_info(uri, recursive=True)}
        result = SyncResult()
        local = _local_files(root)
        for rel in _progress(commit_last(local, commit), progress, f"upload {uri}"):
            src = root / rel
            dest = join_uri(uri, rel)
            have = remote.get(rel)
            if have is not None and have.size == src.stat().st_size:
                # Sizes match: only now is it worth hashing (the remote digest is a HEAD away when recorded).
                if self._known_sha256(self._with_meta(have)) == _sha256_file(src):
                    result.skipped.append(rel)
                    continue
            self.put_file(src, dest)
            result.copied.append(rel)
        if prune:
            keep = set(local)
            for rel in sorted(set(remote) - keep):
                self.delete(join_uri(uri, rel))
                result.deleted.append(rel)
        log.info("upload_dir %s -> %s: %d copied, %d unchanged, %d stale deleted", root, uri, len(result.copied),
                 len(result.skipped), len(result.deleted))
        return result

    def download_dir(self, uri: str, local_dir: str | os.PathLike[str], progress: bool = False) -> SyncResult:
        """Copy every object under ``uri`` to ``local_dir``/<relative key>, skipping files whose sha256 already
        matches. Each file is written atomically; local files with no remote counterpart are left alone.

        Raises:
            StorageError: the prefix holds no objects (a typo in the URI is likelier than an empty dataset).
        """
        root = local_path(local_dir)
        listed = self.list_info(uri, recursive=True)
        if not listed:
            raise StorageError(f"download_dir: no objects under {uri}: check the URI, or upload the data first")
        result = SyncResult()
        for info in _progress(listed, progress, f"download {uri}"):  # type: ignore[arg-type]
            rel = _checked_relative(self._rel(uri, info.uri), info.uri)
            dest = root / rel
            if dest.is_file() and dest.stat().st_size == info.size:
                if self._known_sha256(self._with_meta(info)) == _sha256_file(dest):
                    result.skipped.append(rel)
                    continue
            self.get_file(info.uri, dest)
            result.copied.append(rel)
        log.info("download_dir %s -> %s: %d copied, %d unchanged", uri, root, len(result.copied), len(result.skipped))
        return result

    def _with_meta(self, info: ObjectInfo) -> ObjectInfo:
        """Listings may omit metadata (S3 LIST has no user metadata); backends refresh it here if they can."""
        return info

    @staticmethod
    def _rel(prefix: str, uri: str) -> str:
        """``uri`` relative to the directory ``prefix`` (both as this storage spells them)."""
        base = str(prefix).rstrip("/") + "/"
        if not uri.startswith(base):
            raise StorageError(f"{uri} is not under {prefix}")
        return uri[len(base) :]


# ----------------------------------------------------------------------------------------------------------------
# local filesystem


class LocalStorage(Storage):
    """Plain paths and ``file://`` URIs. URIs returned by ``list`` are spelled like the prefix given."""

    scheme = "file"

    def put_file(self, local: str | os.PathLike[str], uri: str) -> ObjectInfo:
        src = local_path(local)
        if not src.is_file():
            raise StorageError(f"put_file: source {src} is not a file: check the path")
        dest = self._path(uri)
        self._refuse_dir(dest, uri)
        with open(src, "rb") as fin, atomic_path(dest) as tmp, open(tmp, "wb") as fout:
            n, digest = _copy_hashing(fin, fout)
            fout.flush()
            os.fsync(fout.fileno())
        return ObjectInfo(str(uri), n, dest.stat().st_mtime, None, digest)

    def get_file(self, uri: str, local: str | os.PathLike[str]) -> Path:
        src = self._existing_file(uri)
        dest = local_path(local)
        with open(src, "rb") as fin, atomic_path(dest) as tmp, open(tmp, "wb") as fout:
            _copy_hashing(fin, fout)
        return dest

    @contextlib.contextmanager
    def open_read(self, uri: str) -> Iterator[BinaryIO]:
        with open(self._existing_file(uri), "rb") as fh:
            yield fh

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        dest = self._path(uri)
        self._refuse_dir(dest, uri)
        with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
            yield fh  # type: ignore[misc]
            fh.flush()
            os.fsync(fh.fileno())

    def write_stream(self, uri: str, stream: IO[bytes]) -> ObjectInfo:
        with self.open_write(uri) as out:
            n, digest = _copy_hashing(stream, out)
        return ObjectInfo(str(uri), n, self._path(uri).stat().st_mtime, None, digest)

    def exists(self, uri: str) -> bool:
        return self._path(uri).exists()

    def stat(self, uri: str) -> ObjectInfo:
        st = self._existing_file(uri).stat()
        return ObjectInfo(str(uri), st.st_size, st.st_mtime)

    def list_info(self, prefix: str, recursive: bool = True) -> list[ObjectInfo]:
        root = self._path(prefix)
        if not root.is_dir():
            return []
        out: list[ObjectInfo] = []
        if recursive:
            for rel in _local_files(root):
                st = (root / rel).stat()
                out.append(ObjectInfo(join_uri(prefix, rel), st.st_size, st.st_mtime))
        else:
            for child in root.iterdir():
                if child.is_dir():
                    out.append(ObjectInfo(join_uri(prefix, child.name) + "/", 0, None))
                elif child.is_file():
                    st = child.stat()
                    out.append(ObjectInfo(join_uri(prefix, child.name), st.st_size, st.st_mtime))
        return sorted(out, key=lambda i: i.uri)

    def delete(self, uri: str, recursive: bool = False) -> None:
        path = self._path(uri)
        if path.is_dir() and not path.is_symlink():
            if not recursive:
                raise StorageError(f"delete: {uri} is a directory: pass recursive=True to remove it and its contents")
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    # helpers

    @staticmethod
    def _path(uri: str | os.PathLike[str]) -> Path:
        if isinstance(uri, str) and is_s3_uri(uri):
            raise StorageError(f"{uri} is an S3 URI but this storage is local: open it with open_storage({uri!r})")
        return local_path(uri)

    def _existing_file(self, uri: str) -> Path:
        path = self._path(uri)
        if path.is_dir():
            raise StorageError(f"{uri} is a directory, not a file: name a file inside it (or use download_dir)")
        if not path.exists():
            raise StorageError(f"{uri} does not exist: check the path")
        return path

    @staticmethod
    def _refuse_dir(path: Path, uri: str) -> None:
        if path.is_dir():
            raise StorageError(f"cannot write {uri}: it is a directory; name a file inside it")


# ----------------------------------------------------------------------------------------------------------------
# S3 / MinIO


def resolve_endpoint(cfg: StorageConfig | None = None, env: Mapping[str, str] | None = None) -> tuple[str, bool, str]:
    """Where the S3 API is: ``(host:port, secure, source)``.

    ``cfg.endpoint`` wins, then the first of :data:`ENDPOINT_ENV_VARS` that is set, then AWS
    (``s3.amazonaws.com`` over https). ``http://`` / ``https://`` prefixes set ``secure``; a bare ``host:port``
    uses ``cfg.secure``. ``source`` names where the value came from, for error messages.
    """
    env = os.environ if env is None else env
    raw, source = (cfg.endpoint, "storage.endpoint") if cfg is not None and cfg.endpoint else (None, "")
    if raw is None:
        for name in ENDPOINT_ENV_VARS:
            if env.get(name):
                raw, source = env[name], f"${name}"
                break
    secure = bool(cfg.secure) if cfg is not None else False
    if raw is None:
        return "s3.amazonaws.com", True, "the AWS default"
    raw = raw.strip()
    lowered = raw.lower()
    if lowered.startswith("http://"):
        raw, secure = raw[7:], False
    elif lowered.startswith("https://"):
        raw, secure = raw[8:], True
    elif "://" in raw:
        raise StorageError(f"S3 endpoint {raw!r} (from {source}) must be host:port or http(s)://host:port")
    host, _, path = raw.partition("/")
    if path.strip("/"):
        raise StorageError(
            f"S3 endpoint {raw!r} (from {source}) has a path {path!r}: give only http(s)://host:port"
        )
    if not host:
        raise StorageError(f"S3 endpoint from {source} is empty: set it to http(s)://host:port")
    return host, secure, source


def endpoint_url(cfg: StorageConfig | None = None, env: Mapping[str, str] | None = None) -> str:
    """The endpoint as a URL (``http://127.0.0.1:9000``), the form DVC, MLflow and boto3 want."""
    host, secure, _ = resolve_endpoint(cfg, env)
    return f"{'https' if secure else 'http'}://{host}"


def s3_credentials(cfg: StorageConfig, url: str) -> tuple[str, str]:
    """(access key, secret key) from the environment variables ``cfg`` names.

    Raises:
        StorageError: either is unset, naming the variables to set.
    """
    access = os.environ.get(cfg.access_key_env)
    secret = os.environ.get(cfg.secret_key_env)
    if not access or not secret:
        missing = [n for n, v in ((cfg.access_key_env, access), (cfg.secret_key_env, secret)) if not v]
        raise StorageError(
            f"no S3 credentials for {url}: set {' and '.join('$' + m for m in missing)} in the environment "
            "(storage.access_key_env/secret_key_env name other variables)"
        )
    return access, secret


def s3_region(cfg: StorageConfig, endpoint: str) -> str | None:
    """The signing region: ``cfg.region``, ``$AWS_REGION``/``$AWS_DEFAULT_REGION``, else us-east-1 off AWS.

    A region must be given for non-AWS endpoints: otherwise clients ask each bucket for its location first, a call
    some S3 servers answer in a form the clients reject. MinIO, SeaweedFS and most S3 servers accept us-east-1.
    """
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and not endpoint.endswith("amazonaws.com"):
        region = "us-east-1"
    return region


def ca_bundle(cfg: StorageConfig) -> str | None:
    """The CA bundle S3 clients verify the endpoint with: ``storage.ca_bundle``, else ``$SSL_CERT_FILE``, else None
    (each client's default trust store).

    Raises:
        StorageError: the configured file does not exist.
    """
    path = cfg.ca_bundle or os.environ.get("SSL_CERT_FILE") or None
    if cfg.ca_bundle and not Path(cfg.ca_bundle).is_file():
        raise StorageError(f"storage.ca_bundle {cfg.ca_bundle} is not a file: give the PEM file of the S3 CA")
    return path


_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "ServiceBusy"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


class S3Storage(Storage):
    """S3 API through the ``minio`` client.

    Args:
        cfg: endpoint, TLS, region and the *names* of the credential env vars.
        part_size: multipart part size in bytes (>= 5 MiB); 0 lets minio choose (files above 5 MiB go multipart).
        connect_timeout, read_timeout: seconds; retries: attempts after the first on connection errors and 5xx.
    """

    scheme = "s3"

    def __init__(
        self,
        cfg: StorageConfig | None = None,
        *,
        part_size: int = 0,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        retries: int = 2,
    ) -> None:
        from idforge.config import StorageConfig

        self.cfg = cfg or StorageConfig()
        if part_size and part_size < MIN_PART_SIZE:
            raise StorageError(f"S3 part_size {part_size} is below the protocol minimum {MIN_PART_SIZE} (5 MiB)")
        self.part_size = part_size
        self.endpoint, self.secure, self._endpoint_source = resolve_endpoint(self.cfg)
        access, secret = s3_credentials(self.cfg, self.url)
        self._client = self._make_client(access, secret, connect_timeout, read_timeout, retries)

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def _make_client(  # type: ignore[no-untyped-def]
        self, access: str, secret: str, connect_timeout: float, read_timeout: float, retries: int
    ):
        import certifi
        import urllib3
        from minio import Minio

        # minio's own pool waits 5 minutes to connect and retries 5 times: an unreachable endpoint would hang a stage.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_bundle(self.cfg) or certifi.where(),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        return Minio(
            self.endpoint,
            access_key=access,
            secret_key=secret,
            session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
            secure=self.secure,
            region=s3_region(self.cfg, self.endpoint),
            http_client=http,
        )

    @property
    def client(self):  # type: ignore[no-untyped-def]
        """The underlying ``minio.Minio`` client (presigned URLs, bucket admin)."""
        return self._client

    # ---- error translation ----------------------------------------------------------------------------------------

    def _error(self, exc: BaseException, uri: str, loc: S3Location | None = None) -> StorageError:
        """One-line StorageError for a minio/urllib3 failure on ``uri``."""
        import urllib3.exceptions
        from minio.error import InvalidResponseError, S3Error, ServerError

        code: str | None = None
        if isinstance(exc, S3Error):
            code = exc.code
        elif isinstance(exc, InvalidResponseError):
            # Some servers (rclone's) send error XML as text/xml, which minio refuses to parse: read the code here.
            code = _xml_error_code(getattr(exc, "_body", None)) or f"HTTP {getattr(exc, '_code', '?')}"
        if isinstance(exc, urllib3.exceptions.SSLError) or (
            isinstance(exc, urllib3.exceptions.MaxRetryError) and isinstance(exc.reason, urllib3.exceptions.SSLError)
        ):
            reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
            return StorageError(
                f"TLS with the S3 endpoint {self.url} failed for {uri} ({str(reason).splitlines()[0][:160]}): "
                "if it uses a private CA, set storage.ca_bundle (or $SSL_CERT_FILE) to that CA's PEM file"
            )
        if isinstance(exc, urllib3.exceptions.MaxRetryError) and isinstance(
            exc.reason, urllib3.exceptions.ResponseError
        ):
            return StorageError(f"S3 server {self.url} keeps failing on {uri} ({exc.reason}): retry later or check it")
        if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)) and code is None:
            return StorageError(
                f"cannot reach the S3 endpoint {self.url} (from {self._endpoint_source}) for {uri}: start the server "
                "or set S3_ENDPOINT_URL or storage.endpoint to a reachable http(s)://host:port"
            )
        if code in {"NoSuchBucket"} or (code == "NoSuchKey" and loc is not None and not self._bucket_exists(loc)):
            bucket = loc.bucket if loc else "?"
            return StorageError(f"bucket {bucket!r} does not exist at {self.url} (for {uri}): create it or fix the URI")
        if code in {"NoSuchKey", "NotFound", "HTTP 404"}:
            return StorageError(f"{uri} does not exist at {self.url}: check the key, or upload it first")
        if code in _DENIED:
            return StorageError(
                f"access to {uri} denied by {self.url} ({code}): check ${self.cfg.access_key_env} and "
                f"${self.cfg.secret_key_env}"
            )
        if isinstance(exc, ServerError):
            return StorageError(f"S3 server {self.url} failed on {uri} (HTTP {exc.status_code}): retry or check it")
        return StorageError(f"S3 request for {uri} at {self.url} failed ({code or type(exc).__name__}): {exc}")

    def _bucket_exists(self, loc: S3Location) -> bool:
        try:
            return bool(self._client.bucket_exists(loc.bucket))
        except Exception:  # noqa: BLE001 - only used to pick an error message; the caller raises anyway
            return True

    @contextlib.contextmanager
    def _errors(self, uri: str, loc: S3Location | None = None) -> Iterator[None]:
        import urllib3.exceptions
        from minio.error import MinioException

        try:
            yield
        except (MinioException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            raise self._error(exc, uri, loc) from exc

    def _transient(self, exc: BaseException) -> bool:
        """True for failures worth waiting out: no connection, a timeout, a 5xx, SlowDown (not TLS, 4xx, 404)."""
        import urllib3.exceptions
        from minio.error import InvalidResponseError, S3Error, ServerError

        if isinstance(exc, S3Error):
            return exc.code in _TRANSIENT_CODES
        if isinstance(exc, ServerError):
            return exc.status_code >= 500
        if isinstance(exc, InvalidResponseError):
            return int(getattr(exc, "_code", 0) or 0) >= 500
        reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
        if isinstance(reason, urllib3.exceptions.SSLError):
            return False
        return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))

    def _call(self, uri: str, loc: S3Location | None, fn: Callable[[], _T]) -> _T:
        """``fn()`` retried on transient failures with exponential backoff and full jitter for up to
        ``storage.retry_total_s``; then (or on any other failure) the one-line StorageError of :meth:`_error`."""
        deadline = time.monotonic() + self.cfg.retry_total_s
        attempt = 0
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - sorted into transient (retry) and final (StorageError)
                left = deadline - time.monotonic()
                if not self._transient(exc) or left <= 0:
                    raise self._error(exc, uri, loc) from exc
                wait = min(left, random.uniform(0, min(self.cfg.retry_max_wait_s, self.cfg.retry_base_s * 2**attempt)))
                attempt += 1
                log.warning("S3 %s failed (%s), retry %d in %.1fs (%.0fs of retrying left)", uri,
                            type(exc).__name__, attempt, wait, left)
                time.sleep(wait)

    @staticmethod
    def _is_missing(exc: BaseException) -> bool:
        from minio.error import InvalidResponseError, S3Error

        if isinstance(exc, S3Error):
            return exc.code in {"NoSuchKey", "NotFound"}
        if isinstance(exc, InvalidResponseError):
            return _xml_error_code(getattr(exc, "_body", None)) == "NoSuchKey"
        return False

    def _is_object(self, loc: S3Location) -> bool:
        """True if an object exists at exactly ``loc`` (a HEAD); other failures raise StorageError."""
        def head() -> bool:
            try:
                self._client.stat_object(loc.bucket, loc.key)
                return True
            except Exception as exc:  # noqa: BLE001 - a missing key is an answer; the rest goes to _call
                if self._is_missing(exc):
                    return False
                raise

        return self._call(loc.uri, loc, head)

    def _loc(self, uri: str, need_key: bool = True) -> S3Location:
        loc = parse_s3_uri(uri)
        if need_key and not loc.key:
            raise StorageError(f"{uri} names a bucket, not an object: add the key (s3://bucket/path/to/object)")
        return loc

    # ---- primitives ---------------------------------------------------------------------------------------------

    def put_file(self, local: str | os.PathLike[str], uri: str) -> ObjectInfo:
        src = local_path(local)
        loc = self._loc(uri)
        if not src.is_file():
            raise StorageError(f"put_file: source {src} is not a file: check the path")
        digest = _sha256_file(src)  # recorded as metadata, so later syncs compare without downloading
        size = src.stat().st_size
        result = self._call(uri, loc, lambda: self._client.fput_object(
            loc.bucket, loc.key, str(src), metadata={_SHA256_META: digest}, part_size=self.part_size,
        ))  # fmt: skip
        mtime = result.last_modified.timestamp() if getattr(result, "last_modified", None) else None
        log.debug("put %s -> %s (%d bytes, etag %s)", src, uri, size, result.etag)
        return ObjectInfo(uri, size, mtime, result.etag, digest)

    def get_file(self, uri: str, local: str | os.PathLike[str]) -> Path:
        dest = local_path(local)
        loc = self._loc(uri)
        # A connection lost mid-body restarts this object's download (whole objects are the unit of resume).
        return self._call(uri, loc, lambda: self._get_once(uri, loc, dest))

    def _get_once(self, uri: str, loc: S3Location, dest: Path) -> Path:
        response = self._client.get_object(loc.bucket, loc.key)
        try:
            with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
                _, digest = _copy_hashing(response, fh)
                recorded = response.headers.get(f"x-amz-meta-{_SHA256_META}")
                if recorded and recorded != digest:
                    raise StorageError(
                        f"download of {uri} is corrupt (sha256 {digest[:12]}... != recorded {recorded[:12]}...): retry"
                    )
        finally:
            response.close()
            response.release_conn()
        return dest

    @contextlib.contextmanager
    def open_read(self, uri: str) -> Iterator[BinaryIO]:
        loc = self._loc(uri)
        with self._errors(uri, loc):
            response = self._client.get_object(loc.bucket, loc.key)
        try:
            with self._errors(uri, loc):
                yield response  # urllib3 response: .read(n) streams
        finally:
            response.close()
            response.release_conn()

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        self._loc(uri)
        # Spool locally: the sha256 must be known before the upload starts (it travels as metadata), and a producer
        # that fails half-way must upload nothing.
        with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX) as tmpdir:
            spool = Path(tmpdir) / "spool"
            with open(spool, "wb") as fh:
                yield fh  # type: ignore[misc]
            self.put_file(spool, uri)

    def write_bytes(self, uri: str, data: bytes) -> ObjectInfo:
        # Already in memory: no spool file needed, and a single PUT (or multipart above 5 MiB) is atomic.
        loc = self._loc(uri)
        digest = hashlib.sha256(data).hexdigest()
        result = self._call(uri, loc, lambda: self._client.put_object(
            loc.bucket, loc.key, io.BytesIO(data), len(data), metadata={_SHA256_META: digest},
            part_size=self.part_size,
        ))  # fmt: skip
        return ObjectInfo(uri, len(data), None, result.etag, digest)

    def write_stream(self, uri: str, stream: IO[bytes]) -> ObjectInfo:
        self._loc(uri)
        with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX) as tmpdir:
            spool = Path(tmpdir) / "spool"
            with open(spool, "wb") as fh:
                _copy_hashing(stream, fh)
            return self.put_file(spool, uri)

    def exists(self, uri: str) -> bool:
        loc = parse_s3_uri(uri)
        if not loc.key:
            with self._errors(uri, loc):
                return bool(self._client.bucket_exists(loc.bucket))
        if self._is_object(loc):
            return True
        # Not an object; a "directory" exists if something lives under it (the listing also surfaces a missing bucket).
        with self._errors(uri, loc):
            for _ in self._client.list_objects(loc.bucket, prefix=loc.as_prefix(), recursive=True):
                return True
        return False

    def stat(self, uri: str) -> ObjectInfo:
        loc = self._loc(uri)
        st = self._call(uri, loc, lambda: self._client.stat_object(loc.bucket, loc.key))
        meta = st.metadata or {}
        return ObjectInfo(
            uri,
            int(st.size or 0),
            st.last_modified.timestamp() if st.last_modified else None,
            (st.etag or "").strip('"') or None,
            meta.get(f"x-amz-meta-{_SHA256_META}") or None,
        )

    def list_info(self, prefix: str, recursive: bool = True) -> list[ObjectInfo]:
        loc = parse_s3_uri(prefix)
        base = prefix.rstrip("/")
        key_prefix = loc.as_prefix()
        out: list[ObjectInfo] = []
        listing = self._call(prefix, loc, lambda: list(
            self._client.list_objects(loc.bucket, prefix=key_prefix, recursive=recursive)))
        for obj in listing:
            rel = obj.object_name[len(key_prefix) :]
            if not rel or (recursive and rel.endswith("/")):
                continue  # directory-marker objects some tools create
            if obj.is_dir:
                out.append(ObjectInfo(join_uri(base, rel.rstrip("/")) + "/", 0, None))
            else:
                mtime = obj.last_modified.timestamp() if obj.last_modified else None
                etag = (obj.etag or "").strip('"') or None
                out.append(ObjectInfo(join_uri(base, rel), int(obj.size or 0), mtime, etag))
        return sorted(out, key=lambda i: i.uri)

    def delete(self, uri: str, recursive: bool = False) -> None:
        from minio.deleteobjects import DeleteObject

        loc = parse_s3_uri(uri)
        if not loc.key and not recursive:
            raise StorageError(f"delete {uri}: that is a whole bucket; pass recursive=True to empty it")
        with self._errors(uri, loc):
            if not recursive:
                self._client.remove_object(loc.bucket, loc.key)
                return
            listing = self._client.list_objects(loc.bucket, prefix=loc.as_prefix(), recursive=True)
            keys = [o.object_name for o in listing]
            # The key itself only if it is an object: servers that map keys onto a filesystem (rclone) refuse to
            # delete a key that is a directory there.
            if loc.key and self._is_object(loc):
                keys.append(loc.key)
            if keys:
                errors = list(self._client.remove_objects(loc.bucket, (DeleteObject(k) for k in keys)))
                if errors:
                    first = errors[0]
                    raise StorageError(
                        f"delete {uri}: {len(errors)} objects could not be removed (first: {first.name}: "
                        f"{first.code}): check permissions"
                    )

    def _with_meta(self, info: ObjectInfo) -> ObjectInfo:
        # LIST carries no user metadata; a HEAD fetches the recorded sha256 (cheaper than reading the object).
        return info if info.sha256 else self.stat(info.uri)


def _xml_error_code(body: str | None) -> str | None:
    if not body:
        return None
    try:
        return ElementTree.fromstring(body.encode() if isinstance(body, str) else body).findtext("Code")
    except ElementTree.ParseError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# entry points


def open_storage(uri_or_path: str | os.PathLike[str], cfg: StorageConfig | None = None, **s3_options: Any) -> Storage:
    """The backend for ``uri_or_path``: :class:`S3Storage` for ``s3://``, :class:`LocalStorage` for paths and
    ``file://``. ``s3_options`` go to :class:`S3Storage` (part_size, timeouts, retries).

    Raises:
        StorageError: another scheme (gs://, http://...), a malformed s3 URI, or missing S3 credentials.
    """
    if isinstance(uri_or_path, str) and is_s3_uri(uri_or_path):
        parse_s3_uri(uri_or_path)
        return S3Storage(cfg, **s3_options)
    if is_local(uri_or_path):
        local_path(uri_or_path)  # validates file:// hosts
        return LocalStorage()
    scheme = str(uri_or_path).split("://", 1)[0]
    raise StorageError(f"unsupported storage scheme {scheme!r} in {uri_or_path!r}: use a local path, file:// or s3://")


def localize(
    uri: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    cfg: StorageConfig | None = None,
    progress: bool = False,
) -> Path:
    """A local path holding the content of ``uri`` (a file/object or a directory/prefix), for stages that need
    local files.

    Local inputs are returned as they are (after checking they exist). S3 inputs are downloaded once into
    ``cache_dir/<digest>`` where the digest covers every object's relative key, size and ETag: a second call on
    unchanged content does one LIST and no downloads, and changed content lands in a new directory. The cache entry
    appears atomically (downloaded to a temp directory, then renamed).

    Returns:
        the local directory, or for a single object the file inside its cache directory.
    Raises:
        StorageError: nothing exists at ``uri``.
    """
    storage = open_storage(uri, cfg)
    if isinstance(storage, LocalStorage):
        path = local_path(uri)
        if not path.exists():
            raise StorageError(f"localize: {uri} does not exist: check the path")
        return path
    assert isinstance(uri, str)
    cache = local_path(cache_dir)
    single: ObjectInfo | None = None
    loc = parse_s3_uri(uri)
    if loc.key:
        try:
            single = storage.stat(uri)
        except StorageError:
            single = None
    entries = [(uri_name(uri), single)] if single else [(storage._rel(uri, i.uri), i) for i in storage.list_info(uri)]
    if not entries:
        raise StorageError(f"localize: nothing at {uri}: check the URI or upload the data first")
    manifest = [[rel, info.size, info.etag or info.sha256 or ""] for rel, info in entries if info is not None]
    digest = hashlib.sha256(json.dumps(manifest, separators=(",", ":")).encode()).hexdigest()[:32]
    target = cache / digest
    if target.is_dir():
        log.debug("localize %s: cache hit %s", uri, target)
    else:
        # A fixed partial directory, not a fresh temp one: a localize killed or failed at object 9000 keeps the
        # objects it completed, and the rerun's download_dir skips each one whose size and sha256 match.
        partial = cache / f"{digest}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        if single is not None:
            storage.get_file(uri, partial / uri_name(uri))
        else:
            storage.download_dir(uri, partial, progress=progress)
        os.replace(partial, target)
        log.info("localize %s -> %s (%d files)", uri, target, len(manifest))
    return target / uri_name(uri) if single is not None else target
