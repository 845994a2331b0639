"""Registry decisions that flip on one value: all gates vs any, each operator at its threshold, champion ties.

Real registrations into a throw-away SQLite MLflow store (no generation: the evaluation runs are made with the
metrics each case needs, the method artifact is a stand-in file; the base model is referenced, never loaded).
"""

from __future__ import annotations

import math

import pytest
import yaml

from idforge.config import IdforgeConfig
from idforge.evaluate.register import Gate, Gates, check_gates, register_run

EPS = 1e-6


def _gates(*gates: tuple[str, str, float], name: str = "gated") -> str:
    return yaml.safe_dump({"model_name": name, "gates": [{"metric": m, "op": op, "value": v} for m, op, v in gates]})


@pytest.fixture
def registry(mlflow_uri, tmp_path):
    """register(metrics, gates, compare_to_champion=False) -> RegistrationResult, plus the client to check aliases."""
    import mlflow
    from mlflow import MlflowClient

    cfg = IdforgeConfig.model_validate({"tracking": {"uri": mlflow_uri, "experiment": "gates"}})
    artifact = tmp_path / "method.safetensors"
    artifact.write_bytes(b"stand-in: registration copies the file, nothing loads it")
    exp = MlflowClient(tracking_uri=mlflow_uri).create_experiment("gates", str(tmp_path / "mlartifacts"))

    def register(metrics: dict[str, float], gates: str, compare_to_champion: bool = False):
        mlflow.set_tracking_uri(mlflow_uri)
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_metrics(metrics)
        return register_run(run.info.run_id, gates, cfg, artifact=artifact, method="infinite-id",
                            base_model="example/not-a-local-dir", compare_to_champion=compare_to_champion)

    register.client = MlflowClient(tracking_uri=mlflow_uri)
    return register


def _champion(client, name: str = "gated") -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def test_one_failing_gate_among_passing_ones_blocks_the_alias(registry):
    gates = _gates(("a", ">=", 0.5), ("b", ">=", 0.5), ("c", "<=", 0.5))
    mixed = registry({"a": 0.9, "b": 0.1, "c": 0.2}, gates)
    assert [g.passed for g in mixed.gates] == [True, False, True]
    assert not mixed.promoted and [g.gate.metric for g in mixed.failed] == ["b"]
    assert _champion(registry.client) is None
    tags = registry.client.get_model_version("gated", mixed.version).tags
    assert tags["idforge.gates_passed"] == "false"
    assert "failed gates: b >= 0.5 (FAIL: 0.1000)" in mixed.summary() and "a >= 0.5" not in mixed.summary()

    every = registry({"a": 0.9, "b": 0.6, "c": 0.2}, gates)
    assert every.promoted and _champion(registry.client) == every.version


@pytest.mark.parametrize(("op", "at", "above", "below"), [
    (">=", True, True, False),
    (">", False, True, False),
    ("<=", True, False, True),
    ("<", False, False, True),
])
def test_each_operator_exactly_at_and_next_to_its_threshold(op, at, above, below):
    for threshold in (0.36, 0.0, -2.5):
        gate = Gate(metric="m", op=op, value=threshold)
        assert gate.check(threshold) is at, (op, threshold)
        assert gate.check(threshold + EPS) is above, (op, threshold)
        assert gate.check(threshold - EPS) is below, (op, threshold)
        assert gate.check(math.nan) is False and gate.check(None) is False  # never passes without a value


def test_operators_at_the_threshold_decide_the_registration(registry):
    """The registry applies the same comparison: a metric equal to a strict gate's threshold is not promoted."""
    at = registry({"m": 0.25}, _gates(("m", ">", 0.25)))
    assert not at.promoted and _champion(registry.client) is None
    at_inclusive = registry({"m": 0.25}, _gates(("m", ">=", 0.25)))
    assert at_inclusive.promoted and _champion(registry.client) == at_inclusive.version


def test_check_gates_keeps_the_gate_order_and_measured_values():
    gates = Gates(gates=[Gate(metric="x", value=1.0), Gate(metric="y", op="<", value=0.0)])
    res = check_gates({"y": -1.0, "x": 0.5}, gates)
    assert [(r.gate.metric, r.actual, r.passed) for r in res] == [("x", 0.5, False), ("y", -1.0, True)]


def test_ties_with_the_champion_promote_and_a_hair_worse_does_not(registry):
    gates = _gates(("up", ">=", 0.0), ("down", "<=", 1.0))
    first = registry({"up": 0.5, "down": 0.5}, gates, compare_to_champion=True)
    assert first.promoted and first.worse_than_champion == []  # no champion yet: the gates decide

    tie = registry({"up": 0.5, "down": 0.5}, gates, compare_to_champion=True)
    assert tie.promoted and tie.worse_than_champion == [] and _champion(registry.client) == tie.version

    lower = registry({"up": 0.5 - EPS, "down": 0.5}, gates, compare_to_champion=True)
    assert not lower.promoted and [w.split()[0] for w in lower.worse_than_champion] == ["up"]
    higher = registry({"up": 0.5, "down": 0.5 + EPS}, gates, compare_to_champion=True)  # lower is better here
    assert not higher.promoted and [w.split()[0] for w in higher.worse_than_champion] == ["down"]
    assert _champion(registry.client) == tie.version

    better = registry({"up": 0.5 + EPS, "down": 0.5 - EPS}, gates, compare_to_champion=True)
    assert better.promoted and _champion(registry.client) == better.version
