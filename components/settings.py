"""The run's config: ``config_yaml`` with the typed per-run pipeline parameters applied, once, for every step."""

from kfp import dsl

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def resolve_config(config_yaml: str, preset: str = "", steps: int = 0, lr: float = 0.0) -> str:
    """``config_yaml`` < the preset < ``steps``/``lr`` (0 = keep), as resolved YAML (``idforge.run_settings``).

    Deterministic: the same inputs give the same text, so the steps' cache keys stay stable across runs.

    Args:
        config_yaml: The idforge config as YAML text; "" = defaults.
        preset: A paper preset by method name (configs/presets/<name>.yaml); "" = none.
        steps: Optimizer steps for training and fine-tuning; 0 = the config's.
        lr: Learning rate for training and fine-tuning; 0 = the config's.

    Returns:
        Output: The resolved config as YAML, what every later step reads.
    """
    from idforge.config import dump_config
    from idforge.run_settings import resolve_run_config

    return dump_config(resolve_run_config(config_yaml, preset=preset, steps=steps, lr=lr))
