"""Human-readable summaries of methods and method checkpoints (for ``idforge methods list|show|inspect``)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from idforge.methods.registry import available_methods, method_class


def method_summaries() -> list[dict[str, str]]:
    """[{"name", "regime", "summary"}] for every registered method (imports each method module)."""
    out = []
    for name in available_methods():
        cls = method_class(name)
        doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        out.append({"name": name, "regime": cls.regime, "summary": first})
    return out


def config_table(name: str) -> list[dict[str, Any]]:
    """[{"key", "type", "default", "description"}] of a method's config (what ``--set method.KEY=...`` accepts)."""
    cfg_cls = method_class(name).Config
    rows = []
    for key, field in cfg_cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        annotation = field.annotation
        type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        rows.append({"key": key, "type": type_name, "default": default, "description": field.description or ""})
    return rows


def describe_method(name: str) -> str:
    """A few lines: name, regime, and each config key with its default."""
    cls = method_class(name)
    lines = [f"{name} ({cls.regime})"]
    for row in config_table(name):
        desc = f"  # {row['description']}" if row["description"] else ""
        lines.append(f"  {row['key']}: {json.dumps(row['default'])} ({row['type']}){desc}")
    return "\n".join(lines)


def describe_checkpoint(path: str | os.PathLike[str]) -> str:
    """Method, config and UNet signature recorded in a ``save_method`` checkpoint, plus tensor counts per prefix."""
    from safetensors import safe_open

    from idforge.methods.checkpoint import read_method_metadata

    meta = read_method_metadata(path)
    counts: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            prefix = key.split(".")[0]
            counts[prefix] = counts.get(prefix, 0) + _numel(fh.get_slice(key).get_shape())
    lines = [f"method: {meta['method']}", f"unet: {json.dumps(meta['unet'], sort_keys=True)}",
             "config: " + json.dumps(meta["config"], sort_keys=True)]
    lines += [f"  {prefix}: {n:,} parameters" for prefix, n in sorted(counts.items())]
    return "\n".join(lines)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
