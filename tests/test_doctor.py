"""`idforge doctor`: one table of what the environment has and lacks, exit 0 only when the config's needs are met.

Real things only: tiny models on disk, the embedded face models, a SQLite MLflow store, the local S3 server with
right and wrong credentials, and a closed loopback port for an unreachable endpoint.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.fixtures.s3 import closed_loopback_port


def _doctor(tmp_path, cfg: dict, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "idforge.cli", "doctor", "-c", str(path), *extra],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def _rows(out: str) -> dict[str, str]:
    """name -> status word, from the table's first column pairs (fix lines skipped)."""
    rows = {}
    for line in out.splitlines():
        if line.startswith(("ok ", "MISSING", "absent", "info")):
            status, rest = line.split(None, 1)
            rows[rest] = status
    return rows


def _status(rows: dict[str, str], name: str) -> str:
    return next(status for rest, status in rows.items() if rest.startswith(name))


@pytest.fixture
def base_env(s3_server, monkeypatch):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "MLFLOW_"))}
    return env


@pytest.mark.s3
def test_a_complete_setup_passes(tmp_path, tiny_sd15_dir, tiny_clip_dir, s3_server, base_env):
    cfg = {"model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
           "storage": {"endpoint": s3_server.endpoint},
           "train": {"storage_path": f"s3://{s3_server.bucket}/checkpoints"},
           "tracking": {"uri": f"sqlite:///{tmp_path}/mlruns.db"}}
    env = {**base_env, "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    res = _doctor(tmp_path, cfg, env)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = _rows(res.stdout)
    for name in ("base model", "CLIP (training)", "face model", "MLflow", "S3 endpoint", "S3 credentials",
                 f"S3 bucket {s3_server.bucket}"):
        assert _status(rows, name) == "ok", res.stdout
    assert _status(rows, "torch") in ("ok", "info")


@pytest.mark.s3
def test_a_broken_setup_names_each_gap_and_its_fix(tmp_path, tiny_clip_dir, s3_server, base_env):
    cfg = {"model": {"base": str(tmp_path / "no-such-model"), "clip": str(tiny_clip_dir)},
           "storage": {"endpoint": s3_server.endpoint},
           "train": {"storage_path": f"s3://{s3_server.bucket}/checkpoints"}}
    wrong = {**base_env, "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    res = _doctor(tmp_path, cfg, wrong)
    assert res.returncode == 1
    rows = _rows(res.stdout)
    assert _status(rows, "base model") == "MISSING" and "fix: --set model.base=" in res.stdout
    assert _status(rows, "S3 endpoint") == "ok" and _status(rows, "S3 credentials") == "MISSING"
    assert "base model" in res.stderr and "S3 credentials" in res.stderr

    closed = {**cfg, "storage": {"endpoint": f"http://127.0.0.1:{closed_loopback_port()}"}}
    res = _doctor(tmp_path, closed, wrong)
    assert res.returncode == 1
    assert _status(_rows(res.stdout), "S3 endpoint") == "MISSING" and "unreachable" in res.stdout


def test_an_unreachable_ray_head_or_kfp_host_is_missing_only_when_asked_for(tmp_path, tiny_sd15_dir, tiny_clip_dir,
                                                                             base_env):
    cfg = {"model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
           "tracking": {"uri": f"sqlite:///{tmp_path}/mlruns.db"}}
    res = _doctor(tmp_path, cfg, base_env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Ray" not in _rows(res.stdout) and not any(r.startswith("S3") for r in _rows(res.stdout))
    port = closed_loopback_port()
    res = _doctor(tmp_path, cfg, base_env, "--ray-address", f"http://127.0.0.1:{port}",
                  "--kfp-host", f"http://127.0.0.1:{port}")
    assert res.returncode == 1
    rows = _rows(res.stdout)
    assert _status(rows, "Ray") == "MISSING" and _status(rows, "Kubeflow Pipelines") == "MISSING"
