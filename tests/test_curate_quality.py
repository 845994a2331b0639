"""Quality bars on the real sample photos, for both backends: every face found, identities recovered
(pairwise precision and recall >= 0.95, no two people merged), the re-encoded duplicate caught; the mediapipe
person matte in its own venv; the CLI command."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from idforge.curate.group import pairwise_precision_recall
from tests.fixtures.paths import REPO


@pytest.fixture(scope="session")
def matte_python():
    """The mediapipe venv (created from the package index on a fresh machine, reused afterwards)."""
    from idforge.curate.matte import create_matte_env

    return create_matte_env(REPO / ".venv-matte")


@pytest.fixture(scope="module")
def curated(face_photos, tmp_path_factory, matte_python):
    """backend -> (dataset dir, manifest DataFrame, report). insightface runs with the mediapipe matte."""
    from idforge.curate.config import CurateConfig
    from idforge.curate.manifest import read_manifest
    from idforge.curate.run import curate_dataset

    out = {}
    for backend, matte in (("insightface", {"backend": "mediapipe", "python": str(matte_python)}),
                           ("opencv", {"backend": "landmarks"})):
        ds = tmp_path_factory.mktemp(f"curated_{backend}") / "ds"
        cfg = CurateConfig(backend=backend, matte=matte, progress=False,
                           work_dir=str(tmp_path_factory.mktemp("work")))
        report = curate_dataset(str(face_photos.root), str(ds), cfg=cfg)
        out[backend] = (ds, read_manifest(ds), report)
    return out


BACKENDS = ["insightface", "opencv"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_face_is_detected_once(backend, curated, face_photos):
    _, manifest, _ = curated[backend]
    faces = manifest[manifest["face_index"] >= 0]
    assert sorted(faces["rel"]) == sorted(face_photos.labels), "a photo lost its face or gained a second one"
    assert not manifest["reason"].isin(["no_face", "decode_error", "blurry", "face_too_small"]).any()
    # the non-photo files of the sample folder are listed too, as not_an_image
    others = manifest[~manifest["rel"].isin(list(face_photos.labels))]
    assert len(others) > 0 and set(others["reason"]) == {"not_an_image"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouping_recovers_the_people(backend, curated, face_photos):
    ds, manifest, report = curated[backend]
    faces = manifest[manifest["face_index"] == 0].set_index("rel")
    rels = sorted(face_photos.labels)
    pred = [faces.loc[r, "identity"] for r in rels]
    truth = [face_photos.labels[r] for r in rels]
    precision, recall = pairwise_precision_recall(pred, truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    for ident in set(pred):  # no two people merged into one identity
        assert len({t for p, t in zip(pred, truth, strict=True) if p == ident}) == 1
    for dup, original in face_photos.duplicates.items():
        assert faces.loc[dup, "reason"] == "duplicate"
        assert faces.loc[dup, "duplicate_of"].endswith(original)
    # people with one photo are kept out of identities.parquet (min 2 images) but still carry an identity
    ids = __import__("pandas").read_parquet(ds / "identities.parquet")
    truth_counts = {t: truth.count(t) - sum(face_photos.labels[d] == t for d in face_photos.duplicates)
                    for t in set(truth)}
    assert sorted(ids["members"]) == sorted(c for c in truth_counts.values() if c >= 2)
    singles = [r for r in rels if truth_counts[face_photos.labels[r]] == 1]
    assert all(faces.loc[r, "reason"] == "too_few_images" for r in singles)
    dim = 512 if backend == "insightface" else 128
    emb = np.load(ds / "embeddings.npy")
    assert emb.shape == (len(rels), dim) and report.backend["embedding_dim"] == dim
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for _, row in ids.iterrows():  # the centroid row belongs to its identity
        assert manifest.loc[manifest["embedding_row"] == row["centroid_row"], "identity"].item() == row["identity"]


@pytest.mark.slow
def test_mediapipe_matte_separates_person_from_background(curated):
    ds, manifest, _ = curated["insightface"]
    rows = manifest[manifest["matted"] != ""]
    assert len(rows) == 12
    corners_bg = 0
    for _, row in rows.iterrows():
        person = np.asarray(Image.open(ds / row["person_mask"]), dtype=np.float64)
        face = np.asarray(Image.open(ds / row["mask"])) > 0
        matted = np.asarray(Image.open(ds / row["matted"]).convert("RGB"), dtype=np.float64)
        assert person.shape == face.shape == (512, 512)
        assert person[face].mean() > 200  # the face is part of the person
        corner = person[:48, :48].mean() + person[:48, -48:].mean()
        corners_bg += corner < 2 * 64
        # where the matte says background, the composite is the neutral grey
        bg = person < 5
        if bg.any():
            assert np.abs(matted[bg] - 128).max() <= 2
    assert corners_bg >= 0.75 * len(rows)  # top corners of a portrait crop are background


@pytest.mark.slow
def test_cli_curate_with_labels_names_identities(face_photos, tmp_path):
    from typer.testing import CliRunner

    from idforge.cli import app
    from idforge.curate.manifest import read_identities, read_manifest

    out = tmp_path / "ds"
    result = CliRunner().invoke(app, [
        "curate", "--input", str(face_photos.root), "--output", str(out), "--labels", str(face_photos.labels_csv),
        "--set", "curate.matte.backend=landmarks", "--set", "curate.progress=false",
        "--set", f"curate.work_dir={tmp_path / 'work'}",
    ])
    assert result.exit_code == 0, result.output
    assert "accepted faces: 8 in 3 identities" in result.output
    assert "grouping_pairwise_precision: 1.000" in result.output
    ids = read_identities(out)
    assert sorted(ids["identity"]) == ["ardern", "macron", "obama"]
    assert list(ids["identity"]) == list(ids["label"])
    m = read_manifest(out)
    acc = m[m["status"] == "accepted"]
    assert all(acc["identity"] == acc["rel"].str.split("/").str[0])
