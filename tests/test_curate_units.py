"""Unit behaviour of the small stages: pose and blur measures (the gates: test_curate_gates.py), perceptual
hash and duplicates, clustering and identity ids, labels parsing, matte compositing."""

from __future__ import annotations

import numpy as np
import pytest

from idforge.curate import dedup, group
from idforge.curate.gates import pose_from_landmarks, sharpness
from idforge.curate.matte import composite, landmark_matte
from idforge.errors import DataError
from idforge.faces.align import ARCFACE_TEMPLATE_112


def test_pose_is_zero_for_the_template_and_grows_with_nose_offset():
    yaw, roll = pose_from_landmarks(ARCFACE_TEMPLATE_112 * 3 + 40)
    assert abs(yaw) < 1 and abs(roll) < 1
    turned = ARCFACE_TEMPLATE_112.copy()
    turned[2, 0] = turned[1, 0] - 1  # nose almost under the right eye: a near-profile face
    yaw, _ = pose_from_landmarks(turned)
    assert yaw > 60
    turned[2, 0] = turned[0, 0] + 1
    assert pose_from_landmarks(turned)[0] < -60
    a = np.deg2rad(30)
    rot = ARCFACE_TEMPLATE_112 @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    yaw, roll = pose_from_landmarks(rot)
    assert abs(yaw) < 1 and roll == pytest.approx(30, abs=0.5)  # roll does not leak into yaw


def test_sharpness_drops_with_blur():
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    assert sharpness(img) > 10 * sharpness(cv2.GaussianBlur(img, (0, 0), 3))


def test_phash_is_stable_under_reencoding_and_differs_between_images():
    import cv2

    rng = np.random.default_rng(1)
    a = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (0, 0), 6)
    b = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (0, 0), 6)
    ok, enc = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 60])
    a2 = cv2.imdecode(enc, cv2.IMREAD_COLOR)
    ha, ha2, hb = dedup.phash(a), dedup.phash(a2), dedup.phash(b)
    assert 0 <= ha < 2**64
    assert dedup.hamming(ha, ha2) <= 4 < 16 <= dedup.hamming(ha, hb)


def test_duplicates_keep_the_first_by_order_key():
    e = np.array([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0]], np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    hashes = [0b1010, 0b1011, 0b1010]  # the third has the same hash but is another person: never a duplicate
    keys = [(0, "b.jpg"), (-5, "a.jpg"), (0, "c.jpg")]  # the second is the larger face: it is kept
    assert dedup.find_duplicates(e, hashes, keys, 0.35, 8, 0.99) == [1, -1, -1]
    assert dedup.find_duplicates(e, [0, 2**64 - 1, 5], keys, 0.35, 8, 0.9999) == [-1, -1, -1]  # hashes far apart
    assert dedup.find_duplicates(np.zeros((0, 2), np.float32), [], [], 0.35, 8, 0.95) == []


def _blobs(rng, centres, n):
    pts = [c + 0.05 * rng.standard_normal((n, len(c))) for c in centres]
    e = np.concatenate(pts).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.mark.parametrize("linkage", ["average", "connected"])
def test_cluster_finds_separated_people(linkage):
    rng = np.random.default_rng(2)
    centres = np.eye(3, 16) * 1.0
    e = _blobs(rng, centres, 4)
    labels = group.cluster(e, 0.4, linkage)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert group.cluster(e[:1], 0.4, linkage).tolist() == [0]
    with pytest.raises(DataError):
        group.cluster(e, 0.4, "ward")


def test_identity_ids_are_stable_and_labels_win():
    clusters = np.array([0, 0, 1, 1, 2])
    keys = ["s1:0", "s2:0", "s3:0", "s4:0", "s5:0"]
    ids = group.assign_identities(clusters, keys, ["", "", "", "", ""])
    assert ids[0] == ids[1] == group.cluster_id(["s2:0", "s1:0"]) and ids[2] == ids[3] != ids[0]
    assert group.assign_identities(clusters[::-1], keys[::-1], [""] * 5)[::-1] == ids  # order-free
    over = group.assign_identities(clusters, keys, ["ann", "", "bob", "cid", ""], mode="override")
    assert over[:4] == ["ann", "ann", "bob", "cid"] and over[4].startswith("id-")
    seed = group.assign_identities(clusters, keys, ["ann", "", "bob", "cid", ""], mode="seed")
    assert seed[:4] == ["ann", "ann", "bob", "bob"]  # tie -> alphabetical majority


def test_labels_csv_parsing(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("source,identity\n/data/x/a.jpg,ann\nb.jpg,bob\n")
    labels = group.read_labels(p)
    assert group.label_for(labels, "/data/x/a.jpg", "a.jpg") == "ann"
    assert group.label_for(labels, "s3://b/p/sub/b.jpg", "sub/b.jpg") == "bob"
    assert group.label_for(labels, "/elsewhere/c.jpg", "c.jpg") == ""
    p.write_text("file,identity\na.jpg,ann smith\n")
    with pytest.raises(DataError, match="letters"):
        group.read_labels(p)
    p.write_text("file,identity\na.jpg,\n")
    with pytest.raises(DataError, match="line 2"):
        group.read_labels(p)
    with pytest.raises(DataError, match="does not exist"):
        group.read_labels(tmp_path / "nope.csv")


def test_pairwise_precision_recall():
    assert group.pairwise_precision_recall(["a", "a", "b"], ["x", "x", "y"]) == (1.0, 1.0)
    p, r = group.pairwise_precision_recall(["a", "a", "a"], ["x", "x", "y"])
    assert p == pytest.approx(1 / 3) and r == 1.0
    p, r = group.pairwise_precision_recall(["a", "b", "c"], ["x", "x", "y"])
    assert p == 1.0 and r == 0.0


def test_composite_and_landmark_matte():
    rgb = np.full((4, 4, 3), 200, np.uint8)
    m = np.zeros((4, 4), np.uint8)
    m[:2] = 255
    out = composite(rgb, m, grey=128)
    assert (out[:2] == 200).all() and (out[2:] == 128).all()
    half = composite(rgb, np.full((4, 4), 128, np.uint8), grey=0)
    assert abs(int(half[0, 0, 0]) - 100) <= 1
    face = np.zeros((64, 64), np.uint8)
    face[16:48, 16:48] = 255
    soft = landmark_matte(face)
    assert soft[32, 32] == 255 and soft[0, 0] == 0 and 0 < soft[16, 32] < 255


def test_matte_python_resolution_order(monkeypatch, tmp_path):
    from idforge.curate.config import MatteConfig
    from idforge.curate.matte import matte_python

    monkeypatch.setenv("IDFORGE_MATTE_PYTHON", "/opt/matte/bin/python")
    assert str(matte_python(MatteConfig(python="/x/bin/python"))) == "/x/bin/python"
    assert str(matte_python(MatteConfig())) == "/opt/matte/bin/python"
    monkeypatch.delenv("IDFORGE_MATTE_PYTHON")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".venv-matte" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-matte" / "bin" / "python").touch()
    assert matte_python(MatteConfig()) == tmp_path.joinpath(".venv-matte/bin/python").relative_to(tmp_path)
