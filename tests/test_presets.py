"""Paper presets: the loader (preset < --config < --set), `--preset` on the commands, the listing, packaging, and
the format every shipped preset keeps (allowed sections, a cited source on every value line, a valid config)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from idforge import presets
from idforge.config import load_config
from idforge.errors import ConfigError

SHIPPED = presets.available_presets()


@pytest.fixture()
def preset_root(tmp_path, monkeypatch) -> Path:
    """A preset directory of our own in place of the package's (the mechanism, independent of the contents)."""
    root = tmp_path / "presets"
    root.mkdir()
    (root / "fake.yaml").write_text(
        "# Fake et al., A Paper (Venue 2099)\n# release: none\n"
        "train:\n  lr: 0.5  # paper Table 1\n  steps: 7  # paper §4\n"
        "generate:\n  guidance_scale: 3.5  # paper §5\n")
    monkeypatch.setattr(presets, "preset_dir", lambda: root)
    return root


def test_preset_merges_first_then_files_then_set(preset_root, tmp_path):
    cfg = load_config(preset="fake")
    assert (cfg.train.lr, cfg.train.steps, cfg.generate.guidance_scale) == (0.5, 7, 3.5)
    over = tmp_path / "over.yaml"
    over.write_text("train:\n  lr: 0.25\n")
    cfg = load_config([over], ["train.steps=9"], preset="fake")
    assert (cfg.train.lr, cfg.train.steps, cfg.generate.guidance_scale) == (0.25, 9, 3.5)
    assert load_config().train.lr != 0.5  # nothing leaks without --preset


def test_unknown_preset_lists_the_choices(preset_root):
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; available presets: fake"):
        load_config(preset="nope")


def test_preset_may_not_set_site_sections(preset_root):
    (preset_root / "site.yaml").write_text("# x\ntracking:\n  uri: sqlite:///x.db  # ours\n")
    with pytest.raises(ConfigError, match=r"preset 'site' .* sets tracking: a preset may only set model, prepare"):
        load_config(preset="site")


def test_cli_lists_presets_and_applies_one(preset_root):
    from idforge.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["methods", "presets"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines() == ["fake                 Fake et al., A Paper (Venue 2099)"]
    shown = runner.invoke(app, ["config", "show", "--preset", "fake", "--set", "train.steps=11"])
    assert shown.exit_code == 0, shown.output
    data = yaml.safe_load(shown.output)
    assert (data["train"]["lr"], data["train"]["steps"]) == (0.5, 11)
    bad = runner.invoke(app, ["config", "show", "--preset", "nope"])
    assert isinstance(bad.exception, ConfigError)


@pytest.mark.parametrize("command", ["train", "finetune", "generate"])
def test_stage_commands_take_preset(command):
    from idforge.cli import app

    out = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert out.exit_code == 0 and "--preset" in out.output
    for sub in (["pipeline", "run", "--help"], ["pipeline", "submit", "--help"]):
        assert "--preset" in CliRunner().invoke(app, sub, terminal_width=200).output


def test_finetune_needs_a_method_or_a_preset(tmp_path):
    from idforge.cli import app

    out = CliRunner().invoke(app, ["finetune", "--dataset", str(tmp_path), "-o", str(tmp_path / "o"), "--all"])
    assert isinstance(out.exception, ConfigError) and "--method NAME (or --preset NAME" in str(out.exception)


def test_package_finds_the_checkout_presets(repo_root):
    """The package's resources/presets is the checkout's configs/presets (so a wheel carries the same files)."""
    assert presets.preset_dir().resolve() == (repo_root / "configs" / "presets").resolve()
    assert sorted(SHIPPED) == sorted(p.stem for p in (repo_root / "configs" / "presets").glob("*.yaml"))


@pytest.mark.slow  # builds a wheel (setuptools, no network): ~5-10 s
def test_wheel_ships_the_presets(repo_root, tmp_path):
    src = tmp_path / "src-tree"
    src.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(repo_root / part, src / part)
    for part in ("src", "components", "pipelines", "configs"):
        shutil.copytree(repo_root / part, src / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("idforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("idforge/resources/presets/")}
    assert shipped == {f"idforge/resources/presets/{name}.yaml" for name in SHIPPED}
    assert shipped, "no preset in the wheel"
    # other package data the methods read at run time (ID-EA's released name list and captions)
    assert {"idforge/resources/id_ea_anchor_names.txt", "idforge/resources/id_ea_prompt_templates.txt"} <= names


# -- the format of every shipped preset (new presets are picked up automatically) --------------------------------

VALUE_LINE = re.compile(r"^\s*(- |[\w.\-]+:\s*\S)")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_preset_cites_every_value(name):
    path = SHIPPED[name]
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{path}: the top comment block must name the paper"
    assert presets.preset_summary(path), f"{path}: empty first comment line"
    uncited = [line for line in lines if not line.lstrip().startswith("#") and VALUE_LINE.match(line)
               and not re.search(r"\s#\s*\S", line)]
    assert uncited == [], f"{path}: value lines without a source comment: {uncited}"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_preset_is_a_valid_config_for_its_method(name):
    from idforge.methods.registry import get_method, method_class

    cfg = load_config(preset=name)
    cls = method_class(name)  # a preset is named for its method
    section = cfg.finetune if cls.regime == "per-identity" else cfg.train
    if cls.regime == "population":
        assert cfg.train.method == name, f"preset {name} trains {cfg.train.method}"
    method = get_method(name, section.method_config)
    assert method.name == name
