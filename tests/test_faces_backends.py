"""Both face backends on real photos: detection, landmark order, embeddings that separate identities."""

from __future__ import annotations

import numpy as np
import pytest

from idforge.errors import ConfigError, DataError, ModelNotFoundError
from idforge.faces import FaceAnalyzer, load_analyzer
from idforge.faces.align import align_face


def _rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def photo_embeddings(face_photos, analyzers):
    """backend -> (relative paths, identities, (N, D) embeddings, faces) over the sample photos."""
    out = {}
    for name, analyzer in analyzers.items():
        rels, ids, crops, faces = [], [], [], []
        for rel, ident in sorted(face_photos.labels.items()):
            found = analyzer.detect(_rgb(face_photos.root / rel))
            faces.append(found)
            if found:
                rels.append(rel)
                ids.append(ident)
                crops.append(align_face(_rgb(face_photos.root / rel), found[0].kps, 112))
        out[name] = (rels, ids, analyzer.embed_aligned(np.stack(crops)), faces)
    return out


@pytest.mark.slow  # the first test here pays for detecting the sample photos with both backends
@pytest.mark.parametrize("backend", ["insightface", "opencv"])
def test_every_sample_photo_has_exactly_one_confident_face(backend, photo_embeddings, face_photos, analyzers):
    rels, _, _, faces = photo_embeddings[backend]
    assert rels == sorted(face_photos.labels), "a face was missed"
    for found in faces:
        assert len(found) == 1
        f = found[0]
        assert f.kps.shape == (5, 2) and f.kps.dtype == np.float32
        assert 0.5 <= f.det_score <= 1.0
        x0, y0, x1, y1 = f.bbox
        # ArcFace order: image-left eye before image-right eye, eyes above nose above mouth, all inside the box.
        le, re, nose, lm, rm = f.kps
        assert le[0] < re[0] and lm[0] < rm[0]
        assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])
        assert np.all((f.kps[:, 0] > x0) & (f.kps[:, 0] < x1) & (f.kps[:, 1] > y0) & (f.kps[:, 1] < y1))
    assert isinstance(analyzers[backend], FaceAnalyzer)


@pytest.mark.parametrize("backend,dim,same_min,diff_max",
                         [("insightface", 512, 0.45, 0.25), ("opencv", 128, 0.45, 0.35)])
def test_embeddings_separate_people(backend, dim, same_min, diff_max, photo_embeddings):
    _, ids, emb, _ = photo_embeddings[backend]
    assert emb.shape == (len(ids), dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    same = np.array([[a == b for b in ids] for a in ids])
    off = ~np.eye(len(ids), dtype=bool)
    assert sim[same & off].min() > same_min
    assert sim[~same].max() < diff_max


def test_insightface_gives_106_landmarks_around_the_face(photo_embeddings):
    faces = photo_embeddings["insightface"][3]
    for found in faces:
        lmk = found[0].landmarks106
        assert lmk is not None and lmk.shape == (106, 2)
        x0, y0, x1, y1 = found[0].bbox
        w, h = x1 - x0, y1 - y0
        centre = lmk.mean(0)
        assert x0 < centre[0] < x1 and y0 < centre[1] < y1
        assert np.ptp(lmk[:, 0]) > 0.5 * w and np.ptp(lmk[:, 1]) > 0.5 * h


def test_blank_image_has_no_face(analyzers):
    for analyzer in analyzers.values():
        assert analyzer.detect(np.full((200, 300, 3), 127, np.uint8)) == []
        assert analyzer.embed_aligned(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, analyzer.embedding_dim)


def test_bad_inputs_raise_clear_errors(insightface_analyzer, tmp_path):
    with pytest.raises(DataError, match="uint8"):
        insightface_analyzer.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(DataError, match="112"):
        insightface_analyzer.embed_aligned(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ConfigError, match="insightface, opencv"):
        load_analyzer("dlib")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_analyzer("insightface", tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no detection"):
        load_analyzer("insightface", tmp_path)
    with pytest.raises(ModelNotFoundError, match="yunet"):
        load_analyzer("opencv", tmp_path)


def test_a_model_pack_directory_loads_like_buffalo_l(tmp_path, face_photos, insightface_analyzer):
    # An insightface pack is just a folder of ONNX files; the router classifies them by task.
    from idforge.faces.models import embedded_insightface_dir

    src = embedded_insightface_dir()
    for name in ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx", "2d106det.onnx"):
        (tmp_path / name).symlink_to(src / name)
    pack = load_analyzer("insightface", tmp_path)
    assert pack.describe()["landmark_2d_106"] is not None
    rgb = _rgb(face_photos.root / "ardern/1.jpg")
    a, b = pack.detect(rgb), insightface_analyzer.detect(rgb)
    np.testing.assert_allclose(a[0].kps, b[0].kps, atol=1e-3)
