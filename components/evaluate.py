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
    """Prompts x identities x seeds of the protocol, each image with the exact config that made it.

    Args:
        model: The trained method's artifact: a population method's checkpoint directory, one
            ``<identity>/`` directory per identity for a per-identity method, or the per-identity fan-out's
            ``artifacts.index.json`` of artifact URIs (fetched here, into ``generated``/_artifacts).
        dataset: The curated dataset whose identities' reference photos condition the generation.
        method: The registered method name (``idforge methods list``), e.g. ``infinite-id``.
        base_model: The diffusion base model: a local directory or a hub id already in the local cache.
        config_yaml: The resolved idforge config as YAML text (its ``generate`` section and protocol); "" =
            defaults.

    Returns:
        generated: The images with the exact config of each and index.parquet (and ``_artifacts/`` when the model
            was an artifact index); metadata ``method`` and ``images`` (how many).
    """
    from pathlib import Path

    from idforge.config import load_config_text
    from idforge.evaluate.generate import generate_images
    from idforge.train.identity_chunks import materialize_index, read_index

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    artifact = model.path
    if read_index(model.path) is not None:
        # a per-identity fan-out gathers an index of artifact URIs: fetch the artifacts here, into this step's
        # output, where the images' records (and register, which reads the weights they name) find them
        artifact = materialize_index(model.path, Path(generated.path) / "_artifacts", cfg.storage)
    result = generate_images(method, artifact, dataset.path, None, None, base_model, generated.path, cfg)
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
    """The protocol's metrics -> metrics.parquet, report.html and an MLflow run; returns that run's id.

    Args:
        generated: The generated images and their index.parquet (generate's output).
        dataset: The curated dataset the images are scored against (the identities' reference photos).
        config_yaml: The resolved idforge config as YAML text (its ``evaluate`` section and protocol); "" =
            defaults.
        parent_run_id: The pipeline's parent MLflow run, under which the evaluation run nests; "" = a top-level
            run.

    Returns:
        table: metrics.parquet, one row per generated image with every metric of the protocol.
        metrics: The summary over all images (identity similarity, CLIP-T, CLIP-I, LPIPS, diversity,
            face-detect rate); metrics that are NaN (no face found) are left out.
        report: The HTML report as one self-contained file (KFP's viewer shows a single file): the metrics
            tables and each identity's section with its thumbnails inlined; the paged report is in ``table``.
        Output: The evaluation's MLflow run id ("" with tracking off), what register reads.
    """
    from pathlib import Path

    from idforge.config import load_config_text
    from idforge.evaluate.report import standalone_report
    from idforge.evaluate.run import evaluate_generated
    from idforge.ops.kfp_metrics import write_metrics

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    result = evaluate_generated(generated.path, dataset.path, table.path, cfg, run_name="evaluate",
                                parent_run_id=parent_run_id or None)
    write_metrics(metrics, result.summary)
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(standalone_report(result.report), encoding="utf-8")
    return result.run_id or ""


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def register(eval_run_id: str, config_yaml: str, gates_yaml: str, compare_to_champion: bool = False) -> str:
    """Register the evaluated model; alias ``champion`` only when every gate passes (and, with
    ``compare_to_champion``, it beats the current champion).

    Args:
        eval_run_id: The evaluation's MLflow run (evaluate's output); its metrics are what the gates read.
        config_yaml: The resolved idforge config as YAML text (its ``tracking``, ``model`` and ``generate``
            sections); "" = defaults.
        gates_yaml: The gates as YAML text, in ``configs/gates.yaml``'s format (``metric``, ``op``, ``value`` per
            gate); "" = ``configs/gates.yaml``.
        compare_to_champion: Also require the candidate to be no worse than the current ``champion`` on every
            gated metric before the alias moves (the retrain pipeline's rule).

    Returns:
        Output: The registry's summary line: the registered version, each gate's result, whether the alias moved.
    """
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
