"""Tracking faults (issue 14): an MLflow outage mid-training delays metrics but never fails the training, and a run
whose process died is marked FAILED by the next start of the same stage."""

from __future__ import annotations

import logging
import os
import re
import signal
import time

import pytest

from idforge.train.config import TrainConfig
from tests.fixtures.dataset import prepare_synthetic
from tests.fixtures.process import stop_group
from tests.fixtures.tracking import launch_mlflow_server, new_mlflow_server


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, tiny_sd15_dir, tiny_clip_dir):
    return prepare_synthetic(tmp_path_factory.mktemp("tracking-faults-data"), tiny_sd15_dir, tiny_clip_dir,
                             identities=2, images_per_identity=2, size=128)


# ------------------------------------------------------------------------------------------------------------------
# the buffer alone: backoff, bounds, rejected entries (a closed port stands in for a server that is down)


def test_buffer_backs_off_drops_the_oldest_and_says_so_once(tmp_path, caplog):
    import mlflow  # noqa: F401 - imported before the clock starts (seconds on a cold start)

    from idforge.track.buffer import ResilientLogger
    from tests.fixtures.process import free_ports

    (port,) = free_ports(1)  # nothing listens there: connection refused at once
    now = [0.0]
    buf = ResilientLogger("0" * 32, f"http://127.0.0.1:{port}", max_buffered=5, backoff_s=(1.0, 4.0),
                          flush_timeout_s=3.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    t0 = time.monotonic()
    buf.log_metrics({"a": 1.0, "b": 2.0}, step=1)
    assert buf.report.failures == 1 and buf.pending == 2
    buf.log_metrics({"a": 3.0}, step=2)  # inside the backoff window: no new attempt
    assert buf.report.failures == 1
    now[0] += 1.1  # past the first backoff (at most 1 s with jitter)
    buf.log_metrics({"a": 4.0, "b": 5.0, "c": 6.0}, step=3)
    assert buf.report.failures == 2 and buf.pending == 5 and buf.report.dropped == 1  # 6 entries, 5 kept
    with pytest.raises(Exception, match="metric 'x' must be a number"):
        buf.log_metrics({"x": "abc"}, step=4)
    with caplog.at_level(logging.WARNING, logger="idforge.track.buffer"):
        report = buf.close()
    assert time.monotonic() - t0 < 5  # fail-fast requests: no MLflow retry loop of minutes
    assert report.undelivered == 5 and report.dropped == 1 and report.delivered == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 oldest dropped (buffer of 5 full)" in warnings[0] and "5 not delivered" in warnings[0]
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") != "0"  # the fail-fast settings were put back


def test_buffer_rejects_what_mlflow_refuses_without_retrying(mlflow_uri, caplog):
    from mlflow import MlflowClient

    from idforge.track.buffer import ResilientLogger

    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("rejects"))
    buf = ResilientLogger(run.info.run_id, mlflow_uri)
    buf.log_params({"p": "1"})
    buf.log_params({"p": "2"})  # params are write-once: a permanent refusal, not an outage
    buf.log_metrics({"m": 1.0}, step=0)
    with caplog.at_level(logging.WARNING, logger="idforge.track.buffer"):
        report = buf.close()
    assert report.rejected == 1 and report.failures == 0 and report.undelivered == 0
    assert client.get_run(run.info.run_id).data.params["p"] == "1"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "m")] == [1.0]
    assert "1 rejected by MLflow" in caplog.text


# ------------------------------------------------------------------------------------------------------------------
# the drill: a real server killed (or frozen) for the middle third of a training run


STEPS = 9


