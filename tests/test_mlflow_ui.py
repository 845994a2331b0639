"""MLflow's own UI shows the work: the experiment opens on its training runs, a run's dataset, metric and image
series are on the rendered page. A real `mlflow server`, pages rendered by headless Chromium (Debian's package)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from idforge.evaluate.browser import find_chromium


def _dom(url: str, budget_ms: int = 20000) -> str:
    res = subprocess.run([find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", f"--virtual-time-budget={budget_ms}",
                          "--window-size=1400,1000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.slow
def test_the_ui_opens_on_the_training_runs_with_dataset_metric_and_images(mlflow_server, tmp_path):
    from idforge.config import TrackingConfig
    from idforge.track import experiment_url, log_dataset, log_image_step, log_metrics, start_run

    cfg = TrackingConfig(uri=mlflow_server.uri, experiment="idforge")
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "manifest.parquet").write_bytes(b"rows")
    note = "**end-to-end** pipeline on `ds`"
    with start_run(cfg, run_name="end-to-end", tags={"mlflow.note.content": note}) as parent:
        with start_run(cfg, run_name="train-infinite-id") as run:
            log_dataset(dataset, context="training", name="curated")
            for step in (1, 2):
                log_metrics({"loss": 0.5 / step}, step=step)
                log_image_step(np.full((32, 32, 3), 60 * step, np.uint8), key="samples", step=step)
    exp_id, run_id = run.info.experiment_id, run.info.run_id

    # the link we print opens the model-training view (runs table), not the GenAI traces overview
    url = experiment_url(cfg)
    assert url.endswith(f"#/experiments/{exp_id}?workflowType=machine_learning")
    page = _dom(url)
    assert "end-to-end" in page and "Detect Issues" not in page

    run_page = _dom(f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning")
    assert "train-infinite-id" in run_page and "curated" in run_page  # the dataset input, by name
    assert "loss" in run_page and "0.25" in run_page  # the last value of the metric

    # the image series as the UI's image charts read it: one image per step under the `samples` key
    import requests

    listed = requests.get(f"{mlflow_server.uri}/api/2.0/mlflow/artifacts/list",
                          params={"run_id": run_id, "path": "images"}, timeout=10).json()
    names = [f["path"] for f in listed.get("files", [])]
    assert any("samples+step+1+" in n for n in names) and any("samples+step+2+" in n for n in names), names
    # ... and the UI renders one of them as an image on the run's artifact page
    first = next(n for n in names if "samples+step+1+" in n and n.endswith(".png"))
    shown = _dom(f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{run_id}/artifacts/{first}"
                 "?workflowType=machine_learning")
    assert f'<img alt="{first}" src="blob:' in shown

    parent_page = _dom(f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{parent.info.run_id}"
                       "?workflowType=machine_learning")
    assert "pipeline on" in parent_page  # the description the parent run carries


def test_the_parent_description_says_what_ran_on_what():
    from idforge.config import load_config
    from idforge.track import describe_pipeline_run

    cfg = load_config([], ["train.method=id-adapter", "model.base=/models/sd21"])
    text = describe_pipeline_run("retrain", "s3://b/ds", {"identities": 3, "faces_accepted": 8, "note": "x"}, cfg)
    assert text.startswith("**retrain** pipeline on `s3://b/ds` (3 identities, 8 faces accepted)")
    assert "`id-adapter`" in text and "`/models/sd21`" in text
