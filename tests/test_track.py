"""idforge.track against a real MLflow SQLite store (and, marked slow, a real `mlflow server` over HTTP)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from idforge.config import IdforgeConfig, TrackingConfig, load_config
from idforge.errors import ConfigError, DataError
from idforge.track import (
    active_run_id,
    artifact_location,
    flatten_config,
    log_artifacts,
    log_config,
    log_html,
    log_image,
    log_image_grid,
    log_metrics,
    make_image_grid,
    start_run,
    tracking_uri,
    ui_command,
)
from tests.fixtures.tracking import MlflowServer

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _tiles(n: int = 5, w: int = 8, h: int = 6) -> list[np.ndarray]:
    return [np.full((h, w, 3), c, np.uint8) for c in COLOURS[:n]]


def _client(uri: str):  # noqa: ANN202 - MlflowClient, imported lazily like the library does
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:  # noqa: ANN001
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


# ----------------------------------------------------------------------------------------------------------------
# URIs


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve().as_posix()}/mlruns.db"
    assert tracking_uri(None) == tracking_uri(TrackingConfig())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    assert tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"
    assert ui_command(TrackingConfig()) == "open http://127.0.0.1:5000"
    assert ui_command(TrackingConfig(uri="sqlite:///x.db")).startswith("mlflow ui --backend-store-uri sqlite:///x.db ")


def test_artifact_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path.resolve()
    assert artifact_location(None, f"sqlite:///{root}/db/mlruns.db") == (root / "db" / "mlartifacts").as_uri()
    assert artifact_location(None, "sqlite:///mlruns.db") == (root / "mlartifacts").as_uri()  # relative to CWD
    assert artifact_location(None, "http://mlflow:5000") is None  # the server decides
    assert artifact_location(TrackingConfig(artifact_location="arts"), "http://x") == (root / "arts").as_uri()
    assert artifact_location(TrackingConfig(artifact_location="s3://b/p"), "sqlite:///a.db") == "s3://b/p"


# ----------------------------------------------------------------------------------------------------------------
# a run and what it logs


def test_run_logs_config_metrics_images_and_artifacts(
    mlflow_uri: str, mlflow_artifact_root: Path, tmp_path: Path
) -> None:
    cfg = load_config(overrides=["run.seed=7", "tracking.experiment=exp-a"])
    report = tmp_path / "report"
    (report / "sub").mkdir(parents=True)
    (report / "metrics.json").write_text('{"id_sim": 0.5}')
    (report / "sub" / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "index.html").write_text("<html><body>report</body></html>")

    with start_run(cfg.tracking, run_name="unit", tags={"stage": "test", "n": 3}) as run:
        assert run is not None and active_run_id() == run.info.run_id
        params = log_config(cfg)
        log_metrics({"loss": 1.0, "lr": np.float32(0.25)}, step=0)
        log_metrics({"loss": 0.5}, step=1)
        log_image(np.full((4, 5, 3), 0.5, np.float32), "images/gray.png")
        grid = log_image_grid(_tiles(4), rows=2, cols=2, artifact_file="grids/grid.png")
        log_artifacts(report, "report")
        log_html(tmp_path / "index.html")
    assert active_run_id() is None

    client = _client(mlflow_uri)
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "unit"
    assert got.data.tags["stage"] == "test" and got.data.tags["n"] == "3"
    assert client.get_experiment(got.info.experiment_id).name == "exp-a"
    assert got.info.artifact_uri.startswith(mlflow_artifact_root.as_uri())
    assert got.data.params == params
    assert params["run.seed"] == "7" and params["tracking.experiment"] == "exp-a"
    assert params["model.local_files_only"] == "true" and params["tracking.uri"] == "null"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 1.0), (1, 0.5)]
    assert got.data.metrics["lr"] == 0.25

    arts = _artifact_paths(client, run.info.run_id)
    assert {"config.resolved.yaml", "images/gray.png", "grids/grid.png", "report/metrics.json",
            "report/sub/table.csv", "index.html"} <= arts  # fmt: skip

    local = Path(client.download_artifacts(run.info.run_id, "config.resolved.yaml", str(tmp_path / "dl")))
    assert IdforgeConfig.model_validate(yaml.safe_load(local.read_text())) == cfg
    local = Path(client.download_artifacts(run.info.run_id, "grids/grid.png", str(tmp_path / "dl")))
    with Image.open(local) as im:
        assert im.size == (16, 12)
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(grid))
    local = Path(client.download_artifacts(run.info.run_id, "images/gray.png", str(tmp_path / "dl")))
    with Image.open(local) as im:
        assert np.asarray(im).shape == (4, 5, 3) and int(np.asarray(im)[0, 0, 0]) == 128


def test_resume_by_id_appends(mlflow_uri: str) -> None:
    cfg = TrackingConfig(experiment="resume")
    with start_run(cfg, run_name="first") as run:
        log_config({"a": 1})
        log_metrics({"loss": 3.0}, step=0)
    with start_run(cfg, run_id=run.info.run_id) as again:
        assert again.info.run_id == run.info.run_id
        log_config({"a": 1})  # same value again: allowed
        log_metrics({"loss": 2.0}, step=1)
    client = _client(mlflow_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 3.0), (1, 2.0)]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    with pytest.raises(ConfigError, match=r"already has params with other values.*start a new run"):
        with start_run(cfg, run_id=run.info.run_id):
            log_config({"a": 2})
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_unknown_run_id_is_a_clear_error(mlflow_uri: str) -> None:
    with pytest.raises(ConfigError, match=r"cannot start MLflow run '0123456789abcdef0123456789abcdef' \(to resume\)"):
        with start_run(run_id="0123456789abcdef0123456789abcdef"):
            pass


def test_nested_runs_carry_the_parent_tag(mlflow_uri: str) -> None:
    with start_run(run_name="parent") as parent:
        with start_run(run_name="child") as child:
            assert active_run_id() == child.info.run_id
            log_metrics({"x": 1.0})
        assert active_run_id() == parent.info.run_id
    # across processes: no active run, the parent named by id (how a pipeline step joins its pipeline's run)
    with start_run(run_name="step", parent_run_id=parent.info.run_id) as step:
        pass
    client = _client(mlflow_uri)
    assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(step.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "mlflow.parentRunId" not in client.get_run(parent.info.run_id).data.tags
    assert client.get_run(child.info.run_id).data.metrics == {"x": 1.0}


def test_a_dataset_input_the_store_refuses_at_first_is_retried_and_never_fatal(mlflow_uri: str, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                                 caplog: pytest.LogCaptureFixture
                                                                                 ) -> None:
    """Per-identity runs started at once race to insert the same dataset row (the store's unique constraint): the
    loser retries and links the row; a store that keeps refusing costs a warning, not the run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from idforge.track.datasets import log_dataset

    real, calls = mlflow.log_input, {"n": 0}

    def racing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
        return real(*args, **kwargs)

    (tmp_path / "ds").mkdir()
    monkeypatch.setattr(mlflow, "log_input", racing)
    with start_run(run_name="identity") as run:
        log_dataset(tmp_path / "ds", context="training", name="curated")
    assert calls["n"] == 2
    assert [i.dataset.name for i in _client(mlflow_uri).get_run(run.info.run_id).inputs.dataset_inputs] == ["curated"]

    def refusing(*args, **kwargs):
        raise MlflowException("store refuses")

    monkeypatch.setattr(mlflow, "log_input", refusing)
    with start_run(run_name="identity-2") as run2:
        log_dataset(tmp_path / "ds", context="training", name="curated")
    assert "could not log dataset" in caplog.text
    assert _client(mlflow_uri).get_run(run2.info.run_id).info.status == "FINISHED"


def test_exception_marks_the_run_failed(mlflow_uri: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with start_run(run_name="bad") as run:
            log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("boom")
    assert active_run_id() is None
    assert _client(mlflow_uri).get_run(run.info.run_id).info.status == "FAILED"


def test_env_uri_is_honoured_and_left_as_it_was(mlflow_uri: str, _mlflow_template_db: Path, tmp_path: Path) -> None:
    with start_run(run_name="env") as run:
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_uri
    assert _client(mlflow_uri).get_run(run.info.run_id).info.run_name == "env"

    # an explicit cfg.uri wins over the environment, which comes out unchanged
    (tmp_path / "other").mkdir()
    shutil.copyfile(_mlflow_template_db, tmp_path / "other" / "other.db")  # a migrated, empty store
    other = f"sqlite:///{(tmp_path / 'other' / 'other.db').as_posix()}"
    with start_run(TrackingConfig(uri=other), run_name="explicit") as run2:
        assert os.environ["MLFLOW_TRACKING_URI"] == other  # what MLflow's own helpers see inside the run
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_uri
    assert _client(other).get_run(run2.info.run_id).info.run_name == "explicit"
    assert run2.info.artifact_uri.startswith((tmp_path / "other" / "mlartifacts").as_uri())


def test_disabled_tracking_logs_nothing(mlflow_uri: str) -> None:
    with start_run(TrackingConfig(enabled=False, experiment="off")) as run:
        assert run is None
        log_metrics({"loss": 1.0}, step=0)
        assert log_config({"a": 1}) == {"a": "1"}
        log_image(np.zeros((2, 2), np.uint8), "x.png")
    assert _client(mlflow_uri).get_experiment_by_name("off") is None


def test_bad_inputs_name_the_problem(mlflow_uri: str, tmp_path: Path) -> None:
    with start_run(run_name="bad-inputs"):
        with pytest.raises(DataError, match="metric 'loss' must be a number, got str 'high'"):
            log_metrics({"loss": "high"})
        with pytest.raises(DataError, match="is not a directory"):
            log_artifacts(tmp_path / "nope")
        (tmp_path / "r.txt").write_text("x")
        with pytest.raises(DataError, match=r"r\.txt is not an \.html file"):
            log_html(tmp_path / "r.txt")
        with pytest.raises(DataError, match=r"shape \(2, 2, 2\)"):
            log_image(np.zeros((2, 2, 2), np.uint8), "x.png")


# ----------------------------------------------------------------------------------------------------------------
# pure helpers


def test_grid_size_and_tiles() -> None:
    grid = make_image_grid(_tiles(5), rows=2, cols=3)
    assert grid.size == (24, 12) and grid.mode == "RGB"
    arr = np.asarray(grid)
    for i, colour in enumerate(COLOURS):
        r, c = divmod(i, 3)
        assert (arr[r * 6 : (r + 1) * 6, c * 8 : (c + 1) * 8] == colour).all(), i
    assert (arr[6:, 16:] == 255).all()  # the empty sixth cell is background


def test_grid_resizes_mixed_inputs_to_the_first_cell() -> None:
    big = Image.new("RGBA", (16, 12), (10, 20, 30, 255))
    gray = np.full((6, 8), 0.0, np.float32)
    grid = make_image_grid([_tiles(1)[0], big, gray], rows=1, cols=3)
    arr = np.asarray(grid)
    assert grid.size == (24, 6)
    assert (arr[:, 8:16] == (10, 20, 30)).all() and (arr[:, 16:] == 0).all()


@pytest.mark.parametrize(
    ("n", "rows", "cols", "match"),
    [(0, 1, 1, "got no images"), (5, 2, 2, "has 4 cells but got 5 images"), (1, 0, 1, "rows >= 1")],
)
def test_grid_rejects_bad_layouts(n: int, rows: int, cols: int, match: str) -> None:
    with pytest.raises(DataError, match=match):
        make_image_grid(_tiles(n), rows, cols)


def test_flatten_config_dotted_and_truncated() -> None:
    flat = flatten_config({"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "s": "x" * 50, "n": None, "t": True})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "a.e": "{}", "s": "x" * 50, "n": "null", "t": "true"}
    short = flatten_config({"s": "x" * 50}, max_len=10)
    assert short == {"s": "xxxxxxx..."}
    full = flatten_config(IdforgeConfig())
    assert full["tracking.experiment"] == "idforge" and all(isinstance(v, str) for v in full.values())


def test_mlflow_limit_is_applied(mlflow_uri: str) -> None:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    many = {f"k{i:03d}": i for i in range(150)}  # more than MLflow's 100 params per batch
    with start_run(run_name="big") as run:
        params = log_config({"long": "y" * (MAX_PARAM_VAL_LENGTH + 10), **many})
    got = _client(mlflow_uri).get_run(run.info.run_id).data.params
    assert len(params["long"]) == MAX_PARAM_VAL_LENGTH and got["long"] == params["long"]
    assert len(got) == 151 and got["k149"] == "149"


# ----------------------------------------------------------------------------------------------------------------
# a real tracking server


@pytest.mark.slow
def test_logging_through_an_mlflow_server(mlflow_server: MlflowServer, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_server.uri
    with start_run(TrackingConfig(uri=uri, experiment="served"), run_name="http") as run:
        log_config({"lr": 0.001})
        log_metrics({"loss": 0.75}, step=3)
        log_image_grid(_tiles(2), rows=1, cols=2, artifact_file="grids/g.png")
    client = _client(uri)
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.params == {"lr": "0.001"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(3, 0.75)]
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    assert _artifact_paths(client, run.info.run_id) == {"config.resolved.yaml", "grids/g.png"}
    assert list(mlflow_server.artifacts.rglob("g.png"))  # landed in the server's artifact destination
    assert "MLFLOW_TRACKING_URI" not in os.environ
