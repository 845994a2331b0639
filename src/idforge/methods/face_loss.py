"""The face identity loss (IDAdapter): how far the face in a generated image is from the reference identity.

decode predicted x0 -> align the face with the target image's landmarks (the same 5-point similarity transform the
curation uses, as a differentiable torch warp) -> embed with a differentiable ArcFace -> 1 - cosine to the
reference embedding. Gradients flow through the warp and the frozen embedder into the image, and from there into
whatever produced it; no weight of the embedder trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

# (images (B, 3, H, W) in [0, 1], kps (B, 5, 2) pixel coords) -> aligned crops (B, 3, 112, 112) in [0, 1]
Aligner = Callable[[Tensor, Tensor], Tensor]


def arcface_aligner(size: int = 112) -> Aligner:
    """The curation's alignment (``idforge.faces.align``) as a differentiable function of the images."""
    from idforge.faces.align import estimate_similarity, template_for, warp_affine_torch

    template = template_for(size)

    def align(images: Tensor, kps: Tensor) -> Tensor:
        # Landmarks are data (no gradient), so the similarity fit runs in numpy exactly as in curation.
        mats = np.stack([estimate_similarity(k, template) for k in kps.detach().cpu().double().numpy()])
        m = torch.from_numpy(mats).to(device=images.device, dtype=images.dtype)
        return warp_affine_torch(images, m, size)

    return align


class FaceIdentityLoss(nn.Module):
    """``loss(images, kps, ref_embeds) -> (B,)`` with ``1 - cos(embed(align(images, kps)), ref_embeds)``.

    images: (B, 3, H, W) float RGB in [0, 1]; kps: (B, 5, 2) float, ArcFace-order landmarks in pixels of
    ``images``; ref_embeds: (B, D) reference embeddings (normalised here). ``embedder`` maps (B, 3, 112, 112)
    crops in [0, 1] to (B, D) embeddings; None = ``idforge.faces.torch_arcface.load_torch_arcface(model_dir)``,
    loaded on first use. The embedder is frozen and kept out of ``state_dict`` (it is not ours to save).
    """

    def __init__(self, embedder: nn.Module | None = None, aligner: Aligner | None = None,
                 model_dir: str | None = None) -> None:
        super().__init__()
        self._embedder = [embedder]  # in a list: not a registered submodule, so never saved or trained
        self._aligner = aligner
        self._model_dir = model_dir

    @property
    def embedder(self) -> nn.Module:
        if self._embedder[0] is None:
            from idforge.faces.torch_arcface import load_torch_arcface

            self._embedder[0] = load_torch_arcface(self._model_dir)
        module = self._embedder[0]
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    @property
    def aligner(self) -> Aligner:
        if self._aligner is None:
            self._aligner = arcface_aligner(112)
        return self._aligner

    def embed(self, crops: Tensor) -> Tensor:
        """(B, 3, 112, 112) in [0, 1] -> (B, D) L2-normalised (float32)."""
        emb = self.embedder.to(crops.device)
        return F.normalize(emb(crops.float()).float(), dim=-1)

    def forward(self, images: Tensor, kps: Tensor, ref_embeds: Tensor) -> Tensor:
        crops = self.aligner(images.float(), kps.float())
        emb = self.embed(crops)
        ref = F.normalize(ref_embeds.float().to(emb.device), dim=-1)
        if ref.shape[-1] != emb.shape[-1]:
            raise ValueError(f"reference embeddings are {ref.shape[-1]}-d but the face embedder gives "
                             f"{emb.shape[-1]}-d: pass ref_pixels or embeddings from the same model")
        return 1.0 - (emb * ref).sum(-1)


def decode_to_unit(vae: Any, latents: Tensor) -> Tensor:
    """Scaled latents (B, 4, h, w) -> images (B, 3, H, W) in [0, 1], differentiable through the frozen VAE."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    img = vae.decode(x).sample.float()
    return (img / 2 + 0.5).clamp(0, 1)
