"""Method registry: name -> class, imported lazily so listing methods costs nothing.

Built-in methods are named here by module path; a method defined elsewhere (a plugin, a test) registers itself
with ``@register_method``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from idforge.errors import ConfigError

# name -> "module:Class"; imported on first use.
_BUILTIN: dict[str, str] = {
    "id-adapter": "idforge.methods.id_adapter:IDAdapter",
    "infinite-id": "idforge.methods.infinite_id:InfiniteID",
    "id-ea": "idforge.methods.id_ea:IDEA",
    "sefi-ide": "idforge.methods.sefi_ide:SeFiIDE",
    "pidiff": "idforge.methods.pidiff:PIDiff",
    "textual-inversion": "idforge.methods.textual_inversion:TextualInversion",
    "dreambooth-lora": "idforge.methods.dreambooth_lora:DreamBoothLoRA",
}
_REGISTERED: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` (with a ``name`` ClassVar) reachable through ``get_method(cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls!r} needs a non-empty `name` class attribute to be registered")
    _REGISTERED[name] = cls
    return cls


def available_methods() -> list[str]:
    """Names accepted by ``get_method``, sorted."""
    return sorted({*_BUILTIN, *_REGISTERED})


def method_class(name: str) -> type:
    """The class registered under ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones and the closest match).
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    target = _BUILTIN.get(name)
    if target is None:
        known = available_methods()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; available: {', '.join(known)}")
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    _REGISTERED[name] = cls
    return cls


def get_method(name: str, config: Any = None, **cfg: Any):
    """Build the method ``name`` from its config (a config object, a dict, and/or keyword overrides).

    ``get_method("infinite-id", mixed_attention=False)`` and ``get_method("infinite-id", {"mixed_attention": False})``
    are the same. Unknown config keys raise ``ConfigError`` naming the key.
    """
    cls = method_class(name)
    return cls.from_config(config, **cfg)
