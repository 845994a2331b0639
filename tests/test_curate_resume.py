"""Determinism and resumption: same input + config = same manifest, from cache; stable identity ids; an
interrupted run leaves no dataset and the next run resumes; a process pool gives the same result."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from idforge.curate.config import CurateConfig
from idforge.curate.manifest import read_manifest
from idforge.curate.run import curate_dataset
from idforge.errors import ConfigError, DataError, StorageError

PICK = ("obama/1.jpg", "obama/4.jpg", "ardern/1.jpg", "ardern/2.jpg", "macron/1.jpg", "macron/2.jpg")


@pytest.fixture(scope="module")
def small_input(face_photos, tmp_path_factory) -> Path:
    """Six photos of three people, downscaled (fast), in a flat folder."""
    return face_photos.downscaled(PICK, tmp_path_factory.mktemp("small") / "in", 420, flat=True)


def _cfg(tmp: Path, **kw) -> CurateConfig:
    base = {"progress": False, "matte": {"backend": "landmarks"}, "work_dir": str(tmp / "work")}
    base.update(kw)
    return CurateConfig(**base)


def _manifest_bytes(ds: Path) -> dict[str, bytes]:
    """Every part of the manifest dataset, by name (the manifest is a directory of parquet parts)."""
    return {p.name: p.read_bytes() for p in sorted((ds / "manifest.parquet").iterdir())}


def test_rerun_reproduces_the_manifest_from_cache(small_input, tmp_path):
    out = tmp_path / "ds"
    first = curate_dataset(str(small_input), str(out), cfg=_cfg(tmp_path))
    bytes1 = _manifest_bytes(out)
    emb1 = (out / "embeddings.npy").read_bytes()
    assert first.cached_files == 0 and first.identities == 3
    second = curate_dataset(str(small_input), str(out), cfg=_cfg(tmp_path))
    assert second.cached_files == len(PICK)
    assert _manifest_bytes(out) == bytes1
    assert (out / "embeddings.npy").read_bytes() == emb1
    assert not list(tmp_path.glob(".ds.*"))  # no partial or old directories left behind
    # a per-file setting changes the cache key: everything is recomputed
    third = curate_dataset(str(small_input), str(out), cfg=_cfg(tmp_path, gates={"min_sharpness": 26.0}))
    assert third.cached_files == 0
    assert len(list((out / "cache").iterdir())) == len(PICK) + 1  # stale entries pruned (+ the matte cache)


def test_identity_ids_do_not_depend_on_names_or_order(small_input, tmp_path):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, f in enumerate(sorted(small_input.iterdir(), reverse=True)):
        shutil.copy(f, renamed / f"{i:02d}_{f.stem[::-1]}.jpg")
    a = read_manifest(_run(small_input, tmp_path / "a", tmp_path))
    b = read_manifest(_run(renamed, tmp_path / "b", tmp_path))
    ida = dict(zip(a["sha256"], a["identity"], strict=True))
    idb = dict(zip(b["sha256"], b["identity"], strict=True))
    assert ida == idb and len(set(ida.values())) == 3 and all(v.startswith("id-") for v in ida.values())


def _run(src: Path, out: Path, tmp: Path, **kw) -> Path:
    curate_dataset(str(src), str(out), cfg=_cfg(tmp, **kw))
    return out


def test_interrupted_run_leaves_no_dataset_and_resumes(small_input, tmp_path, monkeypatch):
    import idforge.curate.process as process
    from tests.fixtures.process import raising_on_call

    real = process.analyse_file
    # the user pressing Ctrl-C mid-run
    monkeypatch.setattr(process, "analyse_file", raising_on_call(real, 4, KeyboardInterrupt()))
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        curate_dataset(str(small_input), str(out), cfg=_cfg(tmp_path))
    assert not out.exists()  # nothing half-written where readers look
    monkeypatch.setattr(process, "analyse_file", real)
    report = curate_dataset(str(small_input), str(out), cfg=_cfg(tmp_path))
    assert report.cached_files == 3  # the three files finished before the interrupt are not redone
    assert len(read_manifest(out)) == len(PICK)


@pytest.mark.slow
def test_process_pool_gives_the_same_manifest(small_input, tmp_path):
    one = read_manifest(_run(small_input, tmp_path / "one", tmp_path))
    two_report = curate_dataset(str(small_input), str(tmp_path / "two"), cfg=_cfg(tmp_path, workers=2))
    two = read_manifest(tmp_path / "two")
    assert two_report.workers == 2 and two_report.cached_files == 0
    pd.testing.assert_frame_equal(one, two)


def test_bad_inputs_fail_clearly_and_write_nothing(small_input, tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        curate_dataset(str(tmp_path / "missing"), str(tmp_path / "o1"), cfg=_cfg(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no files"):
        curate_dataset(str(empty), str(tmp_path / "o2"), cfg=_cfg(tmp_path))
    with pytest.raises(DataError, match="inside the input"):
        curate_dataset(str(small_input), str(small_input / "ds"), cfg=_cfg(tmp_path))
    with pytest.raises(DataError, match="inside the output"):
        curate_dataset(str(small_input), str(small_input.parent), cfg=_cfg(tmp_path))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="not a curated dataset"):
        curate_dataset(str(small_input), str(precious), cfg=_cfg(tmp_path))
    assert (precious / "thesis.tex").read_text() == "years of work"
    cfg = _cfg(tmp_path, matte={"backend": "mediapipe", "python": str(tmp_path / "no-venv/bin/python")})
    with pytest.raises(ConfigError, match="idforge.curate.matte --create"):
        curate_dataset(str(small_input), str(tmp_path / "o3"), cfg=cfg)
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("name,who\na.jpg,x\n")
    with pytest.raises(DataError, match="identity"):
        curate_dataset(str(small_input), str(tmp_path / "o4"), cfg=_cfg(tmp_path), labels=str(bad_labels))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_matte_settings_change_without_redoing_per_file_work(small_input, tmp_path):
    import numpy as np

    out = tmp_path / "ds"
    curate_dataset(str(small_input), str(out), cfg=_cfg(tmp_path))
    report = curate_dataset(str(small_input), str(out), cfg=_cfg(tmp_path, matte={"backend": "landmarks", "grey": 0}))
    assert report.cached_files == len(PICK)  # the grey level is not a per-file setting
    m = read_manifest(out)
    for _, row in m[m["status"] == "accepted"].iterrows():
        alpha = np.asarray(Image.open(out / row["person_mask"]))
        matted = np.asarray(Image.open(out / row["matted"]).convert("RGB"))
        assert (matted[alpha == 0] == 0).all() and (alpha == 0).any()
    report = curate_dataset(str(small_input), str(out), cfg=_cfg(tmp_path, matte={"backend": "none"}))
    m = read_manifest(out)
    assert report.cached_files == len(PICK) and (m["matted"] == "").all() and not any((out / "matted").iterdir())
