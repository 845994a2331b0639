"""What the per-identity methods (Textual Inversion, DreamBooth-LoRA, ID-EA, SeFi-IDE, PIDiff) share.

- ``PlaceholderTokens``: pseudo-words (``<idf-0> <idf-1>``) that stand for the identity in prompts. They are added
  to the tokenizer so a prompt tokenises them to one id each, but the text encoder's embedding matrix is NOT
  resized: before the encoder runs, placeholder ids are swapped for an ordinary id and a token hook writes the
  learned vectors at their positions. The frozen text encoder therefore stays bit-identical, and only the vectors
  the method owns train.
- ``PersonalizedConfig``: the training recipe (steps, batch, lr, ...) each method's paper uses, so the per-identity
  loop runs the paper's defaults unless told otherwise, plus the caption templates.
- ``PersonalizedMethod``: ``BaseMethod`` plus the hooks the per-identity loop needs: ``identity_phrase`` (what
  replaces ``{}`` in a template), ``prepare_identity`` (identity-dependent initialisation before training),
  ``save_artifact``/``load_artifact`` (the files a trained identity leaves behind).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from idforge.config_section import Section
from idforge.methods.base import BaseMethod, MethodConfig
from idforge.methods.types import Condition, IdentityRefs, TrainBatch

log = logging.getLogger(__name__)

ARTIFACT_META = "artifact.json"

# The per-identity methods by registry name -> module. Importing a module registers its class
# (``@register_method``), so these names resolve even before the registry's built-in table lists them.
PER_IDENTITY_METHODS: dict[str, str] = {
    "textual-inversion": "idforge.methods.textual_inversion",
    "dreambooth-lora": "idforge.methods.dreambooth_lora",
    "id-ea": "idforge.methods.id_ea",
    "sefi-ide": "idforge.methods.sefi_ide",
    "pidiff": "idforge.methods.pidiff",
}


def register_per_identity_methods() -> list[str]:
    """Import the per-identity method modules (registering them); returns their names."""
    import importlib

    for module in PER_IDENTITY_METHODS.values():
        importlib.import_module(module)
    return sorted(PER_IDENTITY_METHODS)

DEFAULT_TEMPLATES = [
    "a photo of {}",
    "a close-up photo of {}",
    "a portrait of {}",
    "a cropped photo of {}",
    "a good photo of {}",
    "a photo of the face of {}",
]


class TrainRecipe(Section):
    """Optimiser settings of one identity's training run (each method sets its paper's values as defaults).

    ``scale_lr`` multiplies ``lr`` by the batch size (the diffusers textual-inversion ``--scale_lr`` rule).
    ``flip_prob`` mirrors a training image (its latents and mask) with that probability per sample; ``max_images``
    caps the identity's images (the papers that train from one photo set 1; None = all of them).
    """

    steps: int = Field(default=500, ge=1)
    batch_size: int = Field(default=1, ge=1)
    lr: float = Field(default=5e-3, gt=0)
    scale_lr: bool = False
    weight_decay: float = Field(default=0.0, ge=0)
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon")
    flip_prob: float = Field(default=0.0, ge=0, le=1, description="horizontal flip probability per sample")
    max_images: int | None = Field(default=None, ge=1, description="images of the identity to train on; None = all")
    optimizer: Literal["adamw"] = "adamw"


class PersonalizedConfig(MethodConfig):
    """Fields every per-identity method has."""

    train: TrainRecipe = Field(default_factory=TrainRecipe)
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES),
                                 description="training captions; '{}' is replaced by the identity phrase")
    sample_prompt: str = Field(default="a photo of {}", description="prompt of the images logged after training")


class PlaceholderTokens:
    """Pseudo-words of one identity for a CLIP tokenizer (single text encoder pipelines: SD1.5 / SD2.x).

    ``install(pipe)`` adds the words to ``pipe.tokenizer`` (idempotent) and remembers their ids; ``encode`` turns
    prompts or ids into ``TextCondition`` with the vectors (n, D) written at the placeholder positions.
    """

    def __init__(self, words: Sequence[str], fallback_word: str = "person") -> None:
        if not words:
            raise ValueError("need at least one placeholder word")
        if len(set(words)) != len(words):
            raise ValueError(f"placeholder words must be distinct: {list(words)}")
        self.words = list(words)
        self.fallback_word = fallback_word
        self.ids: Tensor | None = None
        self.fallback_id: int | None = None

    @property
    def phrase(self) -> str:
        return " ".join(self.words)

    def install(self, pipe: Any) -> None:
        if getattr(pipe, "text_encoder_2", None) is not None:
            from idforge.errors import ConfigError

            raise ConfigError("pseudo-token methods support single-text-encoder pipelines (SD1.5 / SD2.x); "
                             "this pipeline has two text encoders (SDXL): use dreambooth-lora or pidiff for SDXL")
        tok = pipe.tokenizer
        tok.add_tokens([w for w in self.words if w not in tok.get_vocab()])
        ids = []
        for w in self.words:
            pieces = tok(w, add_special_tokens=False).input_ids
            if len(pieces) != 1:
                raise ValueError(f"placeholder {w!r} does not tokenise to one token ({pieces})")
            ids.append(pieces[0])
        self.ids = torch.tensor(ids, dtype=torch.long)
        fb = tok(self.fallback_word, add_special_tokens=False).input_ids
        self.fallback_id = int(fb[0])
        vocab = pipe.text_encoder.get_input_embeddings().num_embeddings
        if self.fallback_id >= vocab:
            raise ValueError(f"fallback word {self.fallback_word!r} is not in the text encoder's vocabulary")

    def _require(self) -> Tensor:
        if self.ids is None:
            raise ValueError("placeholder tokens are not installed: attach the method to a pipeline first")
        return self.ids

    def positions(self, input_ids: Tensor) -> Tensor:
        """(B, L) long: k+1 where input_ids holds placeholder k, 0 elsewhere."""
        ids = self._require().to(input_ids.device)
        match = input_ids[..., None] == ids  # (B, L, n)
        return torch.where(match.any(-1), match.float().argmax(-1) + 1, torch.zeros_like(input_ids))

    def encode_ids(self, pipe: Any, input_ids: Tensor, vectors: Tensor | None) -> Any:
        """Encode ids with ``vectors`` (n, D) or per-row (B, n, D) at the placeholder positions.

        ``vectors=None`` encodes the fallback word instead (the prompt without the identity).
        """
        from idforge.diffusion.text import encode_ids

        pos = self.positions(input_ids)
        safe_ids = torch.where(pos > 0, torch.full_like(input_ids, self.fallback_id), input_ids)
        if vectors is None or not bool((pos > 0).any()):
            return encode_ids(pipe, safe_ids)

        def hook(embeds: Tensor, _ids: Tensor, _index: int) -> Tensor:
            v = vectors.to(embeds.device, embeds.dtype)
            b = embeds.shape[0]
            v = v.expand(b, *v.shape) if v.ndim == 2 else v  # (B, n, D)
            p = pos.to(embeds.device)
            gathered = torch.gather(v, 1, (p - 1).clamp_min(0)[..., None].expand(-1, -1, v.shape[-1]))
            return torch.where((p > 0)[..., None], gathered, embeds)

        return encode_ids(pipe, safe_ids, None, hook)

    def encode(self, pipe: Any, prompts: Sequence[str], vectors: Tensor | None) -> Any:
        from idforge.diffusion.text import tokenize

        ids, _ = tokenize(pipe, prompts)
        return self.encode_ids(pipe, ids, vectors)


def token_embedding(pipe: Any, words: str | Sequence[str]) -> Tensor:
    """(D,) mean input embedding of the tokens of ``words`` (a word, or several averaged word by word)."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    table = te.get_input_embeddings().weight.detach().float().cpu()
    items = [words] if isinstance(words, str) else list(words)
    vecs = []
    for w in items:
        ids = [i for i in tok(w, add_special_tokens=False).input_ids if i < table.shape[0]]
        if ids:
            vecs.append(table[ids].mean(0))
    if not vecs:
        raise ValueError(f"none of {items[:3]}... has a token in the text encoder's vocabulary")
    return torch.stack(vecs).mean(0)


