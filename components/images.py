"""Which container image each component runs in: one registry prefix + tag for all of them.

The defaults are what `make images` builds; a cluster overrides them with `IDFORGE_IMAGE_REGISTRY` and
`IDFORGE_IMAGE_TAG` (or `--registry/--tag` on `idforge pipeline compile|submit`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_REGISTRY = "idforge"
DEFAULT_TAG = "0.1.0"


@dataclass(frozen=True)
class Images:
    registry: str = DEFAULT_REGISTRY
    tag: str = DEFAULT_TAG

    @property
    def cpu(self) -> str:
        """curate, prepare (CPU part), evaluate, register: no CUDA in the image."""
        return f"{self.registry}/idforge-cpu:{self.tag}"

    @property
    def cuda(self) -> str:
        """train, finetune, generate."""
        return f"{self.registry}/idforge-cuda:{self.tag}"

    @classmethod
    def from_env(cls, registry: str | None = None, tag: str | None = None) -> "Images":
        return cls(
            registry=registry or os.environ.get("IDFORGE_IMAGE_REGISTRY", DEFAULT_REGISTRY),
            tag=tag or os.environ.get("IDFORGE_IMAGE_TAG", DEFAULT_TAG),
        )
