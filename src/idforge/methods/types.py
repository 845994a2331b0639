"""The data a method receives and hands back: reference features, training batches, conditions, injection state.

Plain dataclasses of tensors, batch (or reference) dimension first; they import nothing of the methods, so the
sampler, the loops and the data pipeline can all use them without importing ``BaseMethod``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["IdentityRefs", "TrainBatch", "Condition", "InjectionState"]


def _to(t: Tensor | None, device: Any = None, dtype: torch.dtype | None = None) -> Tensor | None:
    if t is None:
        return None
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


@dataclass
class IdentityRefs:
    """Reference photos of ONE identity, already turned into features (by ``idforge.faces`` and CLIP).

    Every field has the reference index first (N references). Methods use what they need and raise
    ``ValueError`` naming the missing field otherwise.

    face_embeds:       (N, Dface) float32, L2-normalised identity embeddings (ArcFace 512-d by default).
    clip_image_embeds: (N, Dclip) float32, CLIP image embeddings (projected pooled output, ``image_embeds``).
    clip_patch_tokens: (N, P, Dvis) float32, CLIP vision hidden states of the penultimate layer, class token
                       first (P = 1 + (image_size / patch_size)^2, Dvis = vision hidden size).
    face_crops:        (N, 3, 112, 112) float32 in [0, 1], ArcFace-aligned RGB crops.
    wplus_pixels:      (N, 3, 256, 256) float32 in [-1, 1], the FFHQ-aligned crop with its background filled
                       white (the W+ encoders' input: e4e for PIDiff; ``idforge.methods.e4e.e4e_input``).
    class_noun:        the word of the prompt that stands for the person ("man", "woman", "person", ...).
    """

    face_embeds: Tensor | None = None
    clip_image_embeds: Tensor | None = None
    clip_patch_tokens: Tensor | None = None
    face_crops: Tensor | None = None
    wplus_pixels: Tensor | None = None
    class_noun: str = "person"

    def __post_init__(self) -> None:
        counts = {f.name: getattr(self, f.name).shape[0] for f in fields(self)
                  if isinstance(getattr(self, f.name), Tensor)}
        if not counts:
            raise ValueError("IdentityRefs needs at least one feature tensor (face_embeds, clip_image_embeds, ...)")
        if len(set(counts.values())) != 1:
            raise ValueError(f"IdentityRefs fields disagree on the number of references: {counts}")

    @property
    def num_refs(self) -> int:
        return next(getattr(self, f.name).shape[0] for f in fields(self) if isinstance(getattr(self, f.name), Tensor))

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> IdentityRefs:
        return replace(self, **{f.name: _to(getattr(self, f.name), device, dtype) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"IdentityRefs is missing {', '.join(missing)}: compute them from the reference photos "
                             "(face embeddings with idforge.faces, CLIP features with the method's CLIP model)")


@dataclass
class TrainBatch:
    """One training batch as the loop feeds it (every tensor has the batch dimension B first).

    latents:           (B, 4, h, w) float, VAE latents of the target images ALREADY multiplied by
                       ``vae.config.scaling_factor``.
    input_ids:         (B, L) long, prompt token ids of the (first) tokenizer. Needed by methods that change the
                       text encoder's input (IDAdapter's textual injection); otherwise ``text_embeds`` suffices.
    input_ids_2:       (B, L) long, SDXL's second tokenizer.
    text_embeds:       (B, L, Dtext) float, cached ``encoder_hidden_states`` (SDXL: both encoders' penultimate
                       states concatenated, as the SDXL pipeline builds them).
    pooled_text_embeds:(B, Dpool) float, SDXL only: text_encoder_2's projected pooled output.
    add_time_ids:      (B, 6) float, SDXL only (original size, crop top-left, target size); default from latents.
    face_embeds:       (B, N, Dface) float32 L2-normalised identity embeddings of the N reference images.
    clip_image_embeds: (B, N, Dclip) float, projected pooled CLIP image embeddings of the references.
    clip_patch_tokens: (B, N, P, Dvis) float, CLIP vision penultimate hidden states of the references.
    face_mask:         (B, 1, h, w) float in [0, 1], face region at latent resolution (1 = face).
    ref_pixels:        (B, 3, 112, 112) float in [0, 1], an ArcFace-aligned reference crop (face identity loss
                       embeds it with the torch ArcFace when ``face_embeds`` are not ArcFace-512).
    wplus_pixels:      (B, 3, 256, 256) float in [-1, 1], a background-removed FFHQ-aligned reference (as
                       ``IdentityRefs.wplus_pixels``), for W+ encoders.
    target_kps:        (B, 5, 2) float, the 5 ArcFace landmarks of the TARGET image in pixel coordinates of the
                       image the latents encode (h*8 x w*8); the face identity loss aligns with them.
    identity:          (B,) long, identity index (for logging / mismatch tests).
    noise, timesteps:  optional fixed (B, 4, h, w) noise and (B,) long timesteps, for reproducible held-out losses.
    """

    latents: Tensor
    input_ids: Tensor | None = None
    input_ids_2: Tensor | None = None
    text_embeds: Tensor | None = None
    pooled_text_embeds: Tensor | None = None
    add_time_ids: Tensor | None = None
    face_embeds: Tensor | None = None
    clip_image_embeds: Tensor | None = None
    clip_patch_tokens: Tensor | None = None
    face_mask: Tensor | None = None
    ref_pixels: Tensor | None = None
    wplus_pixels: Tensor | None = None
    target_kps: Tensor | None = None
    identity: Tensor | None = None
    noise: Tensor | None = None
    timesteps: Tensor | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainBatch:
        """Build from a collated dict, ignoring keys that are not fields (e.g. string metadata)."""
        names = {f.name for f in fields(cls)}
        if "latents" not in data:
            raise ValueError("a training batch needs 'latents' (B, 4, h, w)")
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    def rows(self, start: int, stop: int) -> TrainBatch:
        """Samples ``start:stop`` of every batched tensor (for evaluating a large batch in pieces)."""
        return replace(self, **{f.name: None if (v := getattr(self, f.name)) is None else v[start:stop]
                                for f in fields(self)})

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> TrainBatch:
        """Move every tensor; floating tensors also take ``dtype`` when given (ids stay long)."""
        return replace(self, **{f.name: _to(getattr(self, f.name), device, dtype) for f in fields(self)})

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"training batch is missing {', '.join(missing)} (the prepare stage must provide them "
                             "for this method)")

    def with_identity_of(self, other: TrainBatch) -> TrainBatch:
        """This batch's images and text with ``other``'s identity features (for mismatched-identity checks)."""
        ident = ("face_embeds", "clip_image_embeds", "clip_patch_tokens", "ref_pixels", "wplus_pixels", "identity")
        return replace(self, **{n: getattr(other, n) for n in ident})


@dataclass
class Condition:
    """What ``identity_condition`` returns and ``generate`` consumes: named tensors, batch dimension first.

    ``tensors`` hold the identity tokens a method's processors read (e.g. ``{"tokens": (1, T, D)}``); ``meta`` holds
    small non-tensor facts (class noun, number of references). ``zeros_like`` is the unconditional branch of
    classifier-free guidance (IP-Adapter FaceID style: zeros of the identity input, run through the same modules).
    """

    method: str
    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Condition:
        return Condition(self.method, {k: _to(v, device, dtype) for k, v in self.tensors.items()}, dict(self.meta))

    def zeros_like(self) -> Condition:
        return Condition(self.method, {k: torch.zeros_like(v) for k, v in self.tensors.items()}, dict(self.meta))

    def expand(self, n: int) -> Condition:
        """Repeat a single-identity condition (batch 1) to batch ``n``."""
        if self.batch_size == n:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a condition of batch {self.batch_size} to {n}")
        return Condition(self.method, {k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()}, dict(self.meta))

    @staticmethod
    def cat(conds: Sequence[Condition]) -> Condition:
        keys = conds[0].tensors.keys()
        return Condition(conds[0].method, {k: torch.cat([c.tensors[k] for c in conds]) for k in keys},
                         dict(conds[0].meta))


@dataclass
class InjectionState:
    """Mutable run-time state shared by a method and the attention processors it installed.

    The processors hold a reference to this object (not copies), so ``set_scale`` and the current identity
    tokens reach every layer at once without re-installing processors.
    """

    scale: float = 1.0
    context: dict[str, Tensor] = field(default_factory=dict)  # identity tokens for the current UNet call
    mode: str = "train"  # "train" | "infer": methods whose attention differs between the two read it
    flags: dict[str, Any] = field(default_factory=dict)
