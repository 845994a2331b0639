"""One writer per output: every stage refuses an output another run holds; the S3 lease on a real ``weed mini``
(a second holder fails at once naming the first, a SIGKILLed holder and an expired lease are taken over, the
heartbeat keeps a live lease, a holder whose lease was taken fails instead of reporting success)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from idforge.errors import DataError
from idforge.io.lock import holds_output_lock, lease_uri, lock_path, output_lock

# ----------------------------------------------------------------------------------------------------------------
# local: each stage's entry point runs under the lock of its output


def _train(tmp, out):
    from idforge.train.config import TrainConfig
    from idforge.train.population import train_population

    train_population(TrainConfig(), tmp / "no-data", "no-model", output_dir=out)


def _finetune_all(tmp, out):
    from idforge.train.fanout import finetune_all

    finetune_all("textual-inversion", tmp / "no-data", "no-model", out)


def _finetune_one(tmp, out):
    from idforge.train.per_identity import finetune_identity

    finetune_identity("textual-inversion", "alice", tmp / "no-data", "no-model", out)


def _generate(tmp, out):
    from idforge.evaluate.generate import generate_images

    generate_images(None, None, tmp / "no-refs", None, None, None, out)


def _evaluate(tmp, out):
    from idforge.evaluate.run import evaluate_generated

    evaluate_generated(tmp / "no-generated", None, out)


@pytest.mark.parametrize(("stage", "call", "locked"), [
    ("train", _train, lambda out: out),
    ("finetune --all", _finetune_all, lambda out: out),
    ("finetune", _finetune_one, lambda out: out / "alice"),  # one identity's folder: other identities run beside it
    ("generate", _generate, lambda out: out),
    ("evaluate", _evaluate, lambda out: out),
])  # fmt: skip
def test_each_stage_refuses_an_output_another_run_is_writing(tmp_path, stage, call, locked):
    out = tmp_path / "out"
    with output_lock(locked(out), "other-run") as held:
        with pytest.raises(DataError, match=rf"{locked(out)} is being written by another other-run .*pid "
                                            rf"{os.getpid()}.*delete the lock file {held}"):
            call(tmp_path, out)
        assert held.exists()  # the refused stage left the holder's lock alone
    assert not locked(out).exists()  # refused before writing anything
    # and the stage takes the lock itself: with nobody holding it, it gets past the lock (and fails on the input)
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever the missing input raises
        call(tmp_path, out)
    assert "is being written by another" not in str(info.value)
    assert not lock_path(locked(out)).exists()  # released on the way out


def test_identities_lock_their_own_folders_not_each_other():
    """finetune --all runs identities as parallel tasks in one output root: their locks must not collide."""
    assert lock_path("/r/out/alice") != lock_path("/r/out/bob")
    assert lock_path("/r/out/alice").parent == lock_path("/r/out/bob").parent == lock_path("/r/out/x").parent


def test_lock_paths_are_one_per_output_however_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lock_path("out") == lock_path("./out/") == lock_path(tmp_path / "x" / ".." / "out") == \
        tmp_path / ".out.lock"
    with pytest.raises(DataError, match="no name to lock"):
        lock_path("/")


def test_holds_output_lock_reads_the_named_argument(tmp_path):
    seen = []

    @holds_output_lock("stage", "dest")
    def stage(src, dest):
        seen.append(lock_path(dest).exists())
        return src

    assert stage("a", dest=tmp_path / "d") == "a" and seen == [True]
    assert not lock_path(tmp_path / "d").exists()
    assert stage.__name__ == "stage"


# ----------------------------------------------------------------------------------------------------------------
# S3 leases on the real weed mini


HOLDER = """
import sys, time
from idforge.io.lock import output_lock
with output_lock(sys.argv[1], sys.argv[2], lease_s=float(sys.argv[3])):
    print("held", flush=True)
    time.sleep(600)
