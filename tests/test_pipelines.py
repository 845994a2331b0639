"""Pipelines: compiled YAML is current, every pipeline has the steps and settings the design asks for."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from components.images import Images
from pipelines.runner import COMPILED_DIR, PipelineError, build, compile_all, registry

EXPECTED = {"curation", "train-adapter", "personalize", "end-to-end", "retrain"}


def _clean_image_env(monkeypatch):
    monkeypatch.delenv("IDFORGE_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("IDFORGE_IMAGE_TAG", raising=False)
    monkeypatch.delenv("IDFORGE_IMAGES_FILE", raising=False)


def test_every_pipeline_is_registered():
    assert set(registry()) == EXPECTED


def test_compiled_yaml_is_up_to_date(tmp_path, monkeypatch):
    _clean_image_env(monkeypatch)
    fresh = compile_all(tmp_path)
    assert {p.stem for p in fresh} == EXPECTED
    for path in fresh:
        committed = COMPILED_DIR / path.name
        assert committed.is_file(), f"{committed} missing: run `idforge pipeline compile` and commit it"
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `idforge pipeline compile` and commit the result"
        )


def _executors(spec: dict) -> dict[str, dict]:
    return spec["deploymentSpec"]["executors"]


def _all_tasks(spec: dict) -> dict[str, dict]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_images_resources_and_caching(name, tmp_path, monkeypatch):
    _clean_image_env(monkeypatch)
    images = Images.load(registry="registry.test/team", tag="t1")
    from kfp import compiler

    out = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(build(name, images), package_path=str(out))
    spec = yaml.safe_load(out.read_text())
    execs = _executors(spec)
    for key, ex in execs.items():
        container = ex.get("container")
        if container is None:  # importer
            continue
        image = container["image"]
        assert image in {images.cpu, images.cuda}, f"{key} runs {image}"
        gpu_stage = any(s in key for s in ("prepare", "finetune-identity", "generate"))
        assert (image == images.cuda) == (gpu_stage or "train-adapter" in key), f"{key} in the wrong image"
        if gpu_stage:
            assert container["resources"]["accelerator"]["resourceCount"] == "1"
        if "train-adapter" in key:  # GPUs come from the Ray cluster, not this pod
            assert "accelerator" not in container["resources"]
        assert "resources" in container
        # no pip install at run time: the image carries everything
        assert "pip install" not in " ".join(container.get("command", []))
    tasks = _all_tasks(spec)
    for task_name, task in tasks.items():
        comp = task.get("componentRef", {}).get("name", "")
        caching = task.get("cachingOptions", {}).get("enableCache", False)
        if any(s in comp for s in ("train-adapter", "finetune-identity", "open-parent-run", "register", "champion")):
            assert not caching, f"{task_name} must not be cached"
        elif any(s in comp for s in ("comp-curate", "comp-prepare", "comp-generate", "comp-evaluate")):
            assert caching, f"{task_name} should be cached"


def test_end_to_end_branches_on_the_method_regime(monkeypatch, tmp_path):
    _clean_image_env(monkeypatch)
    compile_all(tmp_path)
    spec = yaml.safe_load((tmp_path / "end-to-end.yaml").read_text())
    text = yaml.safe_dump(spec)
    assert "method-regime" in text
    assert "for-loop" in text  # per-identity fan-out
    assert "comp-train-adapter" in spec["components"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"raw_uri", "base_model", "method", "config_yaml"} <= set(params)


def test_unknown_pipeline_names_the_choices():
    with pytest.raises(PipelineError, match="available: curation"):
        build("nope")


def test_cli_compile_and_list(tmp_path):
    out = subprocess.run([sys.executable, "-m", "idforge.cli", "pipeline", "compile", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert len(out.stdout.split()) == len(EXPECTED)
    listed = subprocess.run([sys.executable, "-m", "idforge.cli", "pipeline", "list"], capture_output=True,
                            text=True, check=True)
    assert set(listed.stdout.split()) == EXPECTED


def test_pipeline_config_makes_every_path_a_step_reads_absolute(tmp_path, monkeypatch):
    """Steps run in other processes: the tracking store and protocol files must not depend on their cwd."""
    from idforge.config import load_config_text
    from pipelines.runner import pipeline_config_yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config_text("tracking: {uri: 'sqlite:///runs/mlruns.db'}\n"
                           "generate: {protocol: configs/protocols/smoke.yaml}\n"
                           "evaluate: {protocol: s3://bucket/protocol.yaml}\n")
    out = yaml.safe_load(pipeline_config_yaml(cfg, tmp_path / "repo"))
    assert out["tracking"]["uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}"
    assert out["generate"]["protocol"] == str(tmp_path / "repo" / "configs" / "protocols" / "smoke.yaml")
    assert out["evaluate"]["protocol"] == "s3://bucket/protocol.yaml"  # URIs are left alone
    assert cfg.generate.protocol == "configs/protocols/smoke.yaml"  # the caller's config is not modified
