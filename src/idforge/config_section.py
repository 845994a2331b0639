"""The base class of every config section (kept apart from ``config.py`` so stage configs can import it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors and assignments are validated, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
