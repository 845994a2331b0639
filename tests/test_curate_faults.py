"""Fault drills of the local curation engine: a SIGKILLed worker (real signal), an exception inside a per-file
stage, a damaged per-file cache entry. Each must finish the run, account for the file, and lose nothing else."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import pytest

from idforge.curate.config import CurateConfig
from idforge.curate.manifest import read_manifest
from idforge.curate.run import curate_dataset

PICK = ("obama/1.jpg", "ardern/1.jpg", "macron/1.jpg")


@pytest.fixture(scope="module")
def few(face_photos, tmp_path_factory) -> Path:
    return face_photos.downscaled(PICK, tmp_path_factory.mktemp("few") / "in", 360, flat=True)


def _cfg(tmp: Path, **kw) -> CurateConfig:
    base = {"progress": False, "matte": {"backend": "landmarks"}, "work_dir": str(tmp / "work"),
            "min_images_per_identity": 1}  # one photo per person here: keep every face
    base.update(kw)
    return CurateConfig(**base)


def _file_row(out: Path, rel: str) -> pd.Series:
    m = read_manifest(out)
    rows = m[m["rel"] == rel] if "rel" in m else m[m["source"].str.endswith(rel)]
    assert len(rows) >= 1, f"{rel} has no manifest row"
    return rows.iloc[0]


def test_sigkilled_worker_is_retried_once_then_rejected_and_the_rest_finishes(few, tmp_path, monkeypatch):
    from idforge.curate.process import KILL_ENV

    victim = "ardern_1.jpg"
    monkeypatch.setenv(KILL_ENV, victim)  # the spawned worker that gets this file SIGKILLs itself (real signal)
    out = tmp_path / "ds"
    t = time.perf_counter()
    report = curate_dataset(str(few), str(out), cfg=_cfg(tmp_path, workers=2))
    elapsed = time.perf_counter() - t
    assert elapsed < 120  # bounded: the old Pool.imap waited forever for the dead worker's result
    assert report.reasons.get("worker_crashed") == 1 and report.files == len(PICK)
    row = _file_row(out, victim)
    assert row["status"] == "rejected" and row["reason"] == "worker_crashed" and "died twice" in row["detail"]
    m = read_manifest(out)
    assert (m["status"] == "accepted").sum() == len(PICK) - 1  # the innocent files in flight were retried fine
    assert "worker_crashed 1" in report.summary()
    # a crash is not cached: once the cause is gone the next run processes the file
    monkeypatch.delenv(KILL_ENV)
    again = curate_dataset(str(few), str(out), cfg=_cfg(tmp_path))
    assert "worker_crashed" not in again.reasons and (read_manifest(out)["status"] == "accepted").sum() == len(PICK)


def test_an_exception_in_a_per_file_stage_is_a_rejected_row(few, tmp_path, monkeypatch):
    import idforge.curate.detect as detect
    from tests.fixtures.process import raising_on_call

    monkeypatch.setattr(detect, "find_faces", raising_on_call(detect.find_faces, 2, RuntimeError("detector exploded")))
    out = tmp_path / "ds"
    report = curate_dataset(str(few), str(out), cfg=_cfg(tmp_path))
    m = read_manifest(out)
    bad = m[m["reason"] == "internal_error"]
    assert len(bad) == 1 and bad.iloc[0]["detail"] == "RuntimeError: detector exploded"
    assert (m["status"] == "accepted").sum() == len(PICK) - 1
    assert report.reasons["internal_error"] == 1 and "internal_error 1" in report.summary()
    assert json.loads((out / "report.json").read_text())["reasons"]["internal_error"] == 1


@pytest.mark.parametrize("damage", ["truncate_result", "delete_crop"])
def test_a_damaged_cache_entry_is_recomputed_with_a_warning(few, tmp_path, caplog, damage):
    out = tmp_path / "ds"
    curate_dataset(str(few), str(out), cfg=_cfg(tmp_path))
    before = read_manifest(out)
    entries = sorted(e for e in (out / "cache").iterdir() if e.name != "matte")
    hurt = entries[0]
    if damage == "truncate_result":
        raw = (hurt / "result.json").read_bytes()
        (hurt / "result.json").write_bytes(raw[: len(raw) // 2])  # a run killed mid-write on a full disk
    else:
        next(hurt.glob("f*_ffhq.png")).unlink()
    with caplog.at_level(logging.WARNING, logger="idforge.curate.process"):
        report = curate_dataset(str(few), str(out), cfg=_cfg(tmp_path))
    assert any(hurt.name in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    assert report.cached_files == len(PICK) - 1  # only the damaged entry was redone
    pd.testing.assert_frame_equal(read_manifest(out), before)


def test_a_stale_lock_of_a_dead_pid_is_taken_over_and_a_live_one_refuses(tmp_path, caplog):
    import os
    import subprocess
    import sys

    from idforge.errors import DataError
    from idforge.io.lock import lock_path, output_lock

    out = tmp_path / "ds"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock_path(out).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}))
    with caplog.at_level(logging.WARNING, logger="idforge.io.lock"), output_lock(out, "curate") as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
        with pytest.raises(DataError, match=rf"pid {os.getpid()}.*delete the lock file .*\.ds\.lock"):
            with output_lock(out, "curate"):
                pass
        assert held.exists()  # the refused second taker did not remove the holder's lock
    assert "stale lock" in caplog.text and not lock_path(out).exists()


def test_two_concurrent_curate_runs_on_one_output(face_photos, tmp_path):
    """Two real `idforge curate` processes on one output: the second fails at once with the lock message, the
    first completes intact."""
    import subprocess

    from idforge.io.lock import lock_path

    out = tmp_path / "ds"
    cmd = _curate_cmd(_many(face_photos, tmp_path), out, tmp_path)
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not lock_path(out).exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    t = time.perf_counter()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    second_s = time.perf_counter() - t
    first_still_running = first.poll() is None
    first_out, first_err = first.communicate(timeout=120)
    assert first_still_running, "the first run ended before the second started: the drill proved nothing"
    assert second.returncode == 2 and "is being written by another curate" in second.stderr
    assert f"pid {first.pid}" in second.stderr and str(lock_path(out)) in second.stderr
    assert first.returncode == 0, first_err
    assert len(read_manifest(out)) >= 36 and not lock_path(out).exists()
    print(f"second refused after {second_s:.1f} s")


def _many(face_photos, tmp: Path) -> Path:
    """36 photos of distinct bytes (12 JPEG qualities of three): real per-file work, so a run lasts seconds."""
    from PIL import Image

    src = face_photos.downscaled(PICK, tmp / "base", 360, flat=True)
    many = tmp / "many"
    many.mkdir()
    for i in range(12):
        for f in sorted(src.iterdir()):
            with Image.open(f) as im:
                im.save(many / f"{i:02d}_{f.name}", quality=70 + i)
    return many


def _curate_cmd(src: Path, out: Path, tmp: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "idforge.cli", "curate", "-i", str(src), "-o", str(out),
            "--set", "curate.progress=false", "--set", "curate.min_images_per_identity=1",
            "--set", f"curate.work_dir={tmp / 'work'}"]


def test_a_sigkilled_curate_process_resumes_from_its_cache_and_reproduces_the_manifest(face_photos, tmp_path):
    import signal
    import subprocess

    many = _many(face_photos, tmp_path)
    clean = tmp_path / "clean"
    subprocess.run(_curate_cmd(many, clean, tmp_path), check=True, capture_output=True, timeout=120)
    out = tmp_path / "ds"
    run = subprocess.Popen(_curate_cmd(many, out, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / ".ds.partial" / "cache"
    deadline = time.monotonic() + 60
    while not (cache.is_dir() and sum(1 for e in cache.iterdir() if not e.name.startswith(".")) >= 10):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)  # the whole process, mid-run: no handler, no cleanup
    run.wait(timeout=30)
    done_before = sum(1 for e in cache.iterdir() if not e.name.startswith("."))
    assert not out.exists()
    rerun = subprocess.run(_curate_cmd(many, out, tmp_path), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr  # the dead run's lock is stale (its pid is gone): taken over
    report = json.loads((out / "report.json").read_text())
    assert report["cached_files"] >= done_before >= 10  # resumed: the finished files were not redone
    pd.testing.assert_frame_equal(read_manifest(out), read_manifest(clean))
    print(f"killed after {done_before} files; rerun reused {report['cached_files']}")


def test_a_write_into_a_size_limited_target_fails_clearly_and_leaves_no_partial_output(few, tmp_path):
    """RLIMIT_FSIZE in a child process (SIGXFSZ ignored, so the write gets EFBIG as on a full disk)."""
    import subprocess
    import sys

    out = tmp_path / "ds"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))  # a crop PNG is larger\n"
        "from idforge.cli import main\n"
        "sys.argv = ['idforge'] + sys.argv[1:]\n"
        "main()\n"
    )
    cmd = [sys.executable, "-c", code, *_curate_cmd(few, out, tmp_path)[3:]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "File too large" in res.stderr and "free space there" in res.stderr
    assert not out.exists()
    cache = tmp_path / ".ds.partial" / "cache"
    assert not [e for e in cache.iterdir() if e.name.startswith(".")]  # no half-written entry left behind
    ok = subprocess.run(_curate_cmd(few, out, tmp_path), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and len(read_manifest(out)) == len(PICK)  # without the limit the rerun completes


def test_free_space_is_checked_up_front_against_an_estimate(tmp_path):
    from idforge.errors import DataError
    from idforge.io.space import check_free_space, curated_file_bytes

    per_file = curated_file_bytes(CurateConfig().align.ffhq_size, CurateConfig().decode.max_side)
    check_free_space(tmp_path, 10, per_file, "curate")
    with pytest.raises(DataError, match=rf"curate output {tmp_path} has \d+ MB free, the run needs about \d+ MB "
                                        r"\(10000000000 files"):
        check_free_space(tmp_path, 10**10, per_file, "curate")


def test_prepare_refuses_a_cache_another_run_is_writing(tmp_path):
    import os

    from idforge.errors import DataError
    from idforge.io.lock import output_lock
    from idforge.train.prepare import prepare_dataset

    out = tmp_path / "prepared"
    with output_lock(out, "prepare"):
        with pytest.raises(DataError, match=rf"another prepare .*pid {os.getpid()}.*\.prepared\.lock"):
            prepare_dataset(tmp_path / "no-dataset", "no-model", out)
    assert not out.exists()
