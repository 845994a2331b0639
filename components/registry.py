"""Small lookups the pipelines branch on: a method's regime, the current champion's artifact."""

from kfp import dsl

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def method_regime(method: str) -> str:
    """"population" (one adapter for every identity) or "per-identity" (one fine-tune per identity)."""
    from idforge.methods.registry import method_class

    return method_class(method).regime


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def champion_artifact(method: str, config_yaml: str) -> str:
    """Local path of the method checkpoint behind the ``champion`` alias, or "" when there is none yet."""
    import tempfile

    from idforge.config import load_config_text
    from idforge.evaluate.register import download_champion

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    path = download_champion(method, cfg, tempfile.mkdtemp(prefix="idforge-champion-"))
    return str(path) if path is not None else ""
