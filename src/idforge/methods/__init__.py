"""Identity methods behind one interface (``idforge.methods.base.Method``).

Import-light on purpose: ``get_method``/``available_methods`` import a method's module only when it is asked for.
"""

from __future__ import annotations

from idforge.methods.registry import available_methods, get_method, method_class

__all__ = ["available_methods", "get_method", "method_class"]
