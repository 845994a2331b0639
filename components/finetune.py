"""Per-identity fine-tuning over chunks of identities: plan the chunks, fine-tune one chunk per pod (inside a
ParallelFor; the base loaded once per pod, each pod fetching only its chunk's rows and files), gather an index of
the artifacts (no copies)."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def plan_identity_chunks(
    dataset: Input[Dataset],
    config_yaml: str,
    identities_per_task: int = 8,
    first: int = 0,
    max_identities: int = 0,
) -> List[str]:
    """The sorted identity ids of a curated dataset in chunks, one fine-tune pod per chunk.

    Args:
        dataset: The curated dataset (its identities.parquet, else its manifest); the fine-tune pods read it
            through its URI (in each chunk), each fetching only its own identities' rows and files.
        config_yaml: The resolved idforge config as YAML text (its ``storage`` section); "" = defaults.
        identities_per_task: Identities per fine-tune pod (each pod loads the base model once for all of them).
        first: Skip the first N identities in sorted order (where this run's range starts); 0 = from the start.
        max_identities: Keep only N identities from ``first`` on (a range, or a smoke run); 0 = all the rest.

    Returns:
        Output: One chunk per fine-tune pod, in sorted order: JSON ``{"dataset_uri", "identities": [...]}``.
    """
    import json

    from idforge.config import load_config_text
    from idforge.train.identity_chunks import plan_chunks

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    # plan from the local copy (already here), hand the pods the URI: they must not receive the whole dataset
    chunks = plan_chunks(dataset.path, identities_per_task, first, max_identities, cfg.storage)
    # one self-contained item per pod (kfp's local runner resolves a loop over one output, not a NamedTuple's)
    return [json.dumps({"dataset_uri": dataset.uri, "identities": c}) for c in chunks]


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cuda:{DEFAULT_TAG}", install_kfp_package=False)
def finetune_identity_chunk(
    chunk: str,
    method: str,
    base_model: str,
    config_yaml: str,
    parent_run_id: str,
    model: Output[Model],
) -> str:
    """Fine-tune ``method`` on a chunk of identities with one base load; each artifact lands in
    ``model``/<identity>/ (the layout ``idforge finetune --all`` writes).

    Args:
        chunk: One of plan_identity_chunks' chunks: JSON ``{"dataset_uri", "identities": [...]}``, the curated
            dataset's URI (a local path or s3:// prefix; only the chunk's rows, files and embeddings are fetched
            from it) and the identity ids to fine-tune.
        method: A per-identity method (``id-ea``, ``sefi-ide``, ``pidiff``, ``textual-inversion``,
            ``dreambooth-lora``).
        base_model: The diffusion base model: a local directory or a hub id already in the local cache.
        config_yaml: The resolved idforge config as YAML text (its ``finetune``, ``tracking`` and ``storage``
            sections); "" = defaults.
        parent_run_id: The pipeline's parent MLflow run, under which each identity's run nests; "" = a
            top-level run.

    Returns:
        model: ``<identity>/`` per identity fine-tuned (weights, artifact.json, finetune.json, samples) and
            ``status.json``; metadata ``method``, ``identities``, ``done``, ``failed``, ``base_model``.
        Output: JSON ``{identity: artifact uri}`` of the identities that finished, for the gather step.
    """
    import json
    import tempfile
    from pathlib import Path

    from idforge.config import load_config_text
    from idforge.errors import DataError
    from idforge.io.atomic import atomic_write_text
    from idforge.train.identity_chunks import localize_subset
    from idforge.train.identity_worker import BaseWorker

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    item = json.loads(chunk)
    ids = item.get("identities") if isinstance(item, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids) or "dataset_uri" not in item:
        raise DataError(f"chunk must be JSON {{'dataset_uri', 'identities': [ids]}}, got {chunk[:200]!r}")
    dataset_uri = str(item["dataset_uri"])
    out = Path(model.path)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="idforge-chunk-") as td:
        subset = localize_subset(dataset_uri, ids, Path(td) / "dataset", cfg.storage)
        worker = BaseWorker(base_model, cfg.finetune)
        for identity in ids:
            try:
                results.append(worker.finetune(method, identity, subset, out, parent_run_id=parent_run_id or None,
                                               tracking=cfg.tracking).to_json())
            except Exception as exc:  # noqa: BLE001 - one identity's failure is reported, the chunk goes on
                results.append({"identity": identity, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
    atomic_write_text(out / "status.json", json.dumps({"method": method, "identities": results}, indent=2))
    done = [r["identity"] for r in results if r["status"] == "done"]
    model.metadata.update({"method": method, "identities": len(ids), "done": len(done),
                           "failed": len(ids) - len(done), "base_model": base_model})
    return json.dumps({i: f"{model.uri.rstrip('/')}/{i}" for i in done})


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def gather_models(indexes: List[str], method: str, model: Output[Model]):
    """An index of every identity's artifact URI (``artifacts.index.json``), which generate reads; the
    artifacts stay where the chunk pods wrote them.

    Args:
        indexes: The chunks' ``{identity: artifact uri}`` JSON, collected from the fan-out.
        method: The method they were fine-tuned with (recorded in the index and the metadata).

    Returns:
        model: ``artifacts.index.json`` (``{"method", "artifacts": {identity: uri}}``); metadata ``method`` and
            ``identities`` (how many finished).
    """
    import json

    from idforge.train.identity_chunks import merge_indexes, write_index

    merged = merge_indexes([json.loads(i) for i in indexes])
    write_index(merged, model.path, method)
    model.metadata.update({"method": method, "identities": len(merged)})
