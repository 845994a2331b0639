"""Prompt sets: YAML files of prompt templates by category, each with one ``{}`` where the identity goes.

Format (see ``data/prompts/README.md``)::

    name: eval
    source: where the categories come from
    cite: {clothing: "IDAdapter Fig. 1 ..."}     # optional, keys must be categories
    categories:
      clothing:
        - a photo of {} wearing an oversized sweater
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from idforge.errors import ConfigError

__all__ = ["PLACEHOLDER", "PromptSet", "RenderedPrompt", "load_prompt_set"]

PLACEHOLDER = "{}"


class RenderedPrompt(NamedTuple):
    category: str
    index: int  # position within its category, stable across identities (for seeds and file names)
    template: str
    text: str


def _placeholder_problem(prompt: str) -> str | None:
    """Why ``prompt`` is not a valid template, or None."""
    count = prompt.count(PLACEHOLDER)
    if count != 1:
        return f"has {count} '{{}}' placeholders, needs exactly one where the identity goes"
    rest = prompt.replace(PLACEHOLDER, "", 1)
    if "{" in rest or "}" in rest:
        return "has a brace besides the one '{}' placeholder (named fields like {name} are not supported)"
    if not rest.strip():
        return "is only the placeholder; add words around '{}'"
    return None


class PromptSet(BaseModel):
    """A named set of prompt templates grouped by category (insertion order is kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    source: str = Field(min_length=1, description="the paper(s) or origin the categories follow")
    categories: dict[str, list[str]] = Field(min_length=1)
    cite: dict[str, str] = Field(default_factory=dict, description="optional per-category citation")

    @field_validator("categories")
    @classmethod
    def _check_prompts(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for category, prompts in value.items():
            if not category.strip():
                raise ValueError("categories: a category name is empty")
            if not prompts:
                raise ValueError(f"categories.{category}: has no prompts; list at least one")
            for i, prompt in enumerate(prompts):
                problem = _placeholder_problem(prompt)
                if problem:
                    raise ValueError(f"categories.{category}[{i}] {prompt!r} {problem}")
            if len(set(prompts)) != len(prompts):
                raise ValueError(f"categories.{category}: lists a prompt twice")
        return value

    @model_validator(mode="after")
    def _check_cite(self) -> PromptSet:
        unknown = sorted(set(self.cite) - set(self.categories))
        if unknown:
            known = ", ".join(self.categories)
            raise ValueError(f"cite.{unknown[0]}: names a category that does not exist; categories: {known}")
        return self

    def __len__(self) -> int:
        return sum(len(p) for p in self.categories.values())

    def render(self, identity_token: str) -> dict[str, list[str]]:
        """The prompts with ``{}`` replaced by ``identity_token`` (e.g. ``"sks man"``), by category."""
        token = _check_token(identity_token)
        return {c: [p.replace(PLACEHOLDER, token) for p in ps] for c, ps in self.categories.items()}

    def items(self, identity_token: str) -> list[RenderedPrompt]:
        """The rendered prompts as a flat list in file order, each with its category and index."""
        token = _check_token(identity_token)
        return [
            RenderedPrompt(c, i, p, p.replace(PLACEHOLDER, token))
            for c, ps in self.categories.items()
            for i, p in enumerate(ps)
        ]


def _check_token(identity_token: str) -> str:
    if not isinstance(identity_token, str) or not identity_token.strip():
        raise ConfigError(f"identity token {identity_token!r} is empty; pass the words that name the identity")
    if PLACEHOLDER in identity_token:
        raise ConfigError(f"identity token {identity_token!r} contains '{{}}' itself")
    return identity_token.strip()


def load_prompt_set(path: str | os.PathLike[str]) -> PromptSet:
    """Read and validate a prompt-set YAML file.

    Raises:
        ConfigError: the file is missing, not YAML, or a key/prompt is invalid; the message names the file and
            the key (``categories.clothing[2]``) and says what to fix.
    """
    import yaml

    p = Path(path)
    try:
        data: Any = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"prompt set {p} does not exist (sets live in data/prompts/)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"prompt set {p} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"prompt set {p} must hold a mapping with name, source and categories")
    try:
        return PromptSet.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "<top>"
            if err["type"] == "value_error":  # our validators' messages start with their own dotted key
                problems.append(str(err["msg"]).removeprefix("Value error, "))
            elif err["type"] == "extra_forbidden":
                problems.append(f"{key}: unknown key; allowed: {', '.join(PromptSet.model_fields)}")
            else:
                problems.append(f"{key}: {err['msg']}")
        raise ConfigError(f"prompt set {p}: " + "; ".join(problems)) from None
