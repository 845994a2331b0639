"""The Ray Jobs client against a real local Ray head (the session fixture ``ray_head`` of tests/fixtures/ray.py:
``ray start --head`` on 127.0.0.1, dashboard included)."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

from idforge.errors import ConfigError
from idforge.ops import ray_jobs
from idforge.ops.ray_jobs import JobStatus, RayJobError, RayJobTimeoutError, RayUnreachableError
from tests.fixtures.process import free_ports

pytestmark = pytest.mark.usefixtures("no_ray_address_env")


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.txt", "a") as f:  # one line per time the entrypoint ran
        f.write("ran\\n")
    for step in range(1, 4):
        print(f"step {step} loss {1.0 / step:.3f}", flush=True)
        time.sleep(0.3)
    ckpt = out / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 3, "loss": 0.333}))
    print("checkpoint written", flush=True)
    """
)


@pytest.mark.slow
def test_submit_streams_logs_and_writes_checkpoint(ray_head, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    out = tmp_path / "out"
    chunks: list[str] = []
    job_id = ray_jobs.submit_ray_job(
        ray_head, f"{sys.executable} {script} {out}", {"env_vars": {"IDFORGE_TEST": "1"}}, job_id="idforge-test-train"
    )
    assert job_id == "idforge-test-train"

    status = ray_jobs.follow_job(ray_head, job_id, chunks.append, timeout_s=120)

    assert status is JobStatus.SUCCEEDED
    logs = "".join(chunks)
    assert [logs.count(f"step {i} ") for i in (1, 2, 3)] == [1, 1, 1]  # streamed once each, no tail re-sent
    assert logs.index("step 1") < logs.index("step 3") < logs.index("checkpoint written")
    assert (out / "checkpoint" / "state.json").read_text() == '{"step": 3, "loss": 0.333}'
    assert ray_jobs.job_status(ray_head, job_id) is JobStatus.SUCCEEDED

    # Same id again (a retried pipeline step): re-attaches, does not run the entrypoint a second time.
    again = ray_jobs.submit_ray_job(ray_head, f"{sys.executable} {script} {out}", job_id=job_id)
    assert again == job_id
    assert ray_jobs.wait_for_job(ray_head, again, timeout_s=30) is JobStatus.SUCCEEDED
    assert (out / "runs.txt").read_text() == "ran\n"


@pytest.mark.slow
def test_run_ray_job_runtime_env_and_failure(ray_head, tmp_path):
    marker = tmp_path / "env.txt"
    code = f"import os; open({str(marker)!r}, 'w').write(os.environ['IDFORGE_SEED'])"
    result = ray_jobs.run_ray_job(ray_head, f'{sys.executable} -c "{code}"', {"env_vars": {"IDFORGE_SEED": "7"}},
                                  log_sink=lambda _chunk: None, timeout_s=120)
    assert result.status is JobStatus.SUCCEEDED
    assert marker.read_text() == "7"

    seen: list[str] = []
    with pytest.raises(RayJobError, match="FAILED") as info:
        ray_jobs.run_ray_job(ray_head, f"{sys.executable} -c \"print('boom'); raise SystemExit(3)\"",
                             log_sink=seen.append, timeout_s=120)
    assert "boom" in "".join(seen)
    assert "ray job logs" in str(info.value)


@pytest.mark.slow
def test_broken_log_stream_falls_back_to_polling(ray_head, monkeypatch):
    async def broken_tail(client, job_id, sink, deadline):
        raise RuntimeError("WebSocket connection closed unexpectedly")

    monkeypatch.setattr(ray_jobs, "_tail", broken_tail)
    chunks: list[str] = []
    code = "import time; [print(f'line {i}', flush=True) or time.sleep(0.2) for i in range(5)]"
    job_id = ray_jobs.submit_ray_job(ray_head, f'{sys.executable} -c "{code}"')
    status = ray_jobs.follow_job(ray_head, job_id, chunks.append, timeout_s=120, poll_interval_s=0.2)
    assert status is JobStatus.SUCCEEDED
    logs = "".join(chunks)
    assert [logs.count(f"line {i}\n") for i in range(5)] == [1, 1, 1, 1, 1]  # every line once, none repeated


@pytest.mark.slow
def test_timeout_stops_the_job(ray_head):
    job_id = ray_jobs.submit_ray_job(ray_head, f'{sys.executable} -c "import time; time.sleep(120)"')
    with pytest.raises(RayJobTimeoutError, match="did not finish within 1 s"):
        ray_jobs.follow_job(ray_head, job_id, lambda _chunk: None, timeout_s=1)
    assert ray_jobs.job_status(ray_head, job_id) in (JobStatus.PENDING, JobStatus.RUNNING)  # follow does not stop
    with pytest.raises(RayJobTimeoutError, match="did not finish within 1 s"):
        ray_jobs.wait_for_job(ray_head, job_id, timeout_s=1, poll_interval_s=0.2, stop_on_timeout=True)
    assert ray_jobs.wait_for_job(ray_head, job_id, timeout_s=60) is JobStatus.STOPPED


@pytest.mark.slow
def test_unknown_job_id_is_a_clear_error(ray_head):
    with pytest.raises(RayJobError, match="does not know job 'no-such-job'"):
        ray_jobs.job_status(ray_head, "no-such-job")


def test_unreachable_head_fails_fast_with_the_address():
    (port,) = free_ports(1)  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(RayUnreachableError, match=f"127.0.0.1:{port} is unreachable.*ray start --head"):
        ray_jobs.submit_ray_job(f"127.0.0.1:{port}", "echo hi", connect_timeout_s=2)
    assert time.monotonic() - start < 10


def test_non_dashboard_http_server_is_named(tmp_path):
    # Any HTTP server that is not a Ray dashboard (here: a static file server) must not pass for one.
    import http.server
    import threading

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(RayUnreachableError, match="HTTP 404 .* not a Ray dashboard"):
            ray_jobs.connect(f"http://127.0.0.1:{server.server_port}", connect_timeout_s=2)
    finally:
        server.shutdown()
        server.server_close()


def test_address_normalisation_and_bad_input(monkeypatch, tmp_path):
    assert ray_jobs.normalize_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert ray_jobs.normalize_address("https://ray.example:443/") == "https://ray.example:443"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert ray_jobs.normalize_address("http://other:8265") == "http://head:8265"  # Ray's own precedence
    assert ray_jobs.normalize_address(None) == "http://head:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ConfigError, match=r"\(from \$RAY_ADDRESS\).*not a ray:// address"):
        ray_jobs.normalize_address("http://head:8265")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match="no Ray address given"):
        ray_jobs.normalize_address(None)
    with pytest.raises(ConfigError, match="not a ray:// address"):
        ray_jobs.normalize_address("ray://head:10001")
    with pytest.raises(ConfigError, match="malformed port"):
        ray_jobs.normalize_address("http://head:port")
    with pytest.raises(ConfigError, match="non-empty shell command"):
        ray_jobs.submit_ray_job("http://127.0.0.1:1", "  ")
    with pytest.raises(ConfigError, match="working_dir .* is not a directory"):
        ray_jobs.submit_ray_job("http://127.0.0.1:1", "echo", {"working_dir": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="env_vars must map str to str"):
        ray_jobs.submit_ray_job("http://127.0.0.1:1", "echo", {"env_vars": {"SEED": 0}})
    assert JobStatus("SUCCEEDED").is_terminal and not JobStatus.RUNNING.is_terminal
