"""DVC with the local S3 server as its remote: add, push, drop the cache, pull, same bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from idforge.io.storage import open_storage
from idforge.io.uri import join_uri
from tests.fixtures.s3 import S3Server


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.s3
def test_dvc_push_pull_through_s3_remote(s3_env: S3Server, s3_prefix: str, tmp_path: Path) -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    git = shutil.which("git")
    assert git, "git is needed for a DVC repository"
    env = {
        **os.environ,
        **s3_env.env,
        "DVC_NO_ANALYTICS": "1",
        "HOME": str(tmp_path / "home"),  # no global/user git or dvc config leaks in
        "GIT_CONFIG_NOSYSTEM": "1",
        "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config"),
    }
    repo = tmp_path / "repo"
    (repo / "data" / "faces").mkdir(parents=True)
    files = {"data/faces/a.bin": os.urandom(50_000), "data/faces/b.txt": b"identity b\n", "data/params.txt": b"lr=1\n"}
    for rel, data in files.items():
        (repo / rel).write_bytes(data)

    _run([git, "init", "-q"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    remote = join_uri(s3_prefix, "dvc")
    _run([dvc, "remote", "add", "-d", "s3remote", remote], repo, env)
    # Credentials stay in the environment; only the endpoint goes into .dvc/config.
    _run([dvc, "remote", "modify", "s3remote", "endpointurl", s3_env.endpoint], repo, env)
    _run([dvc, "add", "data/faces", "data/params.txt"], repo, env)
    _run([dvc, "push"], repo, env)
    assert s3_env.secret_key not in (repo / ".dvc" / "config").read_text()

    # The pushed objects are in the bucket, under the remote's prefix, content-addressed by md5.
    pushed = open_storage(remote).list(remote)  # s3_env exported the same credentials for idforge
    md5s = {hashlib.md5(data).hexdigest() for data in files.values()}
    pushed_md5s = {u.split("/files/md5/", 1)[1].replace("/", "") for u in pushed if "/files/md5/" in u}
    assert md5s <= pushed_md5s

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "faces")
    (repo / "data" / "params.txt").unlink()
    _run([dvc, "pull"], repo, env)
    for rel, data in files.items():
        assert (repo / rel).read_bytes() == data, rel
