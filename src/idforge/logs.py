"""Known-harmless third-party notices, filtered where they are logged (never our own warnings).

transformers announces on every process that our image processors fall back to their PIL implementation because
torchvision is absent: by design here (torchvision's wheel does not import with the CPU torch, ARCHITECTURE.md), so
the notice says nothing a user can act on. The filter sits on the logger that emits it and matches that one message.
"""

from __future__ import annotations

import logging
import re

#: logger name -> messages dropped there
KNOWN_NOTICES: dict[str, tuple[re.Pattern[str], ...]] = {
    "transformers.utils.import_utils": (
        re.compile(r"requires torchvision \(not installed\); falling back to `\w+Pil`"),
    ),
}


class _DropKnown(logging.Filter):
    def __init__(self, patterns: tuple[re.Pattern[str], ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_known_notices() -> None:
    """Install the filters (idempotent: one filter per logger however often it is called)."""
    for name, patterns in KNOWN_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(patterns))
