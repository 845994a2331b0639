"""Components documented where Kubeflow shows them, and the one helper that records their metrics."""

import json
import math

import numpy as np
import pytest
import yaml

from idforge.ops.kfp_metrics import write_metrics
from pipelines.runner import COMPILED_DIR

COMPILED = sorted(COMPILED_DIR.glob("*.yaml"))


def _undocumented(spec: dict) -> list[str]:
    """``component.side.name`` of every input/output of a container component that has no description.

    DAG components (loops, branches) take compiler-made ``pipelinechannel--`` inputs and the importer is kfp's own:
    only components with a container executor are ours to document.
    """
    executors = spec["deploymentSpec"]["executors"]
    missing = []
    for comp_name, comp in spec["components"].items():
        if "container" not in executors.get(comp.get("executorLabel", ""), {}):
            continue
        for side in ("inputDefinitions", "outputDefinitions"):
            for kind in ("parameters", "artifacts"):
                for name, entry in comp.get(side, {}).get(kind, {}).items():
                    if not str(entry.get("description", "")).strip():
                        missing.append(f"{comp_name}.{side}.{name}")
    return missing


def test_there_are_compiled_pipelines_to_check():
    assert len(COMPILED) >= 5, f"no compiled pipelines under {COMPILED_DIR}"


@pytest.mark.parametrize("path", COMPILED, ids=lambda p: p.stem)
def test_every_component_input_and_output_has_a_description(path):
    spec = next(yaml.safe_load_all(path.read_text()))  # the 2nd document: kubernetes platform config
    missing = _undocumented(spec)
    assert not missing, (
        f"{path.name}: undocumented {missing}; give each an entry in the component's docstring (inputs under "
        "Args:, Output[...] artifacts and the return value `Output` under Returns:) and run `idforge pipeline compile`"
    )


def test_the_check_sees_a_missing_description(tmp_path):
    """The check itself can fail: an input, an output artifact and a return value without a description."""
    from kfp import compiler, dsl
    from kfp.dsl import Dataset, Output

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def half(a: str, b: int, out: Output[Dataset]) -> str:
        """Documents only ``a``.

        Args:
            a: the documented one.
        """
        return a

    out = tmp_path / "half.yaml"
    compiler.Compiler().compile(half, package_path=str(out))
    missing = _undocumented(next(yaml.safe_load_all(out.read_text())))
    assert sorted(missing) == ["comp-half.inputDefinitions.b", "comp-half.outputDefinitions.Output",
                               "comp-half.outputDefinitions.out"]


class _FakeMetrics:
    """What kfp.dsl.Metrics offers: log_metric stores into metadata, path is a file the executor uploads."""

    def __init__(self, path):
        self.path = str(path)
        self.metadata: dict = {}

    def log_metric(self, metric: str, value: float) -> None:
        self.metadata[metric] = value


def test_write_metrics_logs_finite_numbers_and_writes_the_metadata_file(tmp_path):
    art = _FakeMetrics(tmp_path / "sub" / "metrics")
    art.metadata["already"] = 1.0
    values = {"files": 12, "id_sim": np.float32(0.25), "clip_t": np.float64(0.5), "ok": True,
              "nan": float("nan"), "inf": math.inf, "run": "abc123", "none": None}
    logged = write_metrics(art, values)
    assert logged == {"files": 12.0, "id_sim": 0.25, "clip_t": 0.5, "ok": 1.0}
    assert all(type(v) is float for v in logged.values())
    assert art.metadata == {"already": 1.0, **logged}
    assert json.loads((tmp_path / "sub" / "metrics").read_text()) == art.metadata
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["metrics"]  # no temp file left beside it


def test_write_metrics_with_the_real_kfp_artifact(tmp_path):
    from kfp.dsl import Metrics

    art = Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    art.path = str(tmp_path / "metrics")  # what the executor sets from the local artifact root
    write_metrics(art, {"loss": np.float32(0.125), "skip": float("nan")})
    assert json.loads((tmp_path / "metrics").read_text()) == {"loss": 0.125}
