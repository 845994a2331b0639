"""Storage URIs: ``s3://bucket/key`` for object stores, plain paths or ``file://`` URIs for local files.

Pure string handling, no I/O, so every stage can validate its inputs before touching a network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from idforge.errors import StorageError

__all__ = ["S3Location", "is_s3_uri", "is_local", "parse_s3_uri", "local_path", "join_uri", "parent_uri", "uri_name"]

# S3 bucket naming rules (the subset every S3 server enforces): 3-63 chars, lowercase letters, digits, dots, hyphens,
# starting and ending with a letter or digit.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


@dataclass(frozen=True)
class S3Location:
    """A parsed ``s3://bucket/key``; ``key`` is "" for the bucket root and never starts with "/"."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def as_prefix(self) -> str:
        """The key as a directory prefix ("" for the bucket root, else ending in "/")."""
        return self.key.rstrip("/") + "/" if self.key.strip("/") else ""


def _scheme(uri: str) -> str | None:
    m = _SCHEME_RE.match(uri)
    return m.group(1).lower() if m else None


def is_s3_uri(uri: str | os.PathLike[str]) -> bool:
    return isinstance(uri, str) and _scheme(uri) in {"s3", "s3a"}


def is_local(uri: str | os.PathLike[str]) -> bool:
    """True for plain paths and ``file://`` URIs; other schemes (``gs://``...) are neither local nor S3."""
    if not isinstance(uri, str):
        return True
    scheme = _scheme(uri)
    return scheme is None or scheme == "file"


def parse_s3_uri(uri: str) -> S3Location:
    """Split ``s3://bucket/key`` into bucket and key.

    Raises:
        StorageError: not an s3:// URI, no bucket, an invalid bucket name, or an empty path segment in the key.
    """
    if not isinstance(uri, str) or not is_s3_uri(uri):
        raise StorageError(f"{uri!r} is not an S3 URI: write it as s3://bucket/key")
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"S3 URI {uri!r} has no bucket: write it as s3://bucket/key")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise StorageError(
            f"S3 URI {uri!r} has an invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, '.' or '-'"
        )
    key = key.rstrip("/") if key.strip("/") else ""
    if key.startswith("/") or "//" in key:
        raise StorageError(f"S3 URI {uri!r} has an empty path segment ('//'): remove the extra slash")
    if any(part in {".", ".."} for part in key.split("/")):
        raise StorageError(f"S3 URI {uri!r} contains '.' or '..' segments: write the key out in full")
    return S3Location(bucket, key)


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The local path of a plain path or ``file://`` URI.

    Raises:
        StorageError: the URI has another scheme (s3://, gs://, ...) or a ``file://`` URI names a remote host.
    """
    if not isinstance(uri, str):
        return Path(uri)
    scheme = _scheme(uri)
    if scheme is None:
        return Path(uri)
    if scheme != "file":
        raise StorageError(f"{uri!r} is not a local path: give a path, a file:// URI, or an s3:// URI")
    parts = urlsplit(uri)
    if parts.netloc not in {"", "localhost"}:
        raise StorageError(f"file URI {uri!r} names host {parts.netloc!r}: use file:///absolute/path")
    return Path(unquote(parts.path))


def join_uri(base: str | os.PathLike[str], *parts: str) -> str:
    """Join key/path segments onto a URI or path with "/" (``join_uri("s3://b/x", "y/z") == "s3://b/x/y/z"``)."""
    out = str(base) if not isinstance(base, str) else base
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        out = part if not out else (out if out.endswith("/") else out + "/") + part
    return out


def parent_uri(uri: str) -> str:
    """The URI one level up (``s3://b/x/y`` -> ``s3://b/x``); the bucket root is its own parent."""
    if is_s3_uri(uri):
        loc = parse_s3_uri(uri)
        return S3Location(loc.bucket, loc.key.rpartition("/")[0]).uri
    return str(local_path(uri).parent)


def uri_name(uri: str | os.PathLike[str]) -> str:
    """The last segment (file or object name) of a URI or path."""
    if isinstance(uri, str) and is_s3_uri(uri):
        loc = parse_s3_uri(uri)
        return loc.key.rpartition("/")[2] or loc.bucket
    return local_path(uri).name
