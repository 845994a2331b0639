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

    real = detect.find_faces
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("detector exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(detect, "find_faces", broken)
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
