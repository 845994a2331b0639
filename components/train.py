"""Train a population (tuning-free) method with Ray Train: local Ray, or a Ray cluster via the Jobs API."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cuda:{DEFAULT_TAG}", install_kfp_package=False)
def train_adapter(
    prepared: Input[Dataset],
    method: str,
    base_model: str,
    config_yaml: str,
    parent_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    ray_address: str = "",
    init_from: str = "",
):
    """Run ``idforge train`` for ``method``.

    ``ray_address`` = the Jobs API of a Ray cluster (``http://idforge-ray-head-svc:8265``): the training runs there
    as a Ray job that this step follows (checkpoints under ``$IDFORGE_CHECKPOINTS``; a retried step re-attaches to
    its job). Any other non-empty address (``ray://``, ``auto``) is joined in-process; empty = a local Ray here.

    Args:
        prepared: The prepared dataset (prepare's output); with a Ray cluster its ``s3://`` URI is what the
            workers read.
        method: A population method (``infinite-id``, ``id-adapter``).
        base_model: The diffusion base model: a local directory or a hub id already in the local cache.
        config_yaml: The resolved idforge config as YAML text (its ``train`` and ``model`` sections); "" =
            defaults. ``method`` and ``init_from`` override its ``train.method``/``train.init_from``.
        parent_run_id: The pipeline's parent MLflow run, under which the training run nests; "" = a top-level run.
        workers: Ray Train workers (data-parallel ranks).
        gpus_per_worker: GPUs each worker asks Ray for; 0 = train on CPU.
        ray_address: Where Ray runs (see above): a Jobs API URL, a ``ray://``/``auto`` address, or "" = local.
        init_from: A checkpoint to start from (the champion's, in the retrain pipeline); "" = fresh weights.

    Returns:
        model: ``method.safetensors``, ``config.resolved.yaml`` and ``metrics.json``; metadata ``method``,
            ``base_model``, ``steps``, ``mlflow_run_id``, and with a Ray cluster the job id and checkpoint URI.
        metrics: The last metrics rank 0 reported (loss and its parts, learning rate, samples per second).
    """
    import contextlib
    import os

    from idforge.config import load_config_text
    from idforge.ops.kfp_metrics import write_metrics

    cfg = load_config_text(
        config_yaml, [f"train.method={method}"] + ([f"train.init_from={init_from}"] if init_from else []),
        source="pipeline parameter config_yaml",
    )
    if ray_address.startswith(("http://", "https://")):
        from idforge.train.remote import default_output_uri, train_on_ray_cluster

        # The cluster reads the bucket, not this pod's copy of the input; model.uri is stable across retries.
        data = prepared.uri if prepared.uri.startswith("s3://") else prepared.path
        output = default_output_uri(model.uri, method, fallback_dir=os.path.dirname(model.path))
        result = train_on_ray_cluster(
            cfg, data, base_model, method, output, ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
            local_dir=model.path, parent_run_id=parent_run_id or None,
        )  # fmt: skip
        model.metadata.update({"ray_job_id": result.job_id, "checkpoints": result.output_uri})
    else:
        from idforge.track import start_run
        from idforge.train.population import train_population

        # With the parent run active, the training run nests under it; the parent stays open for the exit task.
        parent = (start_run(cfg.tracking, run_id=parent_run_id, leave_open=True) if parent_run_id
                  else contextlib.nullcontext())
        with parent:
            result = train_population(
                cfg, prepared.path, base_model, workers=workers, gpus_per_worker=gpus_per_worker,
                output_dir=model.path, ray_address=ray_address or None,
                local_files_only=cfg.model.local_files_only,
            )  # fmt: skip
    write_metrics(metrics, result.metrics)
    model.metadata.update({"method": method, "base_model": base_model, "steps": result.steps,
                           "mlflow_run_id": result.mlflow_run_id or ""})
