"""Container image references for the KFP components and k8s manifests, read from ``images/images.yaml``.

One registry prefix and one tag name every image: ``{registry}/{name}:{tag}``. Both come from images.yaml and can be
overridden with ``$IDFORGE_IMAGE_REGISTRY`` / ``$IDFORGE_IMAGE_TAG`` (the same values ``make -C images push
REGISTRY=... TAG=...`` takes), so a pipeline compiled for another registry needs no file edits.

Resolution happens where pipelines are compiled (in the repo); the images themselves never need this file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from idforge.errors import ConfigError

__all__ = ["ImageSpec", "ImageCatalog", "find_images_file", "load_images", "image_ref"]

IMAGES_FILE_ENV = "IDFORGE_IMAGES_FILE"
REGISTRY_ENV = "IDFORGE_IMAGE_REGISTRY"
TAG_ENV = "IDFORGE_IMAGE_TAG"

# Docker's reference grammar, simplified: lowercase path components; a tag is [\w][\w.-]{0,127}.
_REGISTRY_RE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]{1,2}[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


@dataclass(frozen=True)
class ImageSpec:
    key: str  # "cpu", "cuda", ...
    name: str  # repository name under the registry, e.g. "idforge-cpu"
    dockerfile: str  # relative to images/
    stages: tuple[str, ...]


@dataclass(frozen=True)
class ImageCatalog:
    registry: str
    tag: str
    images: dict[str, ImageSpec]
    source: Path

    def ref(self, key: str) -> str:
        """``{registry}/{name}:{tag}`` of image ``key`` ("cpu", "cuda", "mlflow", "base")."""
        try:
            spec = self.images[key]
        except KeyError:
            raise ConfigError(f"no image {key!r} in {self.source}; known: {', '.join(sorted(self.images))}") from None
        return f"{self.registry}/{spec.name}:{self.tag}"

    def for_stage(self, stage: str) -> str:
        """The image that runs pipeline stage ``stage`` (e.g. "curate" -> the CPU image)."""
        for key, spec in self.images.items():
            if stage in spec.stages:
                return self.ref(key)
        raise ConfigError(f"no image in {self.source} lists stage {stage!r}: add it to one image's stages")


def find_images_file(start: str | os.PathLike[str] | None = None) -> Path:
    """``$IDFORGE_IMAGES_FILE``, else ``images/images.yaml`` in ``start`` (default: CWD) or a parent of it."""
    env = os.environ.get(IMAGES_FILE_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"${IMAGES_FILE_ENV}={env} is not a file: point it at the repo's images/images.yaml")
        return path
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "images" / "images.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"images/images.yaml not found in {here} or its parents: run from the idforge repo or set "
                      f"${IMAGES_FILE_ENV}")


def load_images(
    path: str | os.PathLike[str] | None = None, *, registry: str | None = None, tag: str | None = None
) -> ImageCatalog:
    """Read images.yaml (``path``, else :func:`find_images_file`) and apply the overrides: ``registry``/``tag``
    arguments first, then ``$IDFORGE_IMAGE_REGISTRY``/``$IDFORGE_IMAGE_TAG``, then the file's values."""
    import yaml

    source = Path(path) if path is not None else find_images_file()
    try:
        data = yaml.safe_load(source.read_text())
    except FileNotFoundError:
        raise ConfigError(f"image catalog {source} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"image catalog {source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise ConfigError(f"image catalog {source} must hold registry, tag and an images mapping")
    registry = str(registry or os.environ.get(REGISTRY_ENV) or data.get("registry") or "").rstrip("/")
    tag = str(tag or os.environ.get(TAG_ENV) or data.get("tag") or "")
    if not _REGISTRY_RE.match(registry):
        raise ConfigError(f"image registry {registry!r} (from {source} or ${REGISTRY_ENV}) is not a valid lowercase "
                          f"registry/path prefix, e.g. ghcr.io/team or localhost:5001/idforge")
    if not _TAG_RE.match(tag) or tag == "latest":
        raise ConfigError(f"image tag {tag!r} (from {source} or ${TAG_ENV}) must be a pinned tag (letters, digits, "
                          f"'.', '_', '-'), not empty and not 'latest'")
    images: dict[str, ImageSpec] = {}
    for key, entry in data["images"].items():
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("dockerfile"):
            raise ConfigError(f"image {key!r} in {source} needs a name and a dockerfile")
        images[str(key)] = ImageSpec(key=str(key), name=str(entry["name"]), dockerfile=str(entry["dockerfile"]),
                                     stages=tuple(str(s) for s in entry.get("stages") or ()))
    return ImageCatalog(registry=registry, tag=tag, images=images, source=source)


def image_ref(key: str, path: str | os.PathLike[str] | None = None) -> str:
    """Shortcut: the reference of image ``key`` from the catalog at ``path`` (default: found from the CWD)."""
    return load_images(path).ref(key)
