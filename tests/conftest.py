"""Shared test set-up. Fixtures live in tests/fixtures/*.py, one module per concern, loaded as plugins."""

from __future__ import annotations

import os

# Set before any test imports ray/mlflow/dvc: no telemetry, no auth token dance for local Ray clusters,
# and no hub access (every model a test loads is built locally by a fixture).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.dataset",
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.tracking",
    "tests.fixtures.faces",
    "tests.fixtures.torch_threads",
    "tests.fixtures.ray",
]
