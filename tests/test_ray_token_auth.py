"""A Ray head with token authentication (as k8s/ runs the cluster): idforge's Jobs client gets in with the token
from the environment (what the train step's pod has from Secret idforge-ray-auth) and is refused, with a clear
error, without it or with another token. The clients run in subprocesses: Ray caches its auth mode per process."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from tests.fixtures.ray import start_ray_head

CLIENT = """
import sys
from idforge.ops.ray_jobs import RayUnreachableError, connect
try:
    client = connect(sys.argv[1])
    print("jobs:", len(client.list_jobs()))
except RayUnreachableError as exc:
    print("refused:", exc)
"""


def _client(url: str, **auth: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(auth)
    out = subprocess.run([sys.executable, "-c", CLIENT, url], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_jobs_api_requires_the_token(tmp_path):
    token = secrets.token_hex(32)
    with start_ray_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) as url:
        assert _client(url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) == "jobs: 0"
        (tmp_path / "token").write_text(token + "\n")
        assert _client(url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token")) == "jobs: 0"
        refused = _client(url)  # no token at all
        assert refused.startswith("refused:") and "HTTP 401" in refused and "RAY_AUTH_TOKEN" in refused
        wrong = _client(url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        assert wrong.startswith("refused:") and "HTTP 403" in wrong


def test_token_mode_without_a_token_says_where_to_put_it(monkeypatch, tmp_path):
    from idforge.errors import ConfigError
    from idforge.ops.ray_jobs import _auth_headers

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert _auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConfigError, match="set RAY_AUTH_TOKEN"):
        _auth_headers()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        _auth_headers()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert _auth_headers() == {"Authorization": "Bearer abc"}
