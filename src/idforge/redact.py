"""Keep secrets out of what we write: URLs lose the password of their userinfo before they reach a resolved config,
MLflow params, a pipeline parameter, a Ray job's runtime env, a log line or a report.

Credentials come from the environment only (S3: the variables ``storage.*_key_env`` name; MLflow:
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``). A tracking URI written as ``https://user:pw@host`` still
works in the process that was given it: :func:`export_url_credentials` moves its credentials into MLflow's
variables, which child processes (pipeline steps, local Ray workers) inherit, while the URI that travels on is
``https://user@host``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["strip_password", "redact", "export_url_credentials"]

# scheme://user:password@ -- the password is anything up to the last '@' of the authority
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):[^/\s@]*@")


def strip_password(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it removed (``user@host``)."""
    return _USERINFO.sub(lambda m: m.group("head") + "@", text)


def redact(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists, tuples, strings) with :func:`strip_password` applied to strings."""
    if isinstance(value, str):
        return strip_password(value)
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def export_url_credentials(url: str, user_env: str = "MLFLOW_TRACKING_USERNAME",
                           password_env: str = "MLFLOW_TRACKING_PASSWORD") -> str:
    """Put the userinfo of ``url`` into ``$user_env``/``$password_env`` (unless already set); the URL without its
    password. A URL without a password is returned unchanged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    os.environ.setdefault(user_env, unquote(parts.username or ""))
    os.environ.setdefault(password_env, unquote(parts.password))
    return strip_password(url)
