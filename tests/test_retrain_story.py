"""The design's third user story, end to end with kfp's local runner: the end-to-end pipeline sets a champion; new
photos of a new identity land; `retrain` warm-starts from the champion, evaluates, and moves the alias only when the
candidate is no worse on any gate metric.

The gates are ones the tiny random model can meet (it draws no faces: a detection rate of 0 passes `>= 0`), so the
champion path runs; the second test makes the champion's evaluation better than any candidate can be.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from pipelines.runner import run_local
from tests.test_pipeline_e2e import _arguments

MODEL = "idforge-infinite-id"
GATES = """alias: champion
gates:
  - metric: face_det_rate_opencv
    op: ">="
    value: 0.0
"""


def _photos(samples, dest, people):
    dest.mkdir(parents=True)
    for person in people:
        shutil.copytree(samples / person, dest / person)
    labels = pd.read_csv(samples / "labels.csv")
    labels[labels["identity"].isin(people)].to_csv(dest / "labels.csv", index=False)
    return dest


@pytest.fixture(scope="module")
def story(tmp_path_factory, repo_root, samples_dir, tiny_sd15_dir, tiny_clip_dir):
    """The end-to-end run on obama + macron that set the first champion; the retrain arguments for the new photos
    (ardern added)."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("story")
    args, uri = _arguments(tmp, repo_root, samples_dir, tiny_sd15_dir, tiny_clip_dir, "infinite-id")
    v1 = _photos(samples_dir, tmp / "raw-v1", ["obama", "macron"])
    first = {**args, "raw_uri": str(v1), "labels_uri": str(v1 / "labels.csv"), "gates_yaml": GATES}
    run_local("end-to-end", first, pipeline_root=tmp / "kfp")
    client = MlflowClient(tracking_uri=uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    v2 = _photos(samples_dir, tmp / "raw-v2", ["obama", "macron", "ardern"])
    retrain = {k: v for k, v in first.items() if k != "max_identities"}
    retrain.update(raw_uri=str(v2), labels_uri=str(v2 / "labels.csv"))
    return {"client": client, "uri": uri, "first": champion, "retrain": retrain, "root": tmp / "kfp"}


def _train_runs(client, uri):
    exp = client.get_experiment_by_name("idforge")
    return client.search_runs([exp.experiment_id], "tags.`idforge.stage` = 'train'", max_results=50)


@pytest.mark.slow
def test_retrain_warm_starts_from_the_champion_and_promotes_a_no_worse_model(story):
    client = story["client"]
    before = client.get_model_version_by_alias(MODEL, "champion")
    run_local("retrain", story["retrain"], pipeline_root=story["root"])

    after = client.get_model_version_by_alias(MODEL, "champion")
    assert int(after.version) > int(before.version)  # equal gate metrics: no worse, so it is promoted
    assert after.tags["idforge.gates_passed"] == "true"
    newest = max(_train_runs(client, story["uri"]), key=lambda r: r.info.start_time)
    assert newest.data.params.get("train.init_from"), "the retrain did not warm-start from the champion"
    # it trained on the new dataset version: three identities now
    parents = [r for r in client.search_runs([newest.info.experiment_id], "tags.`idforge.pipeline` = 'retrain'")]
    assert parents and parents[0].data.metrics["dataset_identities"] == 3


@pytest.mark.slow
def test_a_retrained_model_worse_than_the_champion_leaves_the_alias_where_it_was(story):
    client = story["client"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    eval_run = champion.tags["idforge.evaluation_run"]
    metric = "face_det_rate_opencv"
    original = client.get_run(eval_run).data.metrics[metric]
    client.log_metric(eval_run, metric, 1.0, step=10**6)  # a champion no tiny model can match
    try:
        run_local("retrain", story["retrain"], pipeline_root=story["root"])
        assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version
        newest = max(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
        assert int(newest.version) > int(champion.version)  # registered, but not promoted
        assert newest.tags["idforge.gates_passed"] == "false"
    finally:
        client.log_metric(eval_run, metric, original, step=10**6 + 1)
