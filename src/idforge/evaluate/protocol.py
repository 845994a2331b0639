"""The evaluation protocol: what two runs must share to be comparable.

A protocol file names the prompt set and the categories drawn from it, the seeds (one image per seed per prompt per
identity), the sampling settings, which metrics run, and the face backends and models that score them. The file is
hashed into every generated image's record, so a comparison can check the runs used the same protocol.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from idforge.config_section import Section
from idforge.errors import ConfigError

# The prompt categories of the papers' evaluation sets (IDAdapter / Infinite-ID / ID-EA / PIDiff).
CATEGORIES = ("clothing", "accessory", "action", "expression", "view", "background", "style", "complex")
FaceBackend = Literal["insightface", "opencv"]


class MetricSwitches(Section):
    identity: bool = True  # ID similarity + face-detection rate (every listed backend)
    clip_t: bool = True
    clip_i: bool = True
    lpips: bool = True  # reference vs generated
    diversity: bool = True  # pairwise LPIPS and pairwise ID-embedding distance within identity x prompt


class Sampling(Section):
    num_inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = 7.5
    height: int | None = Field(default=None, ge=8, description="None = the base model's default")
    width: int | None = Field(default=None, ge=8)


class Protocol(Section):
    name: str
    prompt_set: str = Field(description="prompt-set YAML (idforge.io.prompts), relative to the protocol or the CWD")
    categories: list[str] | None = Field(default=None, description="subset of the set's categories; None = all")
    prompts_per_category: int | None = Field(default=None, ge=1, description="first N prompts of each category")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    images_per_prompt: int | None = Field(default=None, ge=1, description="first N seeds; None = all seeds")
    sampling: Sampling = Field(default_factory=Sampling)
    metrics: MetricSwitches = Field(default_factory=MetricSwitches)
    face_backends: list[FaceBackend] = Field(default_factory=lambda: ["opencv", "insightface"], min_length=1)
    clip_model: str = "openai/clip-vit-base-patch16"
    lpips_backend: Literal["auto", "lpips", "stlpips"] = "auto"
    # Where the protocol file was read from (set by load_protocol; resolves a relative prompt_set).
    source: str | None = None

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be unique, got {v}")
        return v

    @field_validator("face_backends")
    @classmethod
    def _unique_backends(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _enough_seeds(self) -> "Protocol":
        if self.images_per_prompt is not None and self.images_per_prompt > len(self.seeds):
            raise ValueError(
                f"images_per_prompt={self.images_per_prompt} needs at least that many seeds, got {len(self.seeds)}"
            )
        return self

    @property
    def seeds_used(self) -> list[int]:
        return self.seeds[: self.images_per_prompt] if self.images_per_prompt else list(self.seeds)

    def prompt_set_path(self) -> Path:
        p = Path(self.prompt_set).expanduser()
        if p.is_absolute():
            return p
        if self.source:
            beside = Path(self.source).parent / p
            if beside.exists():
                return beside
            # configs/protocols/x.yaml names data/prompts/y.yaml relative to the repository root
            for parent in Path(self.source).resolve().parents:
                if (parent / p).exists():
                    return parent / p
        return p

    def primary_face_backend(self, conditioning_backend: str) -> str:
        """The backend the headline ID similarity uses: the first listed one that the method was NOT conditioned on
        (scoring with the conditioning model inflates results); the conditioning one only if nothing else is listed."""
        for b in self.face_backends:
            if b != conditioning_backend:
                return b
        return self.face_backends[0]

    def fingerprint(self) -> str:
        """sha256 of what makes runs comparable (everything but the file location), first 16 hex digits."""
        data = self.model_dump(mode="json", exclude={"source"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_protocol(path: str | os.PathLike[str]) -> Protocol:
    """Read and validate a protocol file.

    Raises:
        ConfigError: missing file, bad YAML, unknown key or bad value (the message names the file and the key).
    """
    from idforge.config import format_validation_error

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"protocol file {p} does not exist (see configs/protocols/ for examples)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"protocol file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"protocol file {p} must hold a mapping, got {type(data).__name__}")
    data["source"] = str(p)
    try:
        return Protocol.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Protocol, f"protocol {p}")) from None
