"""The typed per-run pipeline parameters over config_yaml: what wins, what is kept, what is refused."""

from __future__ import annotations

import pytest

from components.settings import resolve_config
from idforge.config import dump_config, load_config_text
from idforge.errors import ConfigError
from idforge.run_settings import resolve_run_config


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


def test_preset_goes_over_config_yaml_and_under_the_typed_settings():
    """The shipped pidiff preset (idforge.presets) over a fully resolved config, then the typed settings."""
    full = dump_config(load_config_text("finetune: {steps: 50, batch_size: 1}\nmodel: {kind: sdxl}"))
    cfg = resolve_run_config(full, preset="pidiff", lr=2e-5)
    # the preset's values win over config_yaml's, the typed lr over the preset's; keys it does not set stay
    assert (cfg.finetune.steps, cfg.finetune.batch_size, cfg.model.kind) == (600, 4, "sd15")
    assert cfg.finetune.lr == cfg.train.lr == 2e-5
    assert cfg.finetune.method_config["scale"] == 0.4
    assert resolve_run_config(full, preset="pidiff", steps=10).finetune.steps == 10
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; available presets: .*pidiff"):
        resolve_run_config("", preset="nope")
