"""Generate with a trained method, evaluate the images, register the model when its gates pass."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cuda:{DEFAULT_TAG}", install_kfp_package=False)
def generate(
    model: Input[Model],
    dataset: Input[Dataset],
    method: str,
    base_model: str,
    config_yaml: str,
    generated: Output[Dataset],
):
    """Prompts x identities x seeds of the protocol, each image with the exact config that made it."""
    from idforge.config import load_config_text
    from idforge.evaluate.generate import generate_images

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    result = generate_images(method, model.path, dataset.path, None, None, base_model, generated.path, cfg)
    generated.metadata.update({"method": method, "images": len(result.index)})


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def evaluate(
    generated: Input[Dataset],
    dataset: Input[Dataset],
    config_yaml: str,
    parent_run_id: str,
    table: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> str:
    """The protocol's metrics -> metrics.parquet, report.html and an MLflow run; returns that run's id."""
    import json
    import shutil

    from idforge.config import load_config_text
    from idforge.evaluate.run import evaluate_generated

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    result = evaluate_generated(generated.path, dataset.path, table.path, cfg, run_name="evaluate",
                                parent_run_id=parent_run_id or None)
    for key, value in result.summary.items():
        if value == value:  # KFP metrics reject NaN (e.g. similarity when no face was found)
            metrics.log_metric(key, float(value))
    # The metrics live in the artifact's metadata; a file at its path lets caches see the artifact exists.
    with open(metrics.path, "w") as fh:
        json.dump(dict(metrics.metadata), fh)
    shutil.copyfile(result.report, report.path)
    return result.run_id or ""


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def register(eval_run_id: str, config_yaml: str, gates_yaml: str, compare_to_champion: bool = False) -> str:
    """Register the evaluated model; alias ``champion`` only when every gate passes (and, with
    ``compare_to_champion``, it beats the current champion). Returns the registry's summary line."""
    import tempfile
    from pathlib import Path

    from idforge.config import load_config_text
    from idforge.evaluate.register import register_run

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    with tempfile.TemporaryDirectory() as tmp:
        gates = Path(tmp) / "gates.yaml"
        gates.write_text(gates_yaml)
        result = register_run(eval_run_id, gates, cfg, compare_to_champion=compare_to_champion)
    print(result.summary())
    return result.summary()
