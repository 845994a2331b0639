"""Prepare: curated dataset -> cached latents, CLIP features and caption embeddings (content-addressed)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cuda:{DEFAULT_TAG}", install_kfp_package=False)
def prepare(dataset: Input[Dataset], base_model: str, config_yaml: str, prepared: Output[Dataset]):
    """Encode what every training epoch would re-read; a second run over the same inputs writes nothing.

    Args:
        dataset: The curated dataset (crops, masks, embeddings, captions' identities).
        base_model: The diffusion base model whose VAE and text encoder make the latents and caption embeddings:
            a local directory or a hub id already in the local cache.
        config_yaml: The resolved idforge config as YAML text (its ``prepare`` and ``model`` sections); "" =
            defaults.

    Returns:
        prepared: Content-addressed shards of VAE latents, CLIP image features, face and caption embeddings and
            their index; metadata ``base_model``, ``items`` and ``computed`` (how many were encoded this run).
    """
    from idforge.config import load_config_text
    from idforge.train.prepare import prepare_dataset

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    index = prepare_dataset(
        dataset.path, base_model, prepared.path, cfg.prepare,
        clip_model=cfg.model.clip, local_files_only=cfg.model.local_files_only,
    )  # fmt: skip
    prepared.metadata.update({"base_model": base_model, "items": len(index.items), "computed": index.computed})
