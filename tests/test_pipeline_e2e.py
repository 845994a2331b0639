"""The end-to-end pipeline on kfp's local runner: real components, tiny models, the sample photos.

It must end with an evaluated, registered model, every step's MLflow run nested under one parent, and on a
second run the deterministic steps served from the cache.
"""

from __future__ import annotations

import pandas as pd
import pytest

from idforge.config import dump_config, load_config
from pipelines.runner import find_outputs, run_local


def _arguments(tmp_path, repo_root, samples_dir, base, clip, method, extra=()):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config(
        [repo_root / "configs" / "demo.yaml"],
        [
            f"model.base={base}", f"model.clip={clip}", f"evaluate.clip_model={clip}", f"tracking.uri={uri}",
            f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
            f"generate.protocol={repo_root / 'configs/protocols/smoke.yaml'}",
            f"evaluate.protocol={repo_root / 'configs/protocols/smoke.yaml'}",
            "train.steps=2", "train.checkpoint_every=1", "train.report_every=1", "finetune.steps=2",
            *extra,
        ],
    )  # fmt: skip
    args = {
        "raw_uri": str(samples_dir),
        "labels_uri": str(samples_dir / "labels.csv"),
        "base_model": str(base),
        "method": method,
        "config_yaml": dump_config(cfg),
        "gates_yaml": (repo_root / "configs" / "gates.yaml").read_text(),
        "workers": 1,
        "gpus_per_worker": 0.0,
    }
    return args, uri


def _runs(uri):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("idforge")
    return client, client.search_runs([exp.experiment_id], max_results=200)


@pytest.mark.slow
def test_end_to_end_population_method(tmp_path, repo_root, samples_dir, tiny_sd15_dir, tiny_clip_dir):
    args, uri = _arguments(tmp_path, repo_root, samples_dir, tiny_sd15_dir, tiny_clip_dir, "infinite-id")
    root = tmp_path / "kfp"
    run_local("end-to-end", args, pipeline_root=root)

    outputs = find_outputs(root)
    metrics = pd.read_parquet(outputs["table"] / "metrics.parquet")
    # smoke protocol: 3 prompts x the curated identities (obama, macron, ardern) x its seeds
    assert len(metrics) >= 3 * 3 and metrics["identity"].nunique() == 3
    # the paged report links one page per identity; KFP's HTML artifact is the same report in one file, every
    # image's thumbnail inlined (its viewer opens no other file)
    assert all(f'href="identities/{i}.html"' in outputs["report"].read_text() for i in metrics["identity"].unique())
    html = outputs["report_single"].read_text()
    assert "<table" in html and html.count('<img class="gen"') >= len(metrics)
    assert html.count("data:image") >= len(metrics) and "identities/" not in html

    client, runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("idforge.pipeline") == "end-to-end"]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["idforge.kfp_state"] == "SUCCEEDED"
    parent_id = parents[0].info.run_id
    assert parents[0].data.metrics["dataset_identities"] == 3
    children = {r.data.tags.get("mlflow.runName"): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert "evaluate" in children and any(name.startswith("train") for name in children)

    versions = client.search_model_versions("name='idforge-infinite-id'")
    assert len(versions) == 1
    # tiny random weights draw no faces: the gates must refuse the champion alias
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("idforge-infinite-id", "champion")
    assert versions[0].tags["idforge.gates_passed"] == "false"



@pytest.mark.slow
def test_a_second_run_reuses_the_deterministic_steps(tmp_path, repo_root, samples_dir, caplog):
    """Curation (the costly CPU step) is cached across runs; the parent run, which is not, opens each time."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config([repo_root / "configs" / "demo.yaml"], [f"tracking.uri={uri}"])
    args = {"raw_uri": str(samples_dir), "labels_uri": str(samples_dir / "labels.csv"), "config_yaml": dump_config(cfg)}
    root = tmp_path / "kfp"
    run_local("curation", args, pipeline_root=root)
    caplog.clear()
    with caplog.at_level("INFO"):
        run_local("curation", args, pipeline_root=root)
    hits = " ".join(r.getMessage() for r in caplog.records if "cache hit" in r.getMessage())
    assert "Task curate cache hit" in hits
    assert "open-parent-run" not in hits
    _, runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("idforge.pipeline") == "curation"]
    assert len(parents) == 2
    # the exit task closed each parent run with the pipeline's outcome, tagged with its own KFP run id
    assert {r.info.status for r in parents} == {"FINISHED"}
    assert {r.data.tags["idforge.kfp_state"] for r in parents} == {"SUCCEEDED"}
    assert len({r.data.tags["idforge.kfp_run_id"] for r in parents}) == 2
    # a changed config is a different cache key: curation runs again
    caplog.clear()
    args["config_yaml"] = dump_config(load_config([repo_root / "configs" / "demo.yaml"],
                                                  [f"tracking.uri={uri}", "curate.min_face_px=72"]))
    with caplog.at_level("INFO"):
        run_local("curation", args, pipeline_root=root)
    assert "Task curate cache hit" not in " ".join(r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_end_to_end_per_identity_method(tmp_path, repo_root, samples_dir, tiny_sd15_dir, tiny_clip_dir):
    args, uri = _arguments(tmp_path, repo_root, samples_dir, tiny_sd15_dir, tiny_clip_dir, "textual-inversion")
    args["max_identities"] = 2
    root = tmp_path / "kfp"
    run_local("end-to-end", args, pipeline_root=root)

    metrics = pd.read_parquet(find_outputs(root)["table"] / "metrics.parquet")
    assert metrics["identity"].nunique() == 2  # one fine-tune per identity, each evaluated
    client, runs = _runs(uri)
    finetunes = [r for r in runs if r.data.tags.get("idforge.identity")]
    assert len({r.data.tags["idforge.identity"] for r in finetunes}) == 2
    assert len(client.search_model_versions("name='idforge-textual-inversion'")) == 1
