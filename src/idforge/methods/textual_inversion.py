"""Textual Inversion (Gal et al., 2022), the diffusers-example recipe: only the new token vectors train.

The identity is ``num_tokens`` pseudo-words (``<idf-0> ...``) whose input embeddings (``modules["embeds"]``,
(n, D)) are initialised from ``init_word`` and optimised with the plain diffusion loss; UNet, VAE and text encoder
stay frozen (bit for bit). Besides our checkpoint, ``learned_embeds.safetensors`` is exported in the diffusers
textual-inversion format (``{placeholder: (n, D)}``), which ``pipe.load_textual_inversion`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from idforge.methods.base import MethodConfig
from idforge.methods.objective import diffusion_loss
from idforge.methods.personalized import (
    PersonalizedConfig,
    PersonalizedMethod,
    PlaceholderTokens,
    TrainRecipe,
    token_embedding,
)
from idforge.methods.registry import register_method
from idforge.methods.types import TrainBatch


class TextualInversionConfig(PersonalizedConfig):
    """Diffusers ``textual_inversion.py`` defaults: 3000 steps, batch 1 (x4 accumulation there), lr 5e-4 scaled."""

    num_tokens: int = Field(default=1, ge=1)
    placeholder: str = Field(default="<idf>", description="pseudo-word; several tokens get suffixes -0, -1, ...")
    init_word: str = Field(default="person", description="word whose embedding initialises the tokens")
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(steps=3000, batch_size=4, lr=5e-4, scale_lr=True))


class TokenVectors(nn.Module):
    """The learned input embeddings: ``vectors`` (n, D)."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.vectors = nn.Parameter(torch.zeros(n, dim))


def placeholder_words(placeholder: str, n: int) -> list[str]:
    return [placeholder] if n == 1 else [f"{placeholder[:-1]}-{i}>" if placeholder.endswith(">")
                                         else f"{placeholder}-{i}" for i in range(n)]


@register_method
class TextualInversion(PersonalizedMethod):
    name: ClassVar[str] = "textual-inversion"
    Config: ClassVar[type[MethodConfig]] = TextualInversionConfig
    config: TextualInversionConfig

    def __init__(self, config: TextualInversionConfig | None = None) -> None:
        super().__init__(config)
        self.tokens = PlaceholderTokens(placeholder_words(self.config.placeholder, self.config.num_tokens),
                                        fallback_word=self.config.init_word)

    def identity_phrase(self, class_noun: str = "person") -> str:
        return self.tokens.phrase

    def build(self, pipe: Any) -> None:
        dim = pipe.text_encoder.get_input_embeddings().embedding_dim
        embeds = TokenVectors(self.config.num_tokens, dim)
        with torch.no_grad():
            embeds.vectors.copy_(token_embedding(pipe, self.config.init_word).expand(self.config.num_tokens, dim))
        self.modules["embeds"] = embeds

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        return {}

    def on_attach(self, pipe: Any) -> None:
        super().on_attach(pipe)
        self.tokens.install(pipe)

    @property
    def vectors(self) -> Tensor:
        return self.modules["embeds"].vectors

    def encode_prompts(self, pipe: Any, prompts: Any, cond: Any) -> Any:
        on = cond is not None and self.state.scale != 0 and bool(cond.tensors["on"].any())
        return self.tokens.encode(pipe, prompts, self.vectors if on else None)

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        batch.require("latents", "input_ids")
        text = self.tokens.encode_ids(pipe, batch.input_ids, self.vectors)
        out = diffusion_loss(self.denoise_fn(pipe, text, batch), batch.latents, self._scheduler,
                             noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        return {"loss": out.loss, "diffusion": out.loss.detach()}

    def artifact_extra(self) -> dict[str, Any]:
        return {"placeholders": self.tokens.words, "diffusers_textual_inversion": "learned_embeds.safetensors"}

    def save_artifact(self, out_dir: Any, class_noun: str = "person") -> Path:
        """Our checkpoint plus ``learned_embeds.safetensors`` in diffusers' format ({placeholder: (n, D)})."""
        from safetensors.torch import save_file

        from idforge.io.atomic import atomic_path

        out = super().save_artifact(out_dir, class_noun)
        with atomic_path(out / "learned_embeds.safetensors") as tmp:
            save_file({self.config.placeholder: self.vectors.detach().cpu().contiguous()}, str(tmp))
        return out
