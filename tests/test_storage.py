"""Storage: the same test bodies against local paths and a real S3 server on 127.0.0.1 (tests/fixtures/s3.py)."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from idforge.config import StorageConfig
from idforge.errors import StorageError
from idforge.io.storage import (
    LocalStorage,
    ObjectInfo,
    S3Storage,
    Storage,
    endpoint_url,
    localize,
    open_storage,
    resolve_endpoint,
)
from idforge.io.uri import join_uri, parent_uri, parse_s3_uri, uri_name
from tests.fixtures.s3 import S3Server, closed_loopback_port

MiB = 1024 * 1024


@dataclass
class Backend:
    kind: str
    storage: Storage
    root: str  # a directory URI no other test uses

    def uri(self, rel: str) -> str:
        return join_uri(self.root, rel)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        root = str(tmp_path / "store")
        return Backend("local", open_storage(root), root)
    request.getfixturevalue("s3_env")
    prefix = request.getfixturevalue("s3_prefix")
    return Backend("s3", open_storage(prefix), prefix)


def _random(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(n) if n <= 4 * MiB else os.urandom(n)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class FailingReader:
    """A stream that yields ``good`` bytes and then raises, as a crashing producer would."""

    def __init__(self, good: int) -> None:
        self.left = good

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError("producer died half-way")
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"x" * n


# ---------------------------------------------------------------------------------------------------------------
# the same body on both backends


def test_open_storage_picks_backend(backend: Backend) -> None:
    assert isinstance(backend.storage, LocalStorage if backend.kind == "local" else S3Storage)


def test_put_get_round_trip(backend: Backend, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    payload = _random(300_000, seed=1)
    src.write_bytes(payload)
    info = backend.storage.put_file(src, backend.uri("dir/obj.bin"))
    assert info.size == len(payload)
    assert info.sha256 == hashlib.sha256(payload).hexdigest()

    dest = tmp_path / "out" / "nested" / "copy.bin"
    assert backend.storage.get_file(backend.uri("dir/obj.bin"), dest) == dest
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.bin"]  # no temp files left behind


def test_bytes_and_text(backend: Backend) -> None:
    s = backend.storage
    s.write_bytes(backend.uri("b.bin"), b"\x00\x01\xff")
    assert s.read_bytes(backend.uri("b.bin")) == b"\x00\x01\xff"
    s.write_text(backend.uri("t.txt"), "visage – 顔\n")
    assert s.read_text(backend.uri("t.txt")) == "visage – 顔\n"
    s.write_text(backend.uri("t.txt"), "replaced")  # overwrite replaces, never appends
    assert s.read_text(backend.uri("t.txt")) == "replaced"
    s.write_bytes(backend.uri("empty"), b"")
    assert s.read_bytes(backend.uri("empty")) == b""
    assert s.stat(backend.uri("empty")).size == 0


def test_list_is_sorted_and_recursive_by_directory(backend: Backend) -> None:
    s = backend.storage
    for rel in ["b.txt", "a/2.txt", "a/1.txt", "a/sub/3.txt", "ab/x.txt", "Z.txt"]:
        s.write_text(backend.uri(rel), rel)
    rels = lambda uris: [u[len(backend.root) + 1 :] for u in uris]  # noqa: E731

    assert rels(s.list(backend.root)) == ["Z.txt", "a/1.txt", "a/2.txt", "a/sub/3.txt", "ab/x.txt", "b.txt"]
    assert rels(s.list(backend.root, recursive=False)) == ["Z.txt", "a/", "ab/", "b.txt"]
    # "a" is a directory: its listing must not pick up the sibling "ab/" that merely shares the prefix.
    assert rels(s.list(backend.uri("a"))) == ["a/1.txt", "a/2.txt", "a/sub/3.txt"]
    assert rels(s.list(backend.uri("a") + "/", recursive=False)) == ["a/1.txt", "a/2.txt", "a/sub/"]
    assert s.list(backend.uri("nothing-here")) == []
    sizes = {i.uri[len(backend.root) + 1 :]: i.size for i in s.list_info(backend.root)}
    assert sizes["a/sub/3.txt"] == len("a/sub/3.txt")


def test_exists_stat_and_delete(backend: Backend) -> None:
    s = backend.storage
    s.write_bytes(backend.uri("d/one"), b"1234")
    s.write_bytes(backend.uri("d/sub/two"), b"5")
    before = time.time()
    assert s.exists(backend.uri("d/one"))
    assert s.exists(backend.uri("d"))  # a directory that holds objects exists on both backends
    assert not s.exists(backend.uri("d/missing"))

    st = s.stat(backend.uri("d/one"))
    assert st.size == 4
    assert st.mtime is not None and abs(st.mtime - before) < 120

    s.delete(backend.uri("d/one"))
    assert not s.exists(backend.uri("d/one"))
    s.delete(backend.uri("d/one"))  # deleting what is gone is not an error
    s.delete(backend.uri("d"), recursive=True)
    assert not s.exists(backend.uri("d/sub/two"))
    assert s.list(backend.uri("d")) == []


def test_sha256_equals_hashlib(backend: Backend) -> None:
    payload = _random(2 * MiB + 12345, seed=2)  # several read chunks
    backend.storage.write_bytes(backend.uri("h.bin"), payload)
    assert backend.storage.sha256(backend.uri("h.bin")) == hashlib.sha256(payload).hexdigest()


def test_failed_write_leaves_old_content_and_no_partial(backend: Backend) -> None:
    s = backend.storage
    s.write_text(backend.uri("obj"), "old")
    with pytest.raises(OSError, match="half-way"):
        s.write_stream(backend.uri("obj"), FailingReader(good=3 * MiB))
    with pytest.raises(OSError, match="half-way"):
        s.write_stream(backend.uri("new"), FailingReader(good=MiB))
    with pytest.raises(RuntimeError):
        with s.open_write(backend.uri("new2")) as fh:
            fh.write(b"partial")
            raise RuntimeError("caller failed")
    assert s.read_text(backend.uri("obj")) == "old"
    assert not s.exists(backend.uri("new")) and not s.exists(backend.uri("new2"))
    assert s.list(backend.root) == [backend.uri("obj")]  # no temp or partial objects anywhere

    with s.open_write(backend.uri("new2")) as fh:
        fh.write(b"complete")
    assert s.read_bytes(backend.uri("new2")) == b"complete"


def test_upload_download_dir_round_trip_and_skip_unchanged(backend: Backend, tmp_path: Path) -> None:
    s = backend.storage
    src = tmp_path / "src"
    files = {"a.txt": b"alpha", "sub/b.bin": _random(70_000, seed=3), "sub/deep/c.txt": b"gamma"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    dest_uri = backend.uri("synced")

    first = s.upload_dir(src, dest_uri)
    assert sorted(first.copied) == sorted(files) and first.skipped == []
    again = s.upload_dir(src, dest_uri)
    assert again.copied == [] and sorted(again.skipped) == sorted(files)
    (src / "a.txt").write_bytes(b"ALPHA")  # same size, new content: only a hash comparison catches it
    changed = s.upload_dir(src, dest_uri)
    assert changed.copied == ["a.txt"] and len(changed.skipped) == 2
    assert s.read_bytes(join_uri(dest_uri, "a.txt")) == b"ALPHA"

    out = tmp_path / "out"
    down = s.download_dir(dest_uri, out)
    assert sorted(down.copied) == sorted(files)
    assert _tree(out) == _tree(src)
    stamps = {rel: (out / rel).stat().st_mtime_ns for rel in files}
    down2 = s.download_dir(dest_uri, out, progress=True)
    assert down2.copied == [] and down2.total == 3
    assert {rel: (out / rel).stat().st_mtime_ns for rel in files} == stamps  # skipped files are not rewritten
    (out / "sub/deep/c.txt").write_bytes(b"GAMMA")
    assert s.download_dir(dest_uri, out).copied == ["sub/deep/c.txt"]
    assert (out / "sub/deep/c.txt").read_bytes() == b"gamma"


def test_object_above_multipart_size(backend: Backend, tmp_path: Path) -> None:
    """6 MiB + 1 byte: above the 5 MiB part size, so S3 uploads it in two parts."""
    src = tmp_path / "big.bin"
    payload = os.urandom(6 * MiB + 1)
    src.write_bytes(payload)
    info = backend.storage.put_file(src, backend.uri("big.bin"))
    if backend.kind == "s3":
        # A completed multipart upload's ETag ends in -<parts> (set by the server on CompleteMultipartUpload).
        assert info.etag is not None and info.etag.endswith("-2"), info.etag
    assert backend.storage.stat(backend.uri("big.bin")).size == len(payload)
    assert backend.storage.sha256(backend.uri("big.bin")) == hashlib.sha256(payload).hexdigest()
    out = backend.storage.get_file(backend.uri("big.bin"), tmp_path / "back.bin")
    assert out.read_bytes() == payload


def test_missing_object_errors_name_the_uri(backend: Backend, tmp_path: Path) -> None:
    s = backend.storage
    s.write_text(backend.uri("present"), "x")  # the directory/bucket exists; only the object is missing
    missing = backend.uri("no/such/object.png")
    for call in (s.read_bytes, s.stat, s.sha256, lambda u: s.get_file(u, tmp_path / "dl" / "x.png")):
        with pytest.raises(StorageError, match="does not exist") as err:
            call(missing)
        assert missing in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "dl" / "x.png").exists()
    assert not (tmp_path / "dl").exists() or list((tmp_path / "dl").iterdir()) == []
    with pytest.raises(StorageError, match="no objects under"):
        s.download_dir(backend.uri("no/such/dir"), tmp_path / "dl2")


def test_localize_is_content_addressed(backend: Backend, tmp_path: Path) -> None:
    s = backend.storage
    s.write_text(backend.uri("ds/a.txt"), "one")
    s.write_text(backend.uri("ds/sub/b.txt"), "two")
    cache = tmp_path / "cache"
    first = localize(backend.uri("ds"), cache)
    assert _tree(first) == {"a.txt": b"one", "sub/b.txt": b"two"}
    if backend.kind == "local":
        assert first == Path(backend.uri("ds"))  # already local: used in place, nothing copied
        assert not cache.exists()
        return
    assert first.parent == cache
    # A second call on unchanged content must not download: a marker written into the cache entry survives.
    (first / "a.txt").write_text("marker")
    assert localize(backend.uri("ds"), cache) == first
    assert (first / "a.txt").read_text() == "marker"
    # Changed content gets a new entry.
    s.write_text(backend.uri("ds/a.txt"), "ONE!")
    second = localize(backend.uri("ds"), cache)
    assert second != first and _tree(second) == {"a.txt": b"ONE!", "sub/b.txt": b"two"}
    # A single object localizes to a file.
    one = localize(backend.uri("ds/sub/b.txt"), cache)
    assert one.name == "b.txt" and one.read_text() == "two"
    with pytest.raises(StorageError, match="nothing at"):
        localize(backend.uri("ds/none"), cache)


# ---------------------------------------------------------------------------------------------------------------
# URIs, endpoints and S3-only failure modes


@pytest.mark.parametrize(
    "bad",
    ["s3://", "s3:///key", "s3://Bad_Bucket/x", "s3://ab/x", "s3://bucket//x", "s3://bucket/a/../b", "gs://bucket/x",
     "file://otherhost/x"],
)  # fmt: skip
def test_bad_uri_is_one_line_storage_error(bad: str) -> None:
    with pytest.raises(StorageError) as err:
        open_storage(bad)
    msg = str(err.value)
    assert repr(bad) in msg or bad in msg
    assert "\n" not in msg


def test_uri_helpers() -> None:
    assert parse_s3_uri("s3://bucket/a/b/").key == "a/b"
    assert parse_s3_uri("s3://bucket").key == ""
    assert parse_s3_uri("s3://bucket/a").as_prefix() == "a/"
    assert join_uri("s3://b-1/x/", "/y/", "z") == "s3://b-1/x/y/z"
    assert parent_uri("s3://b-1/x/y") == "s3://b-1/x"
    assert uri_name("s3://b-1/x/y.png") == "y.png"
    assert uri_name("/tmp/q/r.txt") == "r.txt"


def test_endpoint_resolution() -> None:
    env = {"AWS_ENDPOINT_URL": "http://10.0.0.1:9000", "MLFLOW_S3_ENDPOINT_URL": "http://mlflow:1"}
    assert resolve_endpoint(StorageConfig(), env)[:2] == ("10.0.0.1:9000", False)
    assert resolve_endpoint(StorageConfig(), {"S3_ENDPOINT_URL": "https://minio.local/", **env})[:2] == (
        "minio.local",
        True,
    )
    assert resolve_endpoint(StorageConfig(endpoint="minio:9000", secure=True), env)[:2] == ("minio:9000", True)
    assert resolve_endpoint(StorageConfig(), {})[:2] == ("s3.amazonaws.com", True)
    assert endpoint_url(StorageConfig(endpoint="127.0.0.1:9000"), {}) == "http://127.0.0.1:9000"
    with pytest.raises(StorageError, match="storage.endpoint"):
        resolve_endpoint(StorageConfig(endpoint="http://minio:9000/some/path"), {})


@pytest.mark.s3
def test_unreachable_endpoint_fails_fast_with_fix(s3_env: S3Server, s3_prefix: str) -> None:
    port = closed_loopback_port()
    storage = open_storage(s3_prefix, StorageConfig(endpoint=f"http://127.0.0.1:{port}"))
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.read_bytes(join_uri(s3_prefix, "x"))
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "S3_ENDPOINT_URL" in msg and "storage.endpoint" in msg
    assert join_uri(s3_prefix, "x") in msg


@pytest.mark.s3
def test_missing_credentials(s3_env: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match=r"set \$AWS_SECRET_ACCESS_KEY"):
        open_storage(s3_prefix)
    # Other variable names come from the config.
    monkeypatch.setenv("MY_KEY", s3_env.access_key)
    monkeypatch.setenv("MY_SECRET", s3_env.secret_key)
    storage = open_storage(s3_prefix, StorageConfig(access_key_env="MY_KEY", secret_key_env="MY_SECRET"))
    storage.write_text(join_uri(s3_prefix, "k"), "ok")
    assert storage.read_text(join_uri(s3_prefix, "k")) == "ok"


@pytest.mark.s3
def test_wrong_credentials_are_denied(s3_env: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0000000")
    storage = open_storage(s3_prefix)
    with pytest.raises(StorageError, match="denied.*AWS_SECRET_ACCESS_KEY"):
        storage.write_text(join_uri(s3_prefix, "k"), "x")
    with pytest.raises(StorageError, match="denied"):
        storage.read_text(join_uri(s3_prefix, "k"))


@pytest.mark.s3
def test_missing_bucket(s3_env: S3Server) -> None:
    storage = open_storage("s3://no-such-bucket-idf/x")
    for call in (storage.read_bytes, storage.stat, storage.list, storage.exists):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-idf' does not exist"):
            call("s3://no-such-bucket-idf/x")


@pytest.mark.s3
def test_presigned_get_url_serves_the_object(s3_env: S3Server, s3_prefix: str) -> None:
    storage = open_storage(s3_prefix)
    assert isinstance(storage, S3Storage)
    uri = join_uri(s3_prefix, "shared.txt")
    storage.write_text(uri, "presigned")
    loc = parse_s3_uri(uri)
    url = storage.client.presigned_get_object(loc.bucket, loc.key)
    assert url.startswith(s3_env.endpoint)
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback test server
        assert resp.read() == b"presigned"


@pytest.mark.s3
def test_part_size_below_protocol_minimum_is_refused(s3_env: S3Server) -> None:
    with pytest.raises(StorageError, match="5 MiB"):
        S3Storage(part_size=1024)


@pytest.mark.s3
def test_objects_without_recorded_sha256(s3_env: S3Server, s3_prefix: str, tmp_path: Path) -> None:
    """Objects written by other tools (mc, DVC) carry no sha256 metadata: syncs hash their content instead, and a
    download whose content disagrees with a recorded sha256 is refused, leaving no file."""
    import io

    storage = open_storage(s3_prefix)
    client = s3_env.client()
    plain = parse_s3_uri(join_uri(s3_prefix, "plain/a.txt"))
    client.put_object(plain.bucket, plain.key, io.BytesIO(b"same"), 4)
    assert storage.stat(join_uri(s3_prefix, "plain/a.txt")).sha256 is None
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"same")
    assert storage.upload_dir(src, join_uri(s3_prefix, "plain")).skipped == ["a.txt"]
    (src / "a.txt").write_bytes(b"diff")
    assert storage.upload_dir(src, join_uri(s3_prefix, "plain")).copied == ["a.txt"]

    lying = parse_s3_uri(join_uri(s3_prefix, "lying.bin"))
    client.put_object(lying.bucket, lying.key, io.BytesIO(b"payload"), 7, metadata={"sha256": "0" * 64})
    assert storage.sha256(lying.uri) == hashlib.sha256(b"payload").hexdigest()  # content, not the metadata
    with pytest.raises(StorageError, match="corrupt"):
        storage.get_file(lying.uri, tmp_path / "dl" / "lying.bin")
    assert not (tmp_path / "dl" / "lying.bin").exists()
    assert list((tmp_path / "dl").iterdir()) == []


def test_file_uris_on_the_local_backend(tmp_path: Path) -> None:
    root = (tmp_path / "store").as_uri()  # file:///...
    storage = open_storage(root)
    assert isinstance(storage, LocalStorage)
    storage.write_text(join_uri(root, "x/y.txt"), "file uri")
    assert (tmp_path / "store" / "x" / "y.txt").read_text() == "file uri"
    assert storage.list(root) == [join_uri(root, "x/y.txt")]
    assert storage.read_text(storage.list(root)[0]) == "file uri"
    with pytest.raises(StorageError, match="S3 URI"):
        storage.read_text("s3://bucket/key")
    with pytest.raises(StorageError, match="directory"):
        storage.delete(join_uri(root, "x"))


@pytest.mark.parametrize("key", ["../escape.txt", "a/../../escape.txt", "/etc/escape.txt", "a//b.txt", "./a.txt"])
def test_download_dir_refuses_listed_keys_that_leave_the_destination(tmp_path: Path, key: str) -> None:
    class HostileListing(LocalStorage):
        """A server's listing is the server's to spell: this one names a key outside the synced prefix."""

        def list_info(self, prefix: str, recursive: bool = True) -> list[ObjectInfo]:
            return [ObjectInfo(f"{prefix.rstrip('/')}/{key}", 1, None)]

    src = tmp_path / "src"
    src.mkdir()
    dest = tmp_path / "sub" / "dest"
    with pytest.raises(StorageError, match=r"refusing to download .*would not stay inside the destination"):
        HostileListing().download_dir(str(src), dest)
    assert not (tmp_path / "sub").exists() and not (tmp_path / "escape.txt").exists()
