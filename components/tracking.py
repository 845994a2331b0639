"""Open the pipeline's parent MLflow run; every later step that logs does so as a nested run under it."""

from kfp import dsl
from kfp.dsl import Dataset, Input

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def open_parent_run(config_yaml: str, pipeline_name: str, dataset: Input[Dataset]) -> str:
    """Create the parent run: params = the resolved config; the dataset it runs on (its curation counts and
    report.json).

    It runs after curation, not before, so that curation (cached) takes no run id: a per-run input would
    change its cache key every time.

    Args:
        config_yaml: The resolved idforge config as YAML text, logged as the run's params (its ``tracking``
            section names the store); "" = defaults.
        pipeline_name: The pipeline's name: the run's name and its ``idforge.pipeline`` tag.
        dataset: The curated dataset the pipeline runs on; its counts become ``dataset_*`` metrics and its
            report.json an artifact of the run.

    Returns:
        Output: The parent run's id, which every later step nests its run under ("" with tracking off).
    """
    import os

    from idforge.config import load_config_text
    from idforge.track import describe_pipeline_run, log_artifact, log_config, log_dataset, log_metrics, start_run

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    tags = {"idforge.pipeline": pipeline_name, "idforge.dataset": dataset.uri,
            "mlflow.note.content": describe_pipeline_run(pipeline_name, dataset.uri, dataset.metadata, cfg)}
    with start_run(cfg.tracking, run_name=pipeline_name, tags=tags) as run:
        log_config(cfg)
        log_dataset(dataset.path, context="pipeline", name="curated")
        counts = {f"dataset_{k}": v for k, v in dataset.metadata.items() if isinstance(v, (int, float))}
        log_metrics(counts)
        report = os.path.join(dataset.path, "report.json")
        if os.path.isfile(report):
            log_artifact(report, "dataset")
        return run.info.run_id if run is not None else ""
