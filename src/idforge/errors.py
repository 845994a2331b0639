"""The exceptions idforge raises for bad input. The CLI prints their message as one line and exits 2."""

from __future__ import annotations


class IdforgeError(Exception):
    """Base: the message names the input at fault and how to fix it."""


class ConfigError(IdforgeError, ValueError):
    """A config file, key or value is wrong."""


class ModelNotFoundError(IdforgeError, FileNotFoundError):
    """A model id is neither a local directory nor reachable (no hub from our machines)."""


class StorageError(IdforgeError, OSError):
    """A storage URI is malformed, unreachable, or the object is missing."""


class DataError(IdforgeError, ValueError):
    """Input data (images, manifests, datasets) is missing or malformed."""
