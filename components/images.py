"""Which container image each component runs in, from the one catalog: ``images/images.yaml``.

Components are decorated with a neutral default image; pipelines set each task's real image with
``set_container_image`` from :class:`Images`, so compiling for another registry or tag needs no code change
(``IDFORGE_IMAGE_REGISTRY`` / ``IDFORGE_IMAGE_TAG``, or ``--registry/--tag`` on the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Only the decorators' placeholder; the catalog decides what runs.
DEFAULT_REGISTRY = "idforge"
DEFAULT_TAG = "0.1.0"

CATALOG = Path(__file__).resolve().parent.parent / "images" / "images.yaml"


@dataclass(frozen=True)
class Images:
    cpu: str
    cuda: str

    @classmethod
    def load(cls, registry: str | None = None, tag: str | None = None, catalog: Path = CATALOG) -> "Images":
        """References from the catalog, with ``registry``/``tag`` (else the env overrides) applied."""
        from idforge.ops.images import load_images

        images = load_images(catalog, registry=registry, tag=tag)
        return cls(cpu=images.ref("cpu"), cuda=images.ref("cuda"))
