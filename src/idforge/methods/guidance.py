"""Classifier-free guidance with a trained unconditional branch: per-sample dropout of the identity, the text or both.

Sampling runs an unconditional branch (the negative prompt with ``method.unconditional(cond)``); a method that
never saw that branch in training extrapolates from an input it cannot read. So, as IP-Adapter trains it, each
training sample independently drops its identity condition, its text, or both, and the dropped parts are built by
the SAME functions the sampler uses:

- the dropped identity is the method's unconditional identity (zeros of its inputs run through its modules, batch
  1, exactly as ``unconditional`` builds it at inference);
- the dropped text is the sampler's empty negative prompt (``sampling.negative_text``: the encoded empty prompt,
  or zeros where the pipeline forces zeros for an empty prompt, as SDXL does).

One uniform draw per sample from the training generator decides: ``u < drop_identity`` -> identity only,
``< drop_identity + drop_text`` -> text only, ``< ... + drop_both`` -> both; so the stream is reproducible per seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from idforge.methods.base import MethodConfig


class GuidanceDropoutConfig(MethodConfig):
    """Dropout rates of the conditions in training (IP-Adapter's 5 % each unless a method's paper says otherwise)."""

    drop_identity: float = Field(default=0.05, ge=0, le=1, description="share of samples trained without identity")
    drop_text: float = Field(default=0.05, ge=0, le=1, description="share trained with the empty prompt")
    drop_both: float = Field(default=0.05, ge=0, le=1, description="share trained with neither (unconditional)")

    @model_validator(mode="after")
    def _check_rates(self) -> GuidanceDropoutConfig:
        total = self.drop_identity + self.drop_text + self.drop_both
        if total > 1.0:
            raise ValueError(f"drop_identity + drop_text + drop_both = {total:g} exceeds 1")
        return self


@dataclass(frozen=True)
class Drops:
    """(B,) bool masks: which samples of a batch train without their identity / without their text."""

    identity: Tensor
    text: Tensor

    @staticmethod
    def none(batch_size: int, device: Any = "cpu") -> Drops:
        off = torch.zeros(batch_size, dtype=torch.bool, device=device)
        return Drops(off, off)

    def fractions(self) -> dict[str, Tensor]:
        """Loss parts for the training log: the share of the batch that dropped each condition."""
        return {"drop_identity": self.identity.float().mean(), "drop_text": self.text.float().mean()}


def draw_drops(cfg: GuidanceDropoutConfig, batch_size: int, generator: torch.Generator | None = None,
               device: Any = "cpu") -> Drops:
    """One uniform per sample from ``generator`` -> the samples that drop identity, text or both."""
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(batch_size, generator=generator, device=gen_device).to(device)
    a, b, c = cfg.drop_identity, cfg.drop_text, cfg.drop_both
    only_identity = u < a
    only_text = (u >= a) & (u < a + b)
    both = (u >= a + b) & (u < a + b + c)
    return Drops(identity=only_identity | both, text=only_text | both)


def training_drops(method: Any, batch_size: int, generator: torch.Generator | None, device: Any) -> Drops:
    """The drops of one training batch: drawn while the method's modules train, none in evaluation (held-out
    losses and the identity gap measure the conditional model)."""
    if not method.modules.training:
        return Drops.none(batch_size, device)
    return draw_drops(method.config, batch_size, generator, device)


def where_rows(mask: Tensor, dropped: Tensor, kept: Tensor) -> Tensor:
    """Row i of ``dropped`` (broadcast from batch 1) where ``mask[i]``, else row i of ``kept``."""
    m = mask.to(kept.device).view(-1, *([1] * (kept.ndim - 1)))
    return torch.where(m, dropped.to(kept.dtype).expand_as(kept), kept)


def drop_text(method: Any, pipe: Any, text: Any, mask: Tensor) -> Any:
    """``text`` (a TextCondition) with the masked rows replaced by the sampler's empty negative prompt."""
    from idforge.diffusion.text import TextCondition
    from idforge.methods.sampling import negative_text

    if not bool(mask.any()):
        return text
    with torch.no_grad():
        neg = negative_text(method, pipe, "", 1, TextCondition(text.hidden[:1], None if text.pooled is None
                                                               else text.pooled[:1]))
    pooled = None if text.pooled is None else where_rows(mask, neg.pooled, text.pooled)
    return TextCondition(where_rows(mask, neg.hidden, text.hidden), pooled)


__all__ = ["Drops", "GuidanceDropoutConfig", "draw_drops", "drop_text", "training_drops", "where_rows"]
