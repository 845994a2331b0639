"""Small lookups the pipelines branch on: a method's regime, the current champion's artifact."""

from kfp import dsl

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def method_regime(method: str) -> str:
    """The regime of a method, which decides the pipeline's training branch.

    Args:
        method: A registered method name (``idforge methods list``).

    Returns:
        Output: "population" (one adapter for every identity) or "per-identity" (one fine-tune per identity).
    """
    from idforge.methods.registry import method_class

    return method_class(method).regime


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def champion_artifact(method: str, config_yaml: str) -> str:
    """The method checkpoint behind the ``champion`` alias, downloaded, so a retrain can start from it.

    Args:
        method: The method whose registered model (``idforge-<method>``) is looked up.
        config_yaml: The resolved idforge config as YAML text (its ``tracking`` section names the registry); "" =
            defaults.

    Returns:
        Output: Local path of the downloaded checkpoint (file or per-identity directory), or "" when no version
            holds the alias yet.
    """
    import tempfile

    from idforge.config import load_config_text
    from idforge.evaluate.register import download_champion

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    path = download_champion(method, cfg, tempfile.mkdtemp(prefix="idforge-champion-"))
    return str(path) if path is not None else ""
