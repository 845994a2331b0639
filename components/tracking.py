"""The pipeline's parent MLflow run: opened after curation, closed by the pipeline's exit task with its real
status. Every step that logs does so as a nested run under it."""

from kfp import dsl
from kfp.dsl import Dataset, Input

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def open_parent_run(config_yaml: str, pipeline_name: str, dataset: Input[Dataset], kfp_run_id: str = "") -> str:
    """Create the parent run: params = the resolved config; the dataset it runs on (its curation counts and
    report.json); tag ``idforge.kfp_run_id`` = the KFP run. Returns the run id. The run stays RUNNING: the
    pipeline's exit task (``close_parent_run``) ends it FINISHED or FAILED.

    It runs after curation, not before, so that curation (cached) takes no run id: a per-run input would
    change its cache key every time.

    Args:
        config_yaml: The resolved idforge config as YAML text, logged as the run's params (its ``tracking``
            section names the store); "" = defaults.
        pipeline_name: The pipeline's name: the run's name and its ``idforge.pipeline`` tag.
        dataset: The curated dataset the pipeline runs on; its counts become ``dataset_*`` metrics and its
            report.json an artifact of the run.
        kfp_run_id: The KFP run's id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``), tagged ``idforge.kfp_run_id`` so the
            exit task finds the run.

    Returns:
        Output: The parent run's id, which every later step nests its run under ("" with tracking off).
    """
    import os

    from idforge.config import load_config_text
    from idforge.track import describe_pipeline_run, log_artifact, log_config, log_dataset, log_metrics, start_run
    from idforge.track.runs import KFP_RUN_TAG

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    tags = {"idforge.pipeline": pipeline_name, "idforge.dataset": dataset.uri, KFP_RUN_TAG: kfp_run_id,
            "mlflow.note.content": describe_pipeline_run(pipeline_name, dataset.uri, dataset.metadata, cfg)}
    with start_run(cfg.tracking, run_name=pipeline_name, tags=tags, leave_open=True) as run:
        log_config(cfg)
        log_dataset(dataset.path, context="pipeline", name="curated")
        counts = {f"dataset_{k}": v for k, v in dataset.metadata.items() if isinstance(v, (int, float))}
        log_metrics(counts)
        report = os.path.join(dataset.path, "report.json")
        if os.path.isfile(report):
            log_artifact(report, "dataset")
        return run.info.run_id if run is not None else ""


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def close_parent_run(status: dsl.PipelineTaskFinalStatus, config_yaml: str, kfp_run_id: str) -> str:
    """The pipeline's exit task: end its parent run FINISHED when the pipeline succeeded, else FAILED (KILLED
    when cancelled), recording the KFP state and error.

    It takes no output of another task (KFP's rule for exit tasks): the parent run is found by its
    ``idforge.kfp_run_id`` tag, and the tracking settings come from the pipeline's ``config_yaml``.

    Args:
        status: KFP's final status of the pipeline body (filled in by KFP, not passed by the pipeline).
        config_yaml: The pipeline's config_yaml parameter (its ``tracking`` section names the store).
        kfp_run_id: The KFP run's id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``), the parent run's tag.

    Returns:
        Output: The final state recorded (SUCCEEDED, FAILED, CANCELLED...).
    """
    from idforge.config import load_config_text
    from idforge.track import close_pipeline_runs

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    error = (status.error_message or "") if status.state != "SUCCEEDED" else ""
    closed = close_pipeline_runs(cfg.tracking, kfp_run_id, status.state, error=error)
    print(f"pipeline {kfp_run_id} {status.state}: closed parent run(s) {', '.join(closed) or 'none'}")
    return status.state
