"""Per-identity fine-tuning: list the identities, fine-tune one (inside a ParallelFor), gather the artifacts."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def list_identities(dataset: Input[Dataset], max_identities: int = 0) -> List[str]:
    """Identity ids of a curated dataset, sorted (0 = all)."""
    from idforge.train.per_identity import list_identities as identities_of

    ids = identities_of(dataset.path)
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
    ``idforge finetune --all`` writes, which generate reads)."""
    from idforge.config import load_config_text
    from idforge.train.per_identity import finetune_identity as run

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    result = run(method, identity, dataset.path, base_model, model.path, cfg.finetune,
                 parent_run_id=parent_run_id or None, tracking=cfg.tracking)
    model.metadata.update({"method": method, "identity": identity, "base_model": base_model,
                           "status": result.status})


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def gather_models(models: Input[List[Model]], method: str, model: Output[Model]):
    """One directory ``<identity>/...`` holding every identity's artifact (what generate reads)."""
    import shutil
    from pathlib import Path

    out = Path(model.path)
    out.mkdir(parents=True, exist_ok=True)
    for m in models:
        for child in sorted(Path(m.path).iterdir()):
            shutil.copytree(child, out / child.name, dirs_exist_ok=True)
    model.metadata.update({"method": method, "identities": len(models)})
