"""TLS for S3 as an option every client honours: against a real SeaweedFS behind HTTPS with a private CA, minio
(our storage), pyarrow (Ray Train's checkpoints) and DVC connect when ``storage.ca_bundle`` names the CA, and refuse
the endpoint (a clear error) when it does not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from idforge.config import StorageConfig
from idforge.errors import StorageError
from idforge.io.s3_clients import dvc_remote_options, s3_filesystem
from idforge.io.storage import open_storage
from tests.fixtures.s3 import TlsS3Server

pytestmark = pytest.mark.s3


@pytest.fixture
def tls_env(s3_tls_server: TlsS3Server, monkeypatch: pytest.MonkeyPatch) -> TlsS3Server:
    for name in ("SSL_CERT_FILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_tls_server.server.env.items():
        monkeypatch.setenv(name, value)
    return s3_tls_server


def test_minio_verifies_against_the_configured_ca(tls_env: TlsS3Server, tmp_path: Path) -> None:
    uri = f"s3://{tls_env.server.bucket}/tls-{tmp_path.name}/x.txt"
    assert tls_env.server.endpoint.startswith("https://127.0.0.1:")
    trusted = open_storage(uri, StorageConfig(ca_bundle=str(tls_env.ca)))
    trusted.write_text(uri, "over tls")
    assert trusted.read_text(uri) == "over tls"
    # The default trust store has never heard of this CA: the endpoint is refused, and the fix is named.
    with pytest.raises(StorageError, match=r"TLS with the S3 endpoint https://127\.0\.0\.1:\d+ failed .*ca_bundle"):
        open_storage(uri, StorageConfig()).read_text(uri)


def test_pyarrow_verifies_against_the_configured_ca(tls_env: TlsS3Server, tmp_path: Path) -> None:
    from pyarrow.fs import FileType

    key = f"{tls_env.server.bucket}/tls-{tmp_path.name}/ray.bin"
    fs = s3_filesystem(StorageConfig(ca_bundle=str(tls_env.ca)))
    with fs.open_output_stream(key) as fh:
        fh.write(b"checkpoint")
    assert fs.get_file_info(key).type == FileType.File
    with pytest.raises(OSError, match="(?i)ssl|certificate|curl"):
        s3_filesystem(StorageConfig(), connect_timeout_s=2, request_timeout_s=5).get_file_info(key)


@pytest.mark.slow
def test_dvc_pushes_over_tls_with_the_remote_options(tls_env: TlsS3Server, tmp_path: Path) -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    git = shutil.which("git")
    assert git, "git is needed for a DVC repository"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path / "home"), "GIT_CONFIG_NOSYSTEM": "1",
           "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.bin").write_bytes(os.urandom(10_000))
    remote = f"s3://{tls_env.server.bucket}/tls-{tmp_path.name}/dvc"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=180)

    for args in ([git, "init", "-q"], [dvc, "init", "-q"], [dvc, "remote", "add", "-d", "tls", remote],
                 [dvc, "add", "a.bin"]):
        assert run(*args).returncode == 0, args
    options = dvc_remote_options(StorageConfig(ca_bundle=str(tls_env.ca)))
    assert options["endpointurl"] == tls_env.server.endpoint and options["ssl_verify"] == str(tls_env.ca)
    assert run(dvc, "remote", "modify", "tls", "endpointurl", options["endpointurl"]).returncode == 0
    refused = run(dvc, "push")  # no CA configured yet: the certificate does not verify
    assert refused.returncode != 0 and "certificate" in (refused.stdout + refused.stderr).lower()
    for option, value in options.items():
        assert run(dvc, "remote", "modify", "tls", option, value).returncode == 0
    pushed = run(dvc, "push")
    assert pushed.returncode == 0, pushed.stderr
    listed = open_storage(remote, StorageConfig(ca_bundle=str(tls_env.ca))).list(remote)
    assert any("/files/md5/" in u for u in listed)
    assert tls_env.server.secret_key not in (repo / ".dvc" / "config").read_text()
