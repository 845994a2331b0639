"""Method checkpoints: safetensors of the trainable weights with the method's name, config and UNet signature as
metadata; loading rebuilds the method from the registry and applies the strict key check."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from idforge.methods.base import BaseMethod
from idforge.methods.registry import get_method

__all__ = ["CHECKPOINT_FORMAT", "save_method", "read_method_metadata", "load_method"]

CHECKPOINT_FORMAT = "idforge.method/1"


def save_method(method: BaseMethod, path: str | os.PathLike[str]) -> Path:
    """Write the method's weights as safetensors, with its name, config and UNet signature as JSON metadata.

    Written atomically (temp file then rename). Tensors are saved contiguous on CPU in their own dtype.
    """
    from safetensors.torch import save_file

    from idforge.io.atomic import atomic_path

    if method.built_for is None:
        raise ValueError(f"method {method.name!r} has no weights yet: attach it to a pipeline first")
    sd = {k: v.detach().to("cpu").contiguous() for k, v in method.state_dict().items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "method": method.name,
        "config": json.dumps(method.config.model_dump(mode="json"), sort_keys=True),
        "unet": json.dumps(method.built_for, sort_keys=True),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return path


def read_method_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"method": name, "config": dict, "unet": dict}`` of a checkpoint written by ``save_method``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"method checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an idforge method checkpoint (metadata format={meta.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}); write it with idforge.methods.checkpoint.save_method")
    return {"method": meta["method"], "config": json.loads(meta["config"]), "unet": json.loads(meta["unet"])}


def load_method(path: str | os.PathLike[str], pipe: Any | None = None, **config_overrides: Any) -> BaseMethod:
    """Rebuild a method from ``save_method``'s file. With ``pipe`` it is attached and loaded now (strict key and
    shape check, ``ValueError`` naming offenders); without, the weights load strictly at ``attach``.

    ``config_overrides`` change inference-time options (e.g. ``mixed_attention=False``); shape-defining keys must
    match the checkpoint or the strict check fails.

    Raises:
        ValueError: ``pipe``'s UNet is not the architecture the checkpoint was trained for (checked before anything
            is built or installed, so the pipeline is left as it was), or the strict key check fails.
    """
    from safetensors.torch import load_file

    meta = read_method_metadata(path)
    method = get_method(meta["method"], meta["config"], **config_overrides)
    if pipe is not None:
        here = json.loads(json.dumps(method.arch_signature(pipe.unet)))  # as saved: tuples become lists
        if here != meta["unet"]:
            differ = {k: (meta["unet"].get(k), here.get(k)) for k in sorted({*here, *meta["unet"]})
                      if meta["unet"].get(k) != here.get(k)}
            raise ValueError(f"{path} holds a {meta['method']!r} checkpoint for another UNet architecture "
                             f"(checkpoint vs this pipeline: {differ}); load it onto the base model it was "
                             "trained on")
    sd = load_file(str(path))
    method.load_state_dict(sd)  # pending until attach: the module shapes come from the UNet
    if pipe is not None:
        method.attach(pipe)
    return method
