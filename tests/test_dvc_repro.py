"""`dvc repro` of dvc.yaml + params.yaml, for real, in a copy of the repository's pipeline files.

One reproduction (module fixture) on the tiny models with the sample photos, then: every stage ran and left its
outputs, `dvc metrics show` prints the evaluation, a second `dvc repro` re-runs nothing, and a changed `train`
param makes train -> generate -> evaluate due while models, curate and prepare stay cached. A fast test checks
dvc.yaml against params.yaml and the repository without running DVC.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

STAGES = ["models", "curate", "prepare", "train", "generate", "evaluate"]
# What the repository holds that `dvc repro` reads: the pipeline, its params, the protocols and prompt sets, the
# DVC config and ignore files, and the code the stages list as dependencies.
COPY = ["dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", ".dvc/config", "configs", "data/.gitignore",
        "data/samples.dvc", "data/prompts", "src/idforge"]
TEST_PROTOCOL = "configs/protocols/dvc-test.yaml"


def _dvc(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    dvc = str(Path(sys.executable).parent / "dvc")
    proc = subprocess.run([dvc, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def _ran(log: str) -> list[str]:
    return re.findall(r"^Running stage '([\w-]+)'", log, flags=re.M)


def _skipped(log: str) -> list[str]:
    return re.findall(r"^Stage '([\w-]+)' didn't change, skipping", log, flags=re.M)


def _edit_params(path: Path, **sections: dict) -> None:
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _resolve(text: str, params: dict) -> str:
    """``${a.b}`` -> params["a"]["b"], as DVC interpolates dvc.yaml from params.yaml."""

    def value(match: re.Match[str]) -> str:
        node = params
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, text)


def test_dvc_yaml_and_params_match_the_repository(repo_root: Path) -> None:
    """Fast guard (no DVC run): params.yaml is a valid idforge config, and every dependency of dvc.yaml exists."""
    from idforge.config import load_config

    cfg = load_config([repo_root / "params.yaml"])
    assert cfg.evaluate.clip_model == cfg.model.clip  # the tiny CLIP the models stage builds
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES

    outs: set[str] = set()
    for name, stage in stages.items():
        assert stage["cmd"].startswith("idforge "), name
        assert "-c params.yaml" in stage["cmd"] or name == "models", name
        for section in stage["params"]:  # DVC fails on a params key missing from params.yaml
            node = params
            for key in section.split("."):
                assert key in node, f"stage {name}: param {section} not in params.yaml"
                node = node[key]
        for dep in stage["deps"]:
            path = _resolve(dep, params)
            assert path.startswith("outputs/dvc/") or (repo_root / path).exists(), f"stage {name}: no {path}"
            if path.startswith("outputs/dvc/"):  # produced upstream, inside an earlier stage's output
                assert any(path == o or path.startswith(o + "/") for o in outs), f"stage {name}: {path} from where?"
        for out in stage["outs"]:
            path = _resolve(out, params)
            assert path.startswith("outputs/dvc/"), f"stage {name}: output {path} outside outputs/dvc/"
            outs.add(path)
    metrics = [next(iter(m)) for m in stages["evaluate"]["metrics"]]
    assert metrics == ["outputs/dvc/eval/summary.json"]
    assert stages["evaluate"]["metrics"][0][metrics[0]] == {"cache": False}


@pytest.fixture(scope="module")
def reproduced(repo_root: Path, samples_dir: Path, _mlflow_template_db: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """(project dir, env, log of the first `dvc repro`): a fresh git + DVC project holding the pipeline files."""
    root = tmp_path_factory.mktemp("dvc-project")
    for rel in COPY:
        src, dst = repo_root / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    shutil.copytree(samples_dir, root / "data" / "samples")

    # Speed, not semantics: 2 training steps, one prompt x one seed per identity.
    protocol = yaml.safe_load((root / "configs/protocols/smoke.yaml").read_text())
    protocol.update(name="dvc-test", categories=["plain"], seeds=[0], images_per_prompt=1)
    (root / TEST_PROTOCOL).write_text(yaml.safe_dump(protocol, sort_keys=False))
    db = root / "mlruns.db"
    shutil.copyfile(_mlflow_template_db, db)
    _edit_params(root / "params.yaml",
                 tracking={"uri": f"sqlite:///{db}"},
                 train={"steps": 2, "checkpoint_every": 2, "report_every": 2},
                 generate={"protocol": TEST_PROTOCOL},
                 evaluate={"protocol": TEST_PROTOCOL})

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the stages call `idforge`
        "DVC_NO_ANALYTICS": "1",
        "RAY_AUTH_MODE": "disabled",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,  # no user git config leaks in
        "XDG_CONFIG_HOME": str(root / ".xdg"),  # nor a user/global DVC config
        "OMP_NUM_THREADS": "1",  # 2 shared cores: intra-op spin-waits cost more than they give on tiny models
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # params.yaml's tracking.uri decides
    for git in (["init", "-q"], ["add", "-A"], ["-c", "user.name=test", "-c", "user.email=test@example.invalid",
                                                 "commit", "-q", "-m", "pipeline"]):
        subprocess.run(["git", *git], cwd=root, env=env, check=True)
    log = _dvc(["repro"], root, env)
    return root, env, log


@pytest.mark.slow
def test_repro_runs_every_stage_and_leaves_outputs(reproduced: tuple[Path, dict[str, str], str]) -> None:
    root, _, log = reproduced
    assert _ran(log) == STAGES, log[-3000:]

    out = root / "outputs" / "dvc"
    for rel in ["models/tiny-sd15/model_index.json", "models/tiny-clip/config.json",
                "dataset/manifest.parquet/part-00000.parquet", "dataset/identities.parquet",
                "prepared/index.parquet", "train/method.safetensors",
                "generated/index.parquet", "eval/metrics.parquet", "eval/aggregates.parquet", "eval/report.html",
                "eval/summary.json"]:
        assert (out / rel).is_file(), f"{rel} missing after dvc repro"

    # dvc.lock records every stage with the hash of each output, so a clone can `dvc pull` instead of re-running.
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == sorted(STAGES)
    for name in STAGES:
        assert lock[name]["outs"] and all(o.get("md5") for o in lock[name]["outs"]), name
    assert lock["train"]["params"]["params.yaml"]["train"]["steps"] == 2


@pytest.mark.slow
def test_metrics_show_prints_the_evaluation(reproduced: tuple[Path, dict[str, str], str]) -> None:
    root, env, _ = reproduced
    shown = json.loads(_dvc(["metrics", "show", "--json"], root, env))
    assert len(shown) == 1, shown  # the workspace only (DVC 3 names it "")
    data = next(iter(shown.values()))["data"]["outputs/dvc/eval/summary.json"]["data"]
    summary = json.loads((root / "outputs/dvc/eval/summary.json").read_text())
    # Every number of the summary (DVC leaves out the nulls: metrics undefined when no face was found).
    assert data["metrics"] == {k: v for k, v in summary["metrics"].items() if v is not None}
    metrics = data["metrics"]
    # 3 identities with >= 2 accepted photos x 1 prompt x 1 seed.
    assert metrics["num_images"] == 3
    assert -1.0 <= metrics["clip_t"] <= 1.0 and math.isfinite(metrics["clip_t"])
    assert 0.0 <= metrics["face_det_rate"] <= 1.0
    table = _dvc(["metrics", "show"], root, env)
    assert "clip_t" in table and "face_det_rate" in table


@pytest.mark.slow
def test_second_repro_is_a_noop_and_a_train_param_reruns_only_downstream(
    reproduced: tuple[Path, dict[str, str], str],
) -> None:
    root, env, _ = reproduced
    summary = root / "outputs/dvc/eval/summary.json"
    before = summary.read_text()

    log = _dvc(["repro"], root, env)
    assert _ran(log) == [], log[-3000:]
    assert sorted(_skipped(log)) == sorted(STAGES)
    assert summary.read_text() == before  # same MLflow run id: evaluate did not run again
    assert "up to date" in _dvc(["status"], root, env)

    _edit_params(root / "params.yaml", train={"lr": 3e-4})
    status = json.loads(_dvc(["status", "--json"], root, env))
    assert set(status) == {"train"}, status
    assert status["train"] == [{"changed deps": {"params.yaml": {"train": "modified"}}}]
    # What `dvc repro` would run now: train, and (its weights change) everything downstream of it.
    dry = _dvc(["repro", "--dry", "--force-downstream"], root, env)
    assert _ran(dry) == ["train", "generate", "evaluate"], dry[-3000:]
    assert sorted(_skipped(dry)) == ["curate", "models", "prepare"]
