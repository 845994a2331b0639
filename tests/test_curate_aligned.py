"""Pre-aligned inputs (``curate.input_alignment``) on aligned crops that curation itself cut from the sample
photos: a detector alone misses a face that fills a 112x112 frame; ``auto`` finds it on a padded canvas; a declared
template takes its landmarks (an ArcFace crop then embeds exactly as the original face did). Same manifest
columns either way."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from idforge.curate.config import CurateConfig
from idforge.curate.detect import declared_face
from idforge.curate.manifest import manifest_schema, read_manifest
from idforge.curate.run import curate_dataset
from idforge.faces.align import ARCFACE_TEMPLATE_112

PICK = ("obama/1.jpg", "obama/4.jpg", "ardern/1.jpg", "ardern/2.jpg")


def _cfg(tmp: Path, mode: str) -> CurateConfig:
    return CurateConfig(input_alignment=mode, matte={"backend": "landmarks"}, progress=False,
                        work_dir=str(tmp / "work"), min_images_per_identity=1)


@pytest.fixture(scope="module")
def source(face_photos, tmp_path_factory) -> Path:
    """A dataset curated from four sample photos (raw photos, the default alignment)."""
    tmp = tmp_path_factory.mktemp("aligned-src")
    photos = face_photos.downscaled(PICK, tmp / "in", 480)
    out = tmp / "ds"
    curate_dataset(str(photos), str(out), cfg=_cfg(tmp, "raw"))
    return out


def _crops(source: Path, col: str, dst: Path) -> Path:
    dst.mkdir()
    for rel in read_manifest(source, columns=[col], accepted_only=True)[col]:
        shutil.copy(source / rel, dst / Path(rel).name)
    return dst


def _cosines(source: Path, col: str, out: Path) -> list[float]:
    """Per accepted face of ``out``: cosine to the embedding of the original face its crop came from."""
    orig = read_manifest(source, accepted_only=True)
    e0, e1 = np.load(source / "embeddings.npy"), np.load(out / "embeddings.npy")
    by_name = {Path(p).name: r for p, r in zip(orig[col], orig["embedding_row"], strict=True)}
    got = read_manifest(out, accepted_only=True)
    return [float(e1[r] @ e0[by_name[Path(s).name]]) for s, r in zip(got["source"], got["embedding_row"], strict=True)]


def test_arcface_crops_raw_auto_and_declared(source, tmp_path):
    crops = _crops(source, "aligned", tmp_path / "c112")
    n = len(list(crops.iterdir()))
    assert n == len(PICK)
    raw = curate_dataset(str(crops), str(tmp_path / "raw"), cfg=_cfg(tmp_path, "raw"))
    assert raw.reasons == {"no_face": n}  # what today's detector does with a face that fills the frame
    auto = curate_dataset(str(crops), str(tmp_path / "auto"), cfg=_cfg(tmp_path, "auto"))
    assert auto.faces_accepted == n and min(_cosines(source, "aligned", tmp_path / "auto")) > 0.9
    declared = curate_dataset(str(crops), str(tmp_path / "decl"), cfg=_cfg(tmp_path, "arcface112"))
    assert declared.faces_accepted == n
    assert min(_cosines(source, "aligned", tmp_path / "decl")) > 0.9999  # the warp is the identity
    m = read_manifest(tmp_path / "decl")
    assert list(m.columns) == manifest_schema().names
    assert np.allclose(np.stack(m["landmarks5"].map(np.stack)), ARCFACE_TEMPLATE_112, atol=1e-3)


def test_ffhq_crops_declared_and_auto(source, tmp_path):
    crops = _crops(source, "aligned_ffhq", tmp_path / "c512")
    n = len(list(crops.iterdir()))
    for mode in ("ffhq", "auto"):
        rep = curate_dataset(str(crops), str(tmp_path / mode), cfg=_cfg(tmp_path, mode))
        assert rep.faces_accepted == n, (mode, rep.reasons)
        assert min(_cosines(source, "aligned_ffhq", tmp_path / mode)) > 0.9


def test_declared_face_box_is_the_arcface_frame():
    f = declared_face(112, 112, "arcface112")
    assert np.allclose(f.bbox, (0, 0, 112, 112), atol=1e-3) and f.det_score == 1.0
    big = declared_face(1024, 1024, "ffhq")
    assert 0 < big.bbox[0] < big.bbox[2] < 1024 and big.size > 600  # the face box sits inside the FFHQ crop
