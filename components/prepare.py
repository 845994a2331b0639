"""Prepare: curated dataset -> cached latents, CLIP features and caption embeddings (content-addressed)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cuda:{DEFAULT_TAG}", install_kfp_package=False)
def prepare(dataset: Input[Dataset], base_model: str, config_yaml: str, prepared: Output[Dataset]):
    """Encode what every training epoch would re-read; a second run over the same inputs writes nothing."""
    from idforge.config import load_config_text
    from idforge.train.prepare import prepare_dataset

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    index = prepare_dataset(
        dataset.path, base_model, prepared.path, cfg.prepare,
        clip_model=cfg.model.clip, local_files_only=cfg.model.local_files_only,
    )  # fmt: skip
    prepared.metadata.update({"base_model": base_model, "items": len(index.items), "computed": index.computed})
