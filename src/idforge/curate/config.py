"""Curation settings (the ``curate:`` section of a config file)."""

from __future__ import annotations

from typing import Literal

from idforge.config_section import Section


class CurateConfig(Section):
    backend: Literal["insightface", "opencv"] = "insightface"
    # Directory of an insightface model pack (buffalo_l, antelopev2) or None for the embedded default.
    model_dir: str | None = None
    min_face_px: int = 64
    min_images_per_identity: int = 2
    workers: int = 1
