"""`--arg name=value` reaches a pipeline as the parameter's declared type; a GPU request where there are none fails
before training starts."""

from __future__ import annotations

import pytest

from pipelines.runner import PipelineError, typed_arguments


def test_arguments_take_each_parameters_declared_type():
    args = typed_arguments("retrain", {"raw_uri": "data/samples", "workers": "2", "gpus_per_worker": "0",
                                       "method": "infinite-id"})
    assert args == {"raw_uri": "data/samples", "workers": 2, "gpus_per_worker": 0.0, "method": "infinite-id"}
    assert type(args["workers"]) is int and type(args["gpus_per_worker"]) is float


@pytest.mark.parametrize("key,value,kind", [("workers", "two", "Integer"), ("workers", "1.5", "Integer"),
                                            ("gpus_per_worker", "one", "Float")])
def test_a_value_of_the_wrong_type_is_one_line_naming_parameter_type_and_value(key, value, kind):
    with pytest.raises(PipelineError) as err:
        typed_arguments("retrain", {key: value})
    msg = str(err.value)
    assert key in msg and kind in msg and repr(value) in msg and "\n" not in msg


def test_an_undeclared_parameter_is_refused_with_the_declared_ones():
    with pytest.raises(PipelineError, match="no parameter 'worker'.*workers"):
        typed_arguments("retrain", {"worker": "2"})


def test_the_cli_converts_arguments_before_the_pipeline_runs(tmp_path):
    """The CLI path that used to stop with kfp's InconsistentTypeException: the bad value is now one error line."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "idforge.cli", "pipeline", "run", "retrain", "--local",
                          "--arg", "raw_uri=data/samples", "--arg", "base_model=x", "--arg", "workers=lots",
                          "--pipeline-root", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "parameter 'workers' is Integer: got 'lots'" in res.stderr and "Traceback" not in res.stderr


def test_gpus_requested_on_a_machine_without_gpus_fail_before_ray_starts(monkeypatch):
    import ray
    import torch

    from idforge.errors import ConfigError
    from idforge.train.population import resolve_gpus_per_worker

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=r"gpus_per_worker=1 x 2 worker\(s\) needs 2 GPU\(s\).*gpus_per_worker=0"):
        resolve_gpus_per_worker(1.0, 2, None)
    assert not ray.is_initialized()
    assert resolve_gpus_per_worker(0.0, 2, None) == 0.0
    assert resolve_gpus_per_worker(-1.0, 2, None) == 0.0  # auto falls back to CPU workers
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_gpus_per_worker(1.0, 2, None) == 1.0
    assert resolve_gpus_per_worker(-1.0, 2, None) == 1.0  # auto takes one each
    with pytest.raises(ConfigError):  # 3 workers x 1 GPU > 2 devices
        resolve_gpus_per_worker(1.0, 3, None)
