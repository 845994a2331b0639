"""Per-identity fine-tuning: list the identities, fine-tune one (inside a ParallelFor), gather the artifacts."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def list_identities(dataset: Input[Dataset], first: int = 0, max_identities: int = 0) -> List[str]:
    """A chunk of a curated dataset's identity ids, sorted, so large datasets can be fine-tuned over several runs.

    Args:
        dataset: The curated dataset (its identities.parquet).
        first: Skip the first N identities in sorted order (where this run's chunk starts); 0 = from the start.
        max_identities: Keep only N identities from ``first`` on (a chunk, or a smoke run); 0 = all the rest.

    Returns:
        Output: The identity ids, sorted; the per-identity fan-out iterates over them.
    """
    from idforge.train.per_identity import list_identities as identities_of

    if first < 0 or max_identities < 0:
        raise ValueError(f"first={first} and max_identities={max_identities} must be >= 0")
    ids = identities_of(dataset.path)[first:]
    return ids[:max_identities] if max_identities > 0 else ids


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cuda:{DEFAULT_TAG}", install_kfp_package=False)
def finetune_identity(
    dataset: Input[Dataset],
    identity: str,
    method: str,
    base_model: str,
    config_yaml: str,
    parent_run_id: str,
    model: Output[Model],
):
    """Fine-tune ``method`` on one identity; the artifact lands in ``model``/<identity>/ (the layout
    ``idforge finetune --all`` writes, which generate reads).

    Args:
        dataset: The curated dataset holding the identity's photos (crops, masks, embeddings).
        identity: The identity id to fine-tune on (one of list_identities' ids).
        method: A per-identity method (``id-ea``, ``sefi-ide``, ``pidiff``, ``textual-inversion``,
            ``dreambooth-lora``).
        base_model: The diffusion base model: a local directory or a hub id already in the local cache.
        config_yaml: The resolved idforge config as YAML text (its ``finetune`` and ``tracking`` sections); "" =
            defaults.
        parent_run_id: The pipeline's parent MLflow run, under which this identity's run nests; "" = a top-level
            run.

    Returns:
        model: ``<identity>/`` with the method's weights (safetensors), artifact.json, finetune.json and sample
            images; metadata ``method``, ``identity``, ``base_model`` and the fine-tune's ``status``.
    """
    from idforge.config import load_config_text
    from idforge.train.per_identity import finetune_identity as run

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    result = run(method, identity, dataset.path, base_model, model.path, cfg.finetune,
                 parent_run_id=parent_run_id or None, tracking=cfg.tracking)
    model.metadata.update({"method": method, "identity": identity, "base_model": base_model,
                           "status": result.status})


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def gather_models(models: Input[List[Model]], method: str, model: Output[Model]):
    """One directory ``<identity>/...`` holding every identity's artifact (what generate reads).

    Args:
        models: The per-identity fine-tune outputs collected from the fan-out, one ``<identity>/`` each.
        method: The method they were fine-tuned with (recorded in the metadata).

    Returns:
        model: Every identity's ``<identity>/`` directory side by side; metadata ``method`` and ``identities``
            (how many).
    """
    import shutil
    from pathlib import Path

    out = Path(model.path)
    out.mkdir(parents=True, exist_ok=True)
    for m in models:
        for child in sorted(Path(m.path).iterdir()):
            shutil.copytree(child, out / child.name, dirs_exist_ok=True)
    model.metadata.update({"method": method, "identities": len(models)})
