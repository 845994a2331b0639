"""The few settings a pipeline run changes (preset, steps, learning rate), applied over the run's config text.

A pipeline receives the rest of the config as YAML (``config_yaml``); these arrive as typed pipeline parameters so
a user can change them per run in the Kubeflow UI. Precedence, lowest first: ``config_yaml`` < the preset < the
typed settings. The preset goes over ``config_yaml``, not under it, because ``idforge pipeline submit`` passes a
fully resolved config (every key spelled out), under which a preset could change nothing.
"""

from __future__ import annotations

from idforge.errors import ConfigError

__all__ = ["resolve_run_config"]


def resolve_run_config(config_yaml: str, preset: str = "", steps: int = 0, lr: float = 0.0,
                       source: str = "pipeline parameter config_yaml"):
    """The run's ``IdforgeConfig``: ``config_yaml``, then the paper preset named ``preset`` (``idforge.presets``;
    "" = none), then ``steps`` and ``lr`` for both training regimes (``train.*`` and ``finetune.*``; 0 = keep the
    config's value).

    Raises:
        ConfigError: a malformed config or preset, an unknown preset, or a negative ``steps``/``lr``.
    """
    from idforge.config import _deep_merge, load_config_text, validate_config
    from idforge.presets import read_preset

    if steps < 0 or lr < 0:
        raise ConfigError(f"steps={steps} and lr={lr} must be >= 0 (0 keeps the config's value)")
    base = load_config_text(config_yaml, source=source).model_dump(mode="json")
    if preset:
        base = _deep_merge(base, read_preset(preset))
        source = f"{source} + preset {preset}"
    for section in ("train", "finetune"):
        if steps:
            base[section]["steps"] = steps
        if lr:
            base[section]["lr"] = lr
    return validate_config(base, source=source)
