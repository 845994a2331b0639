"""Protocol and gates files, reference discovery, artifact resolution: validation and the errors users see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from idforge.errors import ConfigError, DataError
from idforge.evaluate.protocol import load_protocol

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default", "smoke"])
def test_shipped_protocols_load_and_find_their_prompt_sets(name):
    from idforge.io.prompts import load_prompt_set

    p = load_protocol(REPO / "configs" / "protocols" / f"{name}.yaml")
    pset = load_prompt_set(p.prompt_set_path())
    assert p.seeds_used and len(pset) >= 3
    assert set(p.face_backends) == {"opencv", "insightface"}
    # methods condition on insightface ArcFace: the headline score uses the other model
    assert p.primary_face_backend("insightface") == "opencv"
    assert p.primary_face_backend("opencv") == "insightface"
    if name == "default":
        assert set(pset.categories) == {"clothing", "accessory", "action", "expression", "view", "background",
                                        "style", "complex"}
        assert p.seeds_used == [0, 1, 2, 3]


def test_protocol_fingerprint_tracks_what_matters(tmp_path):
    a = load_protocol(REPO / "configs/protocols/smoke.yaml")
    moved = tmp_path / "elsewhere.yaml"
    data = yaml.safe_load((REPO / "configs/protocols/smoke.yaml").read_text())
    data["prompt_set"] = str(REPO / "data/prompts/smoke.yaml")
    moved.write_text(yaml.safe_dump(data))
    b = load_protocol(moved)
    assert b.prompt_set_path() == REPO / "data/prompts/smoke.yaml"
    data["seeds"] = [0, 1, 2]
    moved.write_text(yaml.safe_dump(data))
    c = load_protocol(moved)
    assert a.fingerprint() != c.fingerprint()
    assert len(a.fingerprint()) == 16


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"name": "x", "prompt_set": "p.yaml", "seedz": [1]}, r"unknown config key 'seedz' \(did you mean 'seeds'\?\)"),
        ({"name": "x", "prompt_set": "p.yaml", "seeds": [1, 1]}, "seeds must be unique"),
        ({"name": "x", "prompt_set": "p.yaml", "seeds": [0], "images_per_prompt": 3}, "needs at least that many seeds"),
        ({"name": "x", "prompt_set": "p.yaml", "face_backends": ["dlib"]}, "face_backends"),
        ({"name": "x", "prompt_set": "p.yaml", "metrics": {"fid": True}}, "metrics.fid"),
        ({"prompt_set": "p.yaml"}, "'name'"),
    ],
)
def test_bad_protocol_names_file_and_key(tmp_path, content, match):
    f = tmp_path / "proto.yaml"
    f.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=match) as exc:
        load_protocol(f)
    assert str(f) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_protocol_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_protocol("/nonexistent/proto.yaml")


def test_gates_load_and_check(tmp_path):
    from idforge.evaluate.register import check_gates, load_gates

    g = load_gates(REPO / "configs/gates.yaml")
    assert g.alias == "champion" and {x.metric for x in g.gates} == {
        "id_sim_opencv_excl_missing", "clip_t", "face_det_rate_opencv"}
    res = check_gates({"id_sim_opencv_excl_missing": 0.5, "clip_t": 0.25, "face_det_rate_opencv": 0.9}, g)
    assert all(r.passed for r in res)
    res = check_gates({"id_sim_opencv_excl_missing": float("nan"), "clip_t": 0.1}, g)
    assert [r.passed for r in res] == [False, False, False]
    assert "not logged" in str(res[2]) and "FAIL: 0.1000" in str(res[1])
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump({"gates": [{"metric": "clip_t", "op": "=>", "value": 1}]}))
    with pytest.raises(ConfigError, match=r"gates\.0\.op"):
        load_gates(bad)
    bad.write_text(yaml.safe_dump({"gates": []}))
    with pytest.raises(ConfigError, match="gates"):
        load_gates(bad)


def _png(path: Path, size: int = 112, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def test_discover_references_layouts(tmp_path):
    from idforge.evaluate.refs import discover_references, references_prealigned

    # curated dataset: accepted rows with an identity, the FFHQ crop column preferred
    ds = tmp_path / "ds"
    for n in ("a1", "a2", "b1", "r1"):
        _png(ds / "crops" / f"{n}_512.png", 512)
    pd.DataFrame({
        "source": ["a1.jpg", "a2.jpg", "b1.jpg", "r1.jpg", "x.jpg"],
        "status": ["accepted", "accepted", "accepted", "rejected", "accepted"],
        "identity": ["a", "a", "b", "a", ""],
        "aligned": ["crops/a1_112.png", "crops/a2_112.png", "crops/b1_112.png", "", ""],
        "aligned_ffhq": ["crops/a1_512.png", "crops/a2_512.png", "crops/b1_512.png", "crops/r1_512.png", ""],
    }).to_parquet(ds / "manifest.parquet")
    refs = discover_references(ds)
    assert {k: [p.name for p in v] for k, v in refs.items()} == {"a": ["a1_512.png", "a2_512.png"], "b": ["b1_512.png"]}
    assert references_prealigned(ds)
    assert list(discover_references(ds, ["b"])) == ["b"]
    with pytest.raises(DataError, match=r"identities \['zed'\] not found; available: a, b"):
        discover_references(ds, ["zed"])

    # folder of identity folders; a folder of photos; one photo
    _png(tmp_path / "ids" / "p" / "1.png", 64)
    _png(tmp_path / "ids" / "q" / "1.jpg", 64)
    assert list(discover_references(tmp_path / "ids")) == ["p", "q"]
    assert not references_prealigned(tmp_path / "ids")
    assert list(discover_references(tmp_path / "ids" / "p")) == ["p"]
    assert list(discover_references(tmp_path / "ids" / "q" / "1.jpg")) == ["1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no identities found"):
        discover_references(tmp_path / "empty")


def test_prealigned_crops_skip_the_detector(tmp_path):
    from idforge.evaluate.refs import align_references

    class NoDetector:
        name = "none"

        def detect(self, rgb):
            raise AssertionError("prealigned crops must not be re-detected")

    crop512 = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    crop112 = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    faces = align_references("a", [crop512, crop112], NoDetector(), prealigned=True)
    assert faces.crops112.shape == (2, 112, 112, 3) and faces.crops512.shape == (2, 512, 512, 3)
    np.testing.assert_array_equal(faces.crops512[0], crop512)
    np.testing.assert_array_equal(faces.crops112[1], crop112)


def test_reference_without_face_is_an_error(analyzers):
    from idforge.evaluate.refs import align_references

    with pytest.raises(DataError, match="identity 'blank': none of its 1 reference photos has a detectable face"):
        align_references("blank", [np.full((200, 200, 3), 90, np.uint8)], analyzers["opencv"])


def test_resolve_artifact(tmp_path):
    from idforge.evaluate.generate import resolve_artifact

    single = tmp_path / "m.safetensors"
    single.write_bytes(b"x")
    assert resolve_artifact(single, "anyone") == single
    assert resolve_artifact(None, "a") is None
    per = tmp_path / "per"
    (per / "alice").mkdir(parents=True)
    (per / "alice" / "method.safetensors").write_bytes(b"x")
    (per / "bob.safetensors").write_bytes(b"x")
    assert resolve_artifact(per, "alice") == per / "alice" / "method.safetensors"
    assert resolve_artifact(per, "bob") == per / "bob.safetensors"
    with pytest.raises(DataError, match="no checkpoint for identity 'carol'"):
        resolve_artifact(per, "carol")
    # finetune --all layout: artifact.json names the weights file
    (per / "dave").mkdir()
    (per / "dave" / "learned_embeds.safetensors").write_bytes(b"x")
    (per / "dave" / "artifact.json").write_text('{"method": "id-ea", "file": "learned_embeds.safetensors"}')
    assert resolve_artifact(per, "dave") == per / "dave" / "learned_embeds.safetensors"
    # one identity's artifact directory given directly
    assert resolve_artifact(per / "dave", "whoever") == per / "dave" / "learned_embeds.safetensors"
    with pytest.raises(DataError, match="does not exist"):
        resolve_artifact(tmp_path / "nope.safetensors", "a")
