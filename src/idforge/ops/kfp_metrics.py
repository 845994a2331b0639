"""Scalars onto a KFP ``Output[Metrics]`` artifact: the one way the components record their numbers.

Duck-typed on purpose (anything with ``log_metric``, ``metadata`` and ``path``), so the library stays free of kfp;
the components import it inside their bodies, where only the installed library exists.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any, Protocol

from idforge.io.atomic import atomic_write_text


class MetricsArtifact(Protocol):
    """What ``kfp.dsl.Metrics`` offers and this module uses."""

    path: str
    metadata: dict[str, Any]

    def log_metric(self, metric: str, value: float) -> None: ...


def write_metrics(artifact: MetricsArtifact, values: Mapping[str, Any]) -> dict[str, float]:
    """Log every finite real number of ``values`` on ``artifact`` and write its metadata as JSON to its path.

    Anything else is left out: strings and ids are not metrics, and KFP refuses NaN and infinity (a similarity
    with no face found is NaN). Booleans count as numbers (0.0/1.0). The file at ``artifact.path`` is what lets
    KFP's cache and the local runner see that the artifact exists; the metrics themselves live in its metadata.
    Returns the metrics logged.
    """
    logged: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, numbers.Real) and math.isfinite(value):
            logged[key] = float(value)
            artifact.log_metric(key, logged[key])
    atomic_write_text(artifact.path, json.dumps(dict(artifact.metadata)))
    return logged