class PersonalizedMethod(BaseMethod):
    """A per-identity method: identity lives in trained weights, prompts name it with ``identity_phrase``."""

    regime: ClassVar[Literal["population", "per-identity"]] = "per-identity"
    Config: ClassVar[type[MethodConfig]] = PersonalizedConfig
    artifact_file: ClassVar[str] = "method.safetensors"
    config: PersonalizedConfig

    def __init__(self, config: PersonalizedConfig | None = None) -> None:
        super().__init__(config)
        self._scheduler: Any = None

    # -- hooks of the per-identity loop -------------------------------------------------------------------------

    def identity_phrase(self, class_noun: str = "person") -> str:
        """The words that stand for the identity in a prompt (replaces ``{}`` in templates)."""
        return class_noun

    def prompt(self, template: str, class_noun: str = "person") -> str:
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{}}' where the identity goes")
        return template.replace("{}", self.identity_phrase(class_noun))

    def prepare_identity(self, refs: IdentityRefs, pipe: Any) -> None:
        """Identity-dependent initialisation before training (after ``attach``). Default: nothing."""

    def on_attach(self, pipe: Any) -> None:
        from idforge.methods.objective import training_scheduler

        self._scheduler = training_scheduler(pipe)

    def identity_condition(self, refs: IdentityRefs | None, pipe: Any) -> Condition:
        """Identity is in the trained weights: the condition only marks 'identity on' (zeros = off)."""
        dev = self.device
        return Condition(self.name, {"on": torch.ones(1, 1, device=dev)})

    def sample_condition(self, pipe: Any) -> Condition:
        """The condition ``generate`` needs for the trained identity, without reference photos."""
        return self.identity_condition(None, pipe)

    # -- text ---------------------------------------------------------------------------------------------------

    def encode_batch_text(self, pipe: Any, batch: TrainBatch) -> Any:
        """The text condition of a training batch (from ``input_ids``; cached embeds if the method adds nothing)."""
        from idforge.diffusion.text import TextCondition, encode_ids

        if batch.input_ids is None:
            batch.require("text_embeds")
            return TextCondition(batch.text_embeds, batch.pooled_text_embeds)
        with torch.no_grad():
            return encode_ids(pipe, batch.input_ids, batch.input_ids_2)

    def denoise_fn(self, pipe: Any, text: Any, batch: TrainBatch):
        from idforge.diffusion.text import unet_call

        return lambda x, t: unet_call(pipe, x, t, text, batch.add_time_ids)

    # -- artifacts ----------------------------------------------------------------------------------------------

    def artifact_extra(self) -> dict[str, Any]:
        """JSON-able facts saved beside the weights (e.g. placeholder words)."""
        return {}

    def save_artifact(self, out_dir: str | os.PathLike[str], class_noun: str = "person") -> Path:
        """Write this identity's weights (``artifact_file``) and ``artifact.json`` into ``out_dir``."""
        from idforge.io.atomic import atomic_write_text
        from idforge.methods.checkpoint import save_method

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_method(self, out / self.artifact_file)
        meta = {"method": self.name, "file": self.artifact_file, "class_noun": class_noun,
                "identity_phrase": self.identity_phrase(class_noun), **self.artifact_extra()}
        atomic_write_text(out / ARTIFACT_META, json.dumps(meta, indent=2, sort_keys=True))
        return out


def load_artifact(artifact_dir: str | os.PathLike[str], pipe: Any, **overrides: Any) -> tuple[PersonalizedMethod,
                                                                                                 dict[str, Any]]:
    """Rebuild and attach the method a trained identity left in ``artifact_dir``; returns (method, artifact.json).

    Raises:
        FileNotFoundError: no ``artifact.json`` (not a finished per-identity artifact).
    """
    from idforge.methods.checkpoint import load_method

    root = Path(artifact_dir)
    meta_path = root / ARTIFACT_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root} has no {ARTIFACT_META}: not a per-identity artifact (train it with "
                                "idforge finetune)")
    meta = json.loads(meta_path.read_text())
    register_per_identity_methods()
    method = load_method(root / meta["file"], pipe, **overrides)
    return method, meta  # type: ignore[return-value]


__all__ = [
    "ARTIFACT_META",
    "DEFAULT_TEMPLATES",
    "PersonalizedConfig",
    "PersonalizedMethod",
    "PlaceholderTokens",
    "TrainRecipe",
    "load_artifact",
    "PER_IDENTITY_METHODS",
    "register_per_identity_methods",
    "token_embedding",
]
