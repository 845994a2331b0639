"""The typed per-run pipeline parameters over config_yaml: what wins, what is kept, what is refused."""

from __future__ import annotations

import pytest
import yaml

from components.settings import resolve_config
from idforge.config import dump_config, load_config_text
from idforge.errors import ConfigError
from idforge.run_settings import PRESETS_ENV, resolve_run_config


def test_typed_settings_win_and_zero_keeps_the_config():
    text = "train: {steps: 50, lr: 0.001}\nfinetune: {steps: 7}\n"
    kept = resolve_run_config(text)
    assert (kept.train.steps, kept.train.lr, kept.finetune.steps, kept.finetune.lr) == (50, 0.001, 7, None)
    set_ = resolve_run_config(text, steps=3, lr=2e-5)
    assert (set_.train.steps, set_.train.lr, set_.finetune.steps, set_.finetune.lr) == (3, 2e-5, 3, 2e-5)
    # the component returns the resolved YAML, the same text for the same inputs (stable cache keys)
    out = resolve_config.python_func(config_yaml=text, steps=3, lr=2e-5)
    assert out == dump_config(set_) == resolve_config.python_func(config_yaml=text, steps=3, lr=2e-5)
    assert load_config_text(out).train.steps == 3
    with pytest.raises(ConfigError, match="must be >= 0"):
        resolve_run_config(text, steps=-1)


def test_preset_goes_over_config_yaml_and_under_the_typed_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(PRESETS_ENV, str(tmp_path))
    (tmp_path / "pidiff.yaml").write_text(yaml.safe_dump({"train": {"steps": 900, "lr": 3e-4},
                                                          "model": {"dtype": "float16"}}))
    full = dump_config(load_config_text("train: {steps: 50}"))  # what `pipeline submit` passes: every key set
    cfg = resolve_run_config(full, preset="pidiff", steps=10)
    assert (cfg.train.steps, cfg.train.lr, cfg.model.dtype) == (10, 3e-4, "float16")
    with pytest.raises(ConfigError, match=r"preset 'sefi' not found .*available: pidiff"):
        resolve_run_config("", preset="sefi")
    with pytest.raises(ConfigError, match="no path"):
        resolve_run_config("", preset="../pidiff")
    (tmp_path / "bad.yaml").write_text("train: {stepz: 1}\n")
    with pytest.raises(ConfigError, match=r"preset bad: unknown config key .train.stepz."):
        resolve_run_config("", preset="bad")