"""


def _lease(storage, uri):
    return json.loads(storage.read_text(lease_uri(uri)))


def test_a_second_s3_holder_fails_at_once_and_a_sigkilled_holders_lease_is_taken_over(s3_env, s3_prefix, caplog):
    from idforge.io.storage import open_storage

    uri = f"{s3_prefix}/dataset"
    storage = open_storage(uri)
    child = subprocess.Popen([sys.executable, "-c", HOLDER, uri, "curate", "300"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert _lease(storage, uri)["pid"] == child.pid
        t0 = time.monotonic()
        with pytest.raises(DataError, match=rf"{uri} is being written by another curate \(host "
                                            rf"{socket.gethostname()}, pid {child.pid}, started .*expires in \d+ s.*"
                                            rf"delete the lock object {uri}\.lock"):
            with output_lock(uri, "curate"):
                pass
        refused_s = time.monotonic() - t0
        print(f"second holder refused in {refused_s:.2f} s")
        assert refused_s < 5  # at once: no waiting, no retries
        assert _lease(storage, uri)["pid"] == child.pid  # the refused taker left the holder's lease alone
    finally:
        child.kill()
        child.wait()
    # the holder is SIGKILLed: its lease (300 s) has not expired, but its pid is gone on this host
    with caplog.at_level(logging.WARNING, logger="idforge.io.lock"), output_lock(uri, "curate") as held:
        assert held == f"{uri}.lock" and _lease(storage, uri)["pid"] == os.getpid()
    assert f"took over the lease {uri}.lock of curate" in caplog.text and "no longer runs" in caplog.text
    assert not storage.exists(f"{uri}.lock")  # released
    # the lease sits beside the prefix: never part of the dataset's listing
    storage.write_text(f"{uri}/manifest.parquet", "m")
    with output_lock(uri, "curate"):
        assert storage.list(uri) == [f"{uri}/manifest.parquet"]


def test_an_expired_s3_lease_of_another_host_is_taken_over_with_a_warning(s3_env, s3_prefix, caplog):
    from idforge.io.storage import open_storage

    uri = f"{s3_prefix}/prepared"
    storage = open_storage(uri)
    gone = {"host": "node-7", "pid": 4242, "started": "2026-01-01T00:00:00Z", "what": "prepare", "lease_s": 1.0,
            "token": "theirs"}
    storage.write_text(lease_uri(uri), json.dumps(gone))
    with pytest.raises(DataError, match=r"another prepare \(host node-7, pid 4242.*expires in"):
        with output_lock(uri, "train"):
            pass
    deadline = time.monotonic() + 10
    while True:  # the server's clocks are in whole seconds: the 1 s lease reads expired within ~2 s
        try:
            with caplog.at_level(logging.WARNING, logger="idforge.io.lock"), output_lock(uri, "train"):
                assert _lease(storage, uri)["token"] != "theirs"
            break
        except DataError:
            assert time.monotonic() < deadline, "an expired lease was never taken over"
            time.sleep(0.5)
    assert "took over the lease" in caplog.text and "expired" in caplog.text and "node-7" in caplog.text


def test_the_heartbeat_keeps_a_live_s3_lease_and_a_holder_whose_lease_was_taken_fails(s3_env, s3_prefix):
    from idforge.io.storage import open_storage

    uri = f"{s3_prefix}/run"
    storage = open_storage(uri)
    with pytest.raises(DataError, match=rf"lost its lease {uri}\.lock to another run"):
        with output_lock(uri, "train", lease_s=2.0):
            first = _lease(storage, uri)["renewed"]
            time.sleep(4.2)  # two whole leases: without renewals it would have expired
            assert _lease(storage, uri)["renewed"] != first  # renewed
            with pytest.raises(DataError, match=rf"another train \(host {socket.gethostname()}, pid {os.getpid()}"):
                with output_lock(uri, "train"):
                    pass
            # another run takes the lease over (as it would after this one stalled for a whole lease)
            storage.write_text(lease_uri(uri), json.dumps({"host": "node-2", "pid": 1, "token": "theirs",
                                                           "lease_s": 300}))
            time.sleep(2.0)  # the next renewal (every 0.67 s) finds a lease it no longer holds
    assert _lease(storage, uri)["token"] == "theirs"  # the loser did not delete the winner's lease