@pytest.mark.slow  # one (stop) or two (kill) server starts: ~15 s each on a loaded 2-core machine
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_mlflow_outage_mid_training_is_ridden_out(fault, prepared_dir, tiny_sd15_dir, _mlflow_template_db, tmp_path,
                                                  caplog):
    """SIGKILL (then restart on the same port and store) or SIGSTOP (then SIGCONT) the server after step 3's
    report, bring it back at step 6: training finishes, every step's metrics are in MLflow with the time they were
    logged, and one warning says how many were delayed."""
    from mlflow import MlflowClient

    from idforge.train.loop import LocalEnv, LoopSpec, run_loop

    server = new_mlflow_server(_mlflow_template_db, tmp_path)
    procs = [launch_mlflow_server(server)]
    outage: dict[str, float] = {}

    class OutageEnv(LocalEnv):
        def report(self, metrics, write):
            super().report(metrics, write)
            step = int(metrics["step"])
            if step == STEPS // 3:
                outage["start"] = time.time()
                if fault == "kill":
                    os.killpg(procs[-1].pid, signal.SIGKILL)
                    procs[-1].wait(timeout=10)
                else:
                    os.killpg(procs[-1].pid, signal.SIGSTOP)
            elif step == 2 * STEPS // 3:
                if fault == "kill":
                    procs.append(launch_mlflow_server(server))
                else:
                    os.killpg(procs[-1].pid, signal.SIGCONT)
                outage["end"] = time.time()

    try:
        client = MlflowClient(server.uri)
        exp = client.create_experiment("outage")
        run_id = client.create_run(exp, run_name="train-drill").info.run_id
        cfg = TrainConfig(method="infinite-id", steps=STEPS, batch_size=1, report_every=1, checkpoint_every=STEPS,
                          lr=1e-3, validate_every=0)
        spec = LoopSpec(train=cfg.model_dump(mode="json"), data_dir=str(prepared_dir), model=str(tiny_sd15_dir),
                        tracking={"uri": server.uri, "experiment": "outage"}, mlflow_run_id=run_id)
        with caplog.at_level(logging.WARNING, logger="idforge.track.buffer"):
            last = run_loop(spec, OutageEnv(tmp_path / "ckpt"))
        assert last["step"] == STEPS
        history = client.get_metric_history(run_id, "loss")
        assert sorted(h.step for h in history) == list(range(1, STEPS + 1))  # every step, none twice
        during = [h for h in history if STEPS // 3 <= h.step < 2 * STEPS // 3]
        # delivered late, but stamped when they were logged (inside the outage), not when they arrived
        assert all(outage["start"] - 1 <= h.timestamp / 1000 <= outage["end"] for h in during)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        delayed = int(re.search(r"(\d+) delayed and delivered later", warnings[0]).group(1))
        per_step = len(client.get_run(run_id).data.metrics)
        assert delayed >= len(during) * per_step  # every entry of the outage steps came late and is counted
        assert "not delivered" not in warnings[0] and "dropped" not in warnings[0]
        assert client.get_run(run_id).info.status == "FINISHED"
        if fault == "stop":
            # a frozen server accepts connections and never answers: each attempt gives up after the buffer's
            # short timeout (MLflow's defaults, 7 retries x 120 s, would hold the steps 3-6 for a quarter hour)
            assert outage["end"] - outage["start"] < 30
    finally:
        for proc in procs:
            if fault == "stop" and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
            stop_group(proc, grace_s=10)


# ------------------------------------------------------------------------------------------------------------------
# stale runs: a stage that dies cannot end its run; the next start of the same stage does


_HOLD_A_RUN = """
import sys, time
from idforge.track import start_run
with start_run(run_name=sys.argv[1], tags={"idforge.stage": "train"}) as run:
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


def test_a_sigkilled_stage_run_is_marked_failed_by_the_next_start(mlflow_uri):
    import subprocess
    import sys

    from mlflow import MlflowClient

    from idforge.track import start_run

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    # the victim and a live run of the same stage, each held by a process of its own
    procs = [subprocess.Popen([sys.executable, "-c", _HOLD_A_RUN, "train-x"], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    try:
        victim, live = (p.stdout.readline().strip() for p in procs)
        client = MlflowClient(mlflow_uri)
        assert client.get_run(victim).data.tags["idforge.pid"] == str(procs[0].pid)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        # a dead run of another stage (another run name), same owner tags
        tags = {k: v for k, v in client.get_run(victim).data.tags.items() if k.startswith("idforge.")}
        other = client.create_run(client.get_run(victim).info.experiment_id, run_name="train-y",
                                  tags=tags).info.run_id
        assert client.get_run(victim).info.status == "RUNNING"  # nobody could end it
        with start_run(run_name="train-x", tags={"idforge.stage": "train"}) as run:
            new = run.info.run_id
        dead = client.get_run(victim)
        assert dead.info.status == "FAILED"
        assert f"pid {procs[0].pid}" in dead.data.tags["idforge.failed_reason"]
        assert "is gone" in dead.data.tags["idforge.failed_reason"]
        assert client.get_run(live).info.status == "RUNNING"  # its process is alive: left alone
        assert client.get_run(other).info.status == "RUNNING"  # another stage: not this start's business
        assert client.get_run(new).info.status == "FINISHED"
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_runs_from_other_hosts_are_failed_only_when_their_heartbeat_is_old(mlflow_uri):
    from mlflow import MlflowClient

    from idforge.track.runs import fail_stale_runs

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("heartbeats")
    now = time.time()

    def run(beat_age_s: float | None) -> str:
        tags = {"mlflow.runName": "finetune-a", "idforge.stage": "finetune", "idforge.host": "elsewhere-pod",
                "idforge.pid": "7"}
        if beat_age_s is not None:
            tags["idforge.heartbeat"] = str(int(now - beat_age_s))
        return client.create_run(exp, run_name="finetune-a", tags=tags).info.run_id

    old, fresh, silent = run(3 * 3600), run(60), run(None)
    failed = fail_stale_runs(mlflow_uri, exp, "finetune-a", {"idforge.stage": "finetune"}, None, stale_after_s=1800)
    assert failed == [old]
    assert "no heartbeat for 180 min" in client.get_run(old).data.tags["idforge.failed_reason"]
    assert client.get_run(fresh).info.status == "RUNNING" and client.get_run(silent).info.status == "RUNNING"
