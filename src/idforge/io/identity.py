"""Identity names: the one rule for the names that label people, checked wherever they are read or become paths.

An identity names a directory (``<finetune output>/<identity>/``), a status file, an S3 key segment and an MLflow
tag, so it must be a plain file name on every system: letters, digits, ``.``, ``_``, ``-``; starting with a letter
or digit (so never ``.``, ``..`` or a hidden name that could collide with our ``.<name>.tmp-*`` temp files); no
separators; at most :data:`MAX_LENGTH` characters.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from idforge.errors import DataError

__all__ = ["MAX_LENGTH", "check_identity", "identity_path"]

MAX_LENGTH = 64
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LENGTH - 1}}}")


def check_identity(name: object, where: str = "identity") -> str:
    """``name`` if it is a valid identity name, else DataError naming ``where`` it came from and the rule."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    raise DataError(
        f"{where}: {name!r} is not a valid identity name: use 1-{MAX_LENGTH} letters, digits, '.', '_' or '-', "
        "starting with a letter or digit (no path separators, no '.' or '..')"
    )


def identity_path(root: str | os.PathLike[str], name: str, suffix: str = "") -> Path:
    """``root/<name><suffix>`` for a checked identity name: a path that always stays directly inside ``root``."""
    return Path(root) / f"{check_identity(name)}{suffix}"
