"""Test helpers for methods (never imported by production code): frozen tiny pipelines, synthetic batches, a toy
population whose identity is learnable, and a minimal fit loop. The identity-flow measurement they are checked
with is the library's own, ``idforge.train.validation.identity_gap``."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from idforge.methods.base import BaseMethod
from idforge.methods.types import TrainBatch


def load_frozen_pipeline(path: str | os.PathLike[str], device: str = "cpu") -> Any:
    """A diffusers pipeline from a local dir (SD or SDXL by model_index.json), every base weight frozen."""
    from idforge.diffusion.loading import freeze_pipeline, load_pipeline

    pipe = load_pipeline(path, device=device)
    pipe.set_progress_bar_config(disable=True)
    return freeze_pipeline(pipe)


def synthetic_batch(pipe: Any, batch_size: int = 2, num_refs: int = 1, face_dim: int = 512, clip_dim: int = 32,
                    clip_tokens: int = 17, prompts: list[str] | None = None, seed: int = 0) -> TrainBatch:
    """A TrainBatch of random tensors shaped for ``pipe`` (latents at the UNet's native size, real token ids).

    face_embeds are L2-normalised; target_kps place a plausible face in the middle of the decoded image.
    """
    from idforge.diffusion.text import tokenize

    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    px = size * getattr(pipe, "vae_scale_factor", 8)
    prompts = prompts or [("a photo of a man", "a woman on the beach")[i % 2] for i in range(batch_size)]
    ids, ids_2 = tokenize(pipe, prompts)
    face = torch.nn.functional.normalize(torch.randn(batch_size, num_refs, face_dim, generator=g), dim=-1)
    # ArcFace-template landmarks scaled into the middle of the image.
    template = torch.tensor([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]])
    kps = (template / 112.0 * px * 0.8 + px * 0.1).expand(batch_size, 5, 2).clone()
    return TrainBatch(
        latents=torch.randn(batch_size, unet.config.in_channels, size, size, generator=g),
        input_ids=ids,
        input_ids_2=ids_2,
        face_embeds=face,
        clip_image_embeds=torch.randn(batch_size, num_refs, clip_dim, generator=g),
        clip_patch_tokens=torch.randn(batch_size, num_refs, clip_tokens, clip_dim, generator=g),
        target_kps=kps,
        identity=torch.arange(batch_size),
    )


def grads_with_and_without_checkpointing(method: BaseMethod, pipe: Any, batch: TrainBatch,
                                         seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Gradients of ``method``'s parameters for one loss on ``batch``, without and then with the UNet's gradient
    checkpointing (which re-runs the attention processors during backward, so identity state must survive)."""
    grads = []
    try:
        for checkpointing in (False, True):
            for p in method.trainable_parameters():
                p.grad = None
            if checkpointing:
                pipe.unet.enable_gradient_checkpointing()
                pipe.unet.train()
            method.training_loss(batch, pipe, generator=torch.Generator().manual_seed(seed))["loss"].backward()
            grads.append([p.grad.clone() for p in method.trainable_parameters()])
    finally:
        pipe.unet.disable_gradient_checkpointing()
        pipe.unet.eval()
    return grads[0], grads[1]


def perturb_(method: BaseMethod, std: float = 0.05, seed: int = 0) -> None:
    """Add Gaussian noise to every trainable weight (stands in for training in tests: zero-initialised gates and
    injections become non-zero, so the method visibly changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * std)


class SyntheticIdentities:
    """A toy population where identity is learnable: each identity has its own face embedding, CLIP tokens and a
    per-channel latent offset (its "look"); a sample is that offset plus small noise, and its references are
    noisy copies of the identity's features. A method that reads identity can predict the offset and denoise
    better with the right references; one that ignores them cannot (identity gap exactly 0).
    """

    def __init__(self, pipe: Any, num_identities: int = 2, num_refs: int = 1, face_dim: int = 512,
                 clip_dim: int = 32, clip_tokens: int = 17, seed: int = 0) -> None:
        from idforge.diffusion.text import tokenize

        g = torch.Generator().manual_seed(seed)
        size = pipe.unet.config.sample_size
        self.size = size if isinstance(size, int) else size[0]
        self.channels = pipe.unet.config.in_channels
        self.num_identities, self.num_refs = num_identities, num_refs
        offsets = torch.randn(num_identities, self.channels, 1, 1, generator=g)
        self.offsets = offsets - offsets.mean(0, keepdim=True)  # the population mean carries no identity
        self.faces = torch.nn.functional.normalize(torch.randn(num_identities, face_dim, generator=g), dim=-1)
        self.patches = torch.randn(num_identities, clip_tokens, clip_dim, generator=g)
        self.ids, self.ids_2 = tokenize(pipe, ["a photo of a person"])

    def batch(self, identities: Tensor, generator: torch.Generator) -> TrainBatch:
        """Samples of the given (B,) identity indices, with fresh sample noise from ``generator``."""
        b, n = identities.shape[0], self.num_refs
        shape = (b, self.channels, self.size, self.size)
        face = self.faces[identities][:, None] + 0.02 * torch.randn(b, n, self.faces.shape[-1], generator=generator)
        patches = self.patches[identities][:, None] + 0.05 * torch.randn(b, n, *self.patches.shape[1:],
                                                                         generator=generator)
        return TrainBatch(
            latents=self.offsets[identities].expand(shape) + 0.05 * torch.randn(shape, generator=generator),
            input_ids=self.ids.expand(b, -1),
            input_ids_2=None if self.ids_2 is None else self.ids_2.expand(b, -1),
            face_embeds=torch.nn.functional.normalize(face, dim=-1),
            clip_patch_tokens=patches,
            identity=identities,
        )

    def heldout(self, seed: int = 12345) -> TrainBatch:
        """One fresh sample of every identity (identity i's mismatch in ``identity_gap`` is identity i-1)."""
        return self.batch(torch.arange(self.num_identities), torch.Generator().manual_seed(seed))


def fit(method: BaseMethod, pipe: Any, task: SyntheticIdentities, steps: int = 100, lr: float = 3e-3,
        batch_size: int = 8, seed: int = 0) -> list[float]:
    """A minimal AdamW loop over ``task`` (what the Ray loop does, without Ray); returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=lr)
    method.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, task.num_identities, (batch_size,), generator=g)
        out = method.training_loss(task.batch(idx, g).to(method.device), pipe, generator=g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    return losses


def write_random_e4e_checkpoint(path: str | os.PathLike[str], seed: int = 0, scale: float = 1.0, width: int = 64
                                ) -> dict[str, Tensor]:
    """Write a random-weight checkpoint in the released ``e4e_ffhq_encode.pt`` layout; returns its kept part.

    ``{'state_dict': {encoder.* with e4e's exact key names and shapes, a few decoder.* entries}, 'latent_avg':
    [18, 512], 'opts': {...}}``. ``width`` < 64 writes a narrower test encoder (same keys, channels scaled; a
    16-wide one is a cheap stand-in for tests). Memory-light: every float tensor is an overlapping strided view
    into one small random pool per fan-in (weights ~ N(0, 1/fan_in) * ``scale``, BN statistics near identity),
    so the 267 M entries cost a few MB on disk and in memory; ``torch.save`` writes each pool once.
    """
    import math

    from idforge.methods.e4e import N_STYLES, STYLE_DIM, Encoder4Editing

    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = dict(Encoder4Editing(width).state_dict())
    pools: dict[tuple[str, int], Tensor] = {}
    pool_size = 1 << 15

    def pool(kind: str, fan_in: int) -> Tensor:
        if (kind, fan_in) not in pools:
            raw = torch.randn(pool_size + 8192 * 9, generator=g)
            if kind == "weight":
                pools[kind, fan_in] = raw * (scale / math.sqrt(fan_in))
            else:
                pools[kind, fan_in] = {"bn_weight": 1 + 0.1 * raw, "bn_var": 1 + 0.1 * raw.abs(),
                                       "small": 0.05 * raw}[kind]
        return pools[kind, fan_in]

    def view(name: str, meta: Tensor) -> Tensor:
        shape = tuple(meta.shape)
        if meta.dtype == torch.long:  # BN num_batches_tracked
            return torch.tensor(1000, dtype=torch.long)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_var":
            src = pool("bn_var", 0)
        elif leaf in {"running_mean", "bias"}:
            src = pool("small", 0)
        elif len(shape) == 1:  # BN / PReLU weights
            src = pool("bn_weight", 0)
        else:
            src = pool("weight", int(math.prod(shape[1:])))
        inner = int(math.prod(shape[1:])) if len(shape) > 1 else 1
        strides = [7 if len(shape) > 1 else 1] + [int(math.prod(shape[i + 1:])) for i in range(1, len(shape))]
        offset = int(torch.randint(0, pool_size, (1,), generator=g))
        need = offset + (shape[0] - 1) * strides[0] + inner
        assert need <= src.numel(), (name, need)
        return src.as_strided(shape, strides, offset)

    encoder = {f"encoder.{k}": view(k, v) for k, v in shapes.items()}
    latent_avg = torch.randn(STYLE_DIM, generator=g).expand(N_STYLES, STYLE_DIM)
    decoder = {"decoder.style.1.weight": torch.zeros(8, 8), "decoder.input.input": torch.zeros(1, 8, 4, 4)}
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": 1024, "start_from_latent_avg": True,
            "checkpoint_path": None, "lr": 0.0001}
    torch.save({"state_dict": {**encoder, **decoder}, "latent_avg": latent_avg, "opts": opts}, str(path))
    return {**encoder, "latent_avg": latent_avg}
