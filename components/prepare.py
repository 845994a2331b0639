"""Prepare: curated dataset -> cached latents, CLIP features and caption embeddings (content-addressed)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cuda:{DEFAULT_TAG}", install_kfp_package=False)
def prepare(dataset: Input[Dataset], base_model: str, config_yaml: str, prepared: Output[Dataset], engine: str = "",
            ray_address: str = ""):
    """Encode what every training epoch would re-read; a second run over the same inputs writes nothing.

    Args:
        dataset: The curated dataset (crops, masks, embeddings, captions' identities).
        base_model: The diffusion base model whose VAE and text encoder make the latents and caption embeddings:
            a local directory or a hub id already in the local cache.
        config_yaml: The resolved idforge config as YAML text (its ``prepare`` and ``model`` sections); "" =
            defaults.
        engine: "local" (one process, one file per item) or "ray" (Ray Data encoder actors writing shards, what
            ``train.input: stream`` reads); "" = the config's ``prepare.engine``.
        ray_address: With engine "ray": the Ray cluster to encode on (ray://head:10001); "" = the config's
            ``prepare.ray_address`` (none: a local Ray in this pod).

    Returns:
        prepared: Content-addressed shards of VAE latents, CLIP image features, face and caption embeddings and
            their index; metadata ``base_model``, ``items`` and ``computed`` (how many were encoded this run).
    """
    from idforge.config import load_config_text
    from idforge.train.prepare import prepare_dataset

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    if engine not in ("", "local", "ray"):
        raise ValueError(f"pipeline parameter prepare_engine={engine!r}: use local, ray or '' (the config's)")
    prep = cfg.prepare.model_copy(update={k: v for k, v in {"engine": engine, "ray_address": ray_address}.items() if v})
    index = prepare_dataset(
        dataset.path, base_model, prepared.path, prep,
        clip_model=cfg.model.clip, local_files_only=cfg.model.local_files_only,
    )  # fmt: skip
    prepared.metadata.update({"base_model": base_model, "items": len(index.items), "computed": index.computed,
                              "engine": prep.engine})
