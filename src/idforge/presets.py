"""Paper presets: ``configs/presets/<method>.yaml``, one config overlay per method that reproduces its paper's setup.

A preset is exactly the YAML a ``--config FILE`` takes, restricted to the sections that describe a method's setup
(``model``, ``prepare``, ``train``, ``finetune``, ``generate``); a comment block at the top names the paper and the
release it follows, and every value line cites its source (paper section/table, release file, or ``ours: why``).
Applying one merges it FIRST: preset < ``--config`` files (left to right) < ``--set`` overrides.

Where they are found: the package's ``resources/presets`` (in the source tree a link to ``configs/presets``), so a
pip-installed idforge finds the same files a checkout has.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from idforge.errors import ConfigError

# The sections a preset may set (``run``, ``storage``, ``tracking``, ``curate``, ``evaluate`` are site settings).
PRESET_SECTIONS = ("model", "prepare", "train", "finetune", "generate")

__all__ = ["PRESET_SECTIONS", "available_presets", "preset_path", "preset_summary", "read_preset"]


def preset_dir() -> Path:
    """The directory holding the ``<name>.yaml`` presets (package data)."""
    return Path(str(resources.files("idforge") / "resources" / "presets"))


def available_presets() -> dict[str, Path]:
    """Preset name -> file, sorted by name."""
    root = preset_dir()
    if not root.is_dir():
        return {}
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def preset_path(name: str) -> Path:
    """The file of preset ``name``.

    Raises:
        ConfigError: no preset of that name (the message lists the available ones).
    """
    presets = available_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(presets) or 'none'} "
                          "(see `idforge methods presets`)")
    return presets[name]


def preset_summary(path: Path) -> str:
    """The first line of the preset's top comment block (the paper it reproduces)."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        text = stripped.lstrip("#").strip()
        if text:
            return text
    return ""


def read_preset(name: str) -> dict[str, Any]:
    """The preset's overlay as a dict (only ``PRESET_SECTIONS`` at the top).

    Raises:
        ConfigError: unknown preset, malformed YAML, or a section a preset may not set.
    """
    from idforge.config import _read_yaml

    path = preset_path(name)
    data = _read_yaml(path)
    bad = sorted(set(data) - set(PRESET_SECTIONS))
    if bad:
        raise ConfigError(f"preset {name!r} ({path}) sets {', '.join(bad)}: a preset may only set "
                          f"{', '.join(PRESET_SECTIONS)}")
    return data
