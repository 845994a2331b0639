"""Open the pipeline's parent MLflow run; every later step logs into it as a nested run."""

from kfp import dsl

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def open_parent_run(config_yaml: str, pipeline_name: str) -> str:
    """Create the parent run (params = the resolved config) and return its id."""
    from idforge.config import load_config_text
    from idforge.track import log_config, start_run

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    with start_run(cfg.tracking, run_name=pipeline_name, tags={"idforge.pipeline": pipeline_name}) as run:
        log_config(cfg)
        return run.info.run_id if run is not None else ""
