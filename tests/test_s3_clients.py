"""The S3 clients besides minio, built from the same StorageConfig: pyarrow's filesystem (Ray Train's checkpoints)
talks to the configured endpoint with the configured credentials, against the real local server."""

from __future__ import annotations

import os

import pytest

from idforge.config import StorageConfig
from idforge.errors import StorageError
from idforge.io.s3_clients import ray_storage, s3_filesystem
from idforge.io.storage import open_storage
from tests.fixtures.s3 import S3Server

pytestmark = pytest.mark.s3


def test_ray_storage_of_an_s3_uri_writes_where_minio_reads(s3_env: S3Server, s3_prefix: str) -> None:
    from pyarrow.fs import FileSelector

    path, fs = ray_storage(f"{s3_prefix}/ray/", StorageConfig())
    assert path == s3_prefix.removeprefix("s3://") + "/ray"
    # Ray's layout: a directory marker, then a file larger than one multipart part (pyarrow uploads 10 MiB parts).
    fs.create_dir(f"{path}/train/checkpoint_0")
    payload = os.urandom(11 * 1024 * 1024)
    with fs.open_output_stream(f"{path}/train/checkpoint_0/train_state.pt") as fh:
        fh.write(payload)
    store = open_storage(s3_prefix)
    assert store.read_bytes(f"{s3_prefix}/ray/train/checkpoint_0/train_state.pt") == payload
    assert store.list(f"{s3_prefix}/ray") == [f"{s3_prefix}/ray/train/checkpoint_0/train_state.pt"]
    assert [i.path for i in fs.get_file_info(FileSelector(f"{path}/train"))] == [
        f"{path}/train/checkpoint_0"]


def test_ray_storage_of_a_local_path_is_ray_s_own(tmp_path) -> None:
    assert ray_storage(str(tmp_path / "ray")) == (str(tmp_path / "ray"), None)


def test_s3_filesystem_uses_the_configured_endpoint_and_credential_names(s3_env: S3Server, s3_prefix: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from pyarrow.fs import FileType

    for name in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StorageError, match=r"\$MY_KEY and \$MY_SECRET"):
        s3_filesystem(StorageConfig(endpoint=s3_env.endpoint, access_key_env="MY_KEY", secret_key_env="MY_SECRET"))
    monkeypatch.setenv("MY_KEY", s3_env.access_key)
    monkeypatch.setenv("MY_SECRET", s3_env.secret_key)
    fs = s3_filesystem(StorageConfig(endpoint=s3_env.endpoint, access_key_env="MY_KEY", secret_key_env="MY_SECRET"))
    key = s3_prefix.removeprefix("s3://") + "/x.txt"
    with fs.open_output_stream(key) as fh:
        fh.write(b"ok")
    assert fs.get_file_info(key).type == FileType.File
    monkeypatch.setenv("MY_SECRET", "wrong" + s3_env.secret_key)
    denied = s3_filesystem(StorageConfig(endpoint=s3_env.endpoint, access_key_env="MY_KEY",
                                         secret_key_env="MY_SECRET"))
    with pytest.raises(OSError, match="(?i)signature|denied|forbidden"):
        denied.open_input_stream(key).read()


def test_missing_ca_bundle_is_named(s3_env: S3Server, tmp_path) -> None:
    with pytest.raises(StorageError, match="storage.ca_bundle .*missing.pem is not a file"):
        s3_filesystem(StorageConfig(ca_bundle=str(tmp_path / "missing.pem")))
