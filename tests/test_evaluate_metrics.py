"""Metrics with known answers: identity similarity on real photos, detection rate, CLIP-T batch invariance, LPIPS."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from idforge.evaluate import metrics as M


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def photos(samples_dir):
    return {k: _rgb(samples_dir / k) for k in ("obama/1.jpg", "obama/2.jpg", "biden/1.jpg", "macron/1.jpg")}


@pytest.mark.parametrize("backend", ["opencv", "insightface"])
def test_identity_similarity_known_answers(backend, analyzers, photos):
    analyzer = analyzers[backend]
    scan = M.scan_faces(analyzer, list(photos.values()))
    assert scan.detected.all() and scan.detection_rate == 1.0
    assert scan.embeddings.shape == (4, analyzer.embedding_dim)
    # the reference identity embedding built from the same photo: similarity 1 with itself
    ref = M.reference_embedding(M.scan_faces(analyzer, [photos["obama/1.jpg"]]).embeddings)
    sim = M.identity_similarity(scan, ref)
    assert sim[0] == pytest.approx(1.0, abs=1e-4)
    thr = M.SAME_PERSON_THRESHOLD[backend]
    assert sim[1] > thr  # another photo of the same man
    assert sim[2] < thr and sim[3] < thr  # two different real people
    # per-image references (N, D) give the same numbers as a broadcast (D,) one
    np.testing.assert_allclose(M.identity_similarity(scan, np.tile(ref, (4, 1))), sim, atol=1e-6)


def test_no_face_image_counts_as_missing(analyzers, photos):
    blank = np.full((96, 96, 3), 127, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for backend, analyzer in analyzers.items():
        scan = M.scan_faces(analyzer, [blank])
        assert scan.detection_rate == 0.0 and np.isnan(scan.embeddings).all()
        s = M.summarize_identity(M.identity_similarity(scan, np.ones(analyzer.embedding_dim, np.float32)))
        assert s["face_det_rate"] == 0.0 and s["id_sim"] == 0.0 and np.isnan(s["id_sim_excl_missing"])
        # mixed: one real face, two without: the missing ones are counted, scored 0, or excluded
        scan = M.scan_faces(analyzer, [photos["obama/1.jpg"], blank, noise])
        sim = M.identity_similarity(scan, scan.embeddings[0])
        s = M.summarize_identity(sim)
        assert s["face_det_rate"] == pytest.approx(1 / 3), backend
        assert s["id_sim"] == pytest.approx(1 / 3, abs=1e-4)
        assert s["id_sim_excl_missing"] == pytest.approx(1.0, abs=1e-4)


def test_reference_embedding_without_faces_raises():
    from idforge.errors import DataError

    with pytest.raises(DataError, match="has a detectable face"):
        M.reference_embedding(np.full((2, 8), np.nan, np.float32))


def test_clip_t_batch_invariant(tiny_clip_dir):
    scorer = M.ClipScorer(str(tiny_clip_dir), device="cpu", batch_size=8)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(8)]
    prompts = [f"a photo of a {w}" for w in ("man", "woman", "person", "boy", "girl", "man on the beach",
                                               "woman wearing a sweater", "person in the snow")]
    at8 = M.clip_t(scorer, images, prompts)
    scorer.batch_size = 1
    at1 = M.clip_t(scorer, images, prompts)
    assert at8.shape == (8,) and np.isfinite(at8).all()
    np.testing.assert_allclose(at1, at8, atol=1e-5)
    assert np.abs(at8).max() <= 1.0 + 1e-5
    assert len(np.unique(np.round(at8, 6))) > 1  # it really depends on the inputs
    # CLIP-I: an image with itself is 1
    feats = scorer.image_features(images[:2])
    np.testing.assert_allclose(M.clip_i(scorer, images[:2], feats), [1.0, 1.0], atol=1e-5)


def test_clip_t_length_mismatch_raises(tiny_clip_dir):
    from idforge.errors import DataError

    scorer = M.ClipScorer(str(tiny_clip_dir))
    with pytest.raises(DataError, match="2 images but 1 prompts"):
        M.clip_t(scorer, [np.zeros((8, 8, 3), np.uint8)] * 2, ["a"])


@pytest.fixture(scope="module")
def lpips_model():
    from idforge.evaluate.lpips import load_lpips

    return load_lpips("stlpips")


def test_lpips_zero_for_identical_and_grows_with_noise(lpips_model, photos):
    import torch

    assert lpips_model.label == "lpips_shift_tolerant"
    x = M.to_tensor([photos["obama/1.jpg"]], size=64)
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    levels = [0.0, 0.05, 0.15, 0.4]
    d = [float(M.lpips_pairs(lpips_model, x, (x + s * noise).clamp(0, 1))[0]) for s in levels]
    assert d[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(d, d[1:], strict=False)), d
    # different people are further apart than a mildly noisy copy
    y = M.to_tensor([photos["biden/1.jpg"]], size=64)
    assert float(M.lpips_pairs(lpips_model, x, y)[0]) > d[1]


def test_pairwise_diversity(lpips_model, photos):
    imgs = M.to_tensor(list(photos.values()), size=64)
    per = M.pairwise_lpips(lpips_model, imgs)
    assert per.shape == (4,) and (per > 0).all()
    # mean of per-image values == mean over unordered pairs
    pairs = [float(M.lpips_pairs(lpips_model, imgs[i : i + 1], imgs[j : j + 1])[0])
             for i in range(4) for j in range(i + 1, 4)]
    assert per.mean() == pytest.approx(np.mean(pairs), rel=1e-5)
    same = M.pairwise_lpips(lpips_model, imgs[:1].repeat(3, 1, 1, 1))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    assert np.isnan(M.pairwise_lpips(lpips_model, imgs[:1])).all()

    e = np.array([[1, 0], [0, 1], [np.nan, np.nan], [1, 0]], np.float32)
    d = M.pairwise_embedding_distance(e)
    np.testing.assert_allclose(d[[0, 1, 3]], [0.5, 1.0, 0.5], atol=1e-6)
    assert np.isnan(d[2])


def test_lpips_to_references_shape(lpips_model, photos):
    gen = M.to_tensor(list(photos.values())[:3], size=64)
    ref = M.to_tensor([photos["obama/1.jpg"], photos["obama/2.jpg"]], size=64)
    d = M.lpips_to_references(lpips_model, gen, ref)
    assert d.shape == (3,)
    # gen[0] is ref[0]: its mean distance is half its distance to ref[1]
    assert d[0] == pytest.approx(float(M.lpips_pairs(lpips_model, gen[:1], ref[1:2])[0]) / 2, rel=1e-5)
