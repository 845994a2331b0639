"""The installed ``idforge`` command: fast help without heavy imports, models make-tiny/check, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

IDFORGE = Path(sys.executable).with_name("idforge")
HEAVY = ("torch", "diffusers", "transformers", "mlflow", "ray", "cv2", "insightface", "kfp")


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(IDFORGE), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_help_lists_the_commands():
    # That help stays instant is guarded by what it imports (next test), not by a wall-clock bound on a shared CPU.
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("models", "curate", "personalize", "doctor", "demo"):
        assert command in proc.stdout


def test_help_imports_nothing_heavy():
    code = (
        "import sys, json\n"
        "sys.argv = ['idforge', '--help']\n"
        "from idforge.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    for sub in (["models", "--help"], ["models", "make-tiny", "--help"]):
        assert _run(*sub).returncode == 0


@pytest.mark.slow  # a fresh interpreter imports transformers: ~4-7 s on 2 shared cores
def test_make_tiny_subprocess_writes_a_loadable_clip(tmp_path):
    out = tmp_path / "clip"
    proc = _run("models", "make-tiny", str(out), "--kind", "clip", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout

    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(out).config.projection_dim == 32


def test_make_tiny_sd15_then_check_in_process(tmp_path):
    from typer.testing import CliRunner

    from idforge.cli import app

    runner = CliRunner()
    out = tmp_path / "sd15"
    made = runner.invoke(app, ["models", "make-tiny", str(out), "--kind", "sd15", "--seed", "1"])
    assert made.exit_code == 0, made.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    check = runner.invoke(app, ["models", "check", str(out)])
    assert check.exit_code == 0, check.output
    assert "StableDiffusionPipeline" in check.output and "64x64" in check.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["models", "check", "someone/not-a-model"], "'someone/not-a-model'"),
        (["models", "check", "/no/such/model-dir"], "/no/such/model-dir does not exist"),
        (["models", "make-tiny", "unused-dir", "--kind", "sd3"], "kind='sd3'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path):
    proc = _run(*args, env={"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "unused-dir").exists()
