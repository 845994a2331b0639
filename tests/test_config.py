from __future__ import annotations

import pytest
import yaml

from idforge.config import IdforgeConfig, apply_overrides, dump_config, load_config, write_resolved_config
from idforge.errors import ConfigError


def test_defaults_load_and_round_trip(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, IdforgeConfig)
    path = write_resolved_config(cfg, tmp_path)
    again = load_config([path])
    assert again == cfg


def test_files_merge_left_to_right_and_overrides_win(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"run": {"seed": 1, "name": "a"}, "curate": {"min_face_px": 80}}))
    b.write_text(yaml.safe_dump({"run": {"seed": 2}}))
    cfg = load_config([a, b], ["curate.min_face_px=96", "tracking.experiment=exp1"])
    assert cfg.run.seed == 2 and cfg.run.name == "a"
    assert cfg.curate.min_face_px == 96
    assert cfg.tracking.experiment == "exp1"


def test_override_values_are_typed():
    data = apply_overrides({}, ["a.b=1e-4", "a.c=3", "a.d=true", "a.e=[1, 2]", "a.f=null", "a.g=text"])
    assert data["a"] == {"b": 1e-4, "c": 3, "d": True, "e": [1, 2], "f": None, "g": "text"}


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["curate.min_face_pix=3"])
    msg = str(exc.value)
    assert "curate.min_face_pix" in msg
    assert "did you mean 'curate.min_face_px'" in msg
    assert "min_images_per_identity" in msg  # the allowed names are listed
    assert "\n" not in msg


def test_bad_enum_value_names_the_allowed_values():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["curate.backend=dlib"])
    msg = str(exc.value)
    assert "curate.backend" in msg and "insightface" in msg and "opencv" in msg


def test_wrong_type_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="run.seed"):
        load_config(overrides=["run.seed=notanint"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(overrides=["run.seed"])
    with pytest.raises(ConfigError, match="run.seed"):
        load_config(overrides=["run.seed.x=1"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"run": {"seed": 1}}, ["run.seed.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([bad])


def test_dump_spells_out_every_section():
    text = dump_config(load_config())
    data = yaml.safe_load(text)
    assert {"run", "storage", "tracking", "model", "curate"} <= set(data)
