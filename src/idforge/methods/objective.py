"""The diffusion objective every method trains with: DDPM noising, timestep draws, the MSE to the scheduler's
target, and the clean latents implied by a prediction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DiffusionOutput", "training_scheduler", "sample_timesteps", "diffusion_loss", "predict_x0"]


@dataclass
class DiffusionOutput:
    """Everything a method may need after one denoising prediction (all (B, ...) tensors)."""

    loss: Tensor  # scalar, mean squared error to the target
    model_pred: Tensor
    target: Tensor
    noisy_latents: Tensor
    noise: Tensor
    timesteps: Tensor


def training_scheduler(pipe: Any):
    """A DDPM scheduler with the pipeline scheduler's training config (betas, T, prediction_type).

    Inference schedulers (DPM-Solver, Euler) share ``add_noise`` semantics only loosely; training always uses the
    DDPM forward process the base model was trained with.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def sample_timesteps(scheduler: Any, batch_size: int, device: Any = "cpu", generator: torch.Generator | None = None,
                     t_min: int = 0, t_max: int | None = None) -> Tensor:
    """(B,) long timesteps uniform in [t_min, t_max) (t_max defaults to the scheduler's T)."""
    t_max = int(scheduler.config.num_train_timesteps) if t_max is None else t_max
    if not 0 <= t_min < t_max:
        raise ValueError(f"timestep window [{t_min}, {t_max}) is empty")
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(t_min, t_max, (batch_size,), generator=generator, device=gen_device)
    return t.to(device)


def diffusion_loss(
    denoise: Callable[[Tensor, Tensor], Tensor],
    latents: Tensor,
    scheduler: Any,
    *,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
    t_min: int = 0,
    t_max: int | None = None,
    mask: Tensor | None = None,
) -> DiffusionOutput:
    """Noise ``latents``, predict with ``denoise(noisy_latents, timesteps)``, MSE to the scheduler's target.

    The target follows ``scheduler.config.prediction_type``: ``epsilon`` -> the noise, ``v_prediction`` -> the
    velocity, ``sample`` -> the clean latents. ``mask`` (B, 1, h, w) weights the per-pixel error (mean over the
    weighted area). The loss is computed in float32 whatever the autocast dtype.
    """
    if noise is None:
        gen_device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype)
        noise = noise.to(latents.device)
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, latents.shape[0], latents.device, generator, t_min, t_max)
    timesteps = timesteps.to(latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise ValueError(f"unsupported scheduler prediction_type {kind!r}")
    pred = denoise(noisy, timesteps)
    err = (pred.float() - target.float()) ** 2
    if mask is not None:
        w = mask.float().expand_as(err)
        loss = (err * w).sum() / w.sum().clamp_min(1e-8)
    else:
        loss = err.mean()
    return DiffusionOutput(loss, pred, target, noisy, noise, timesteps)


def predict_x0(scheduler: Any, noisy_latents: Tensor, model_pred: Tensor, timesteps: Tensor) -> Tensor:
    """The clean latents implied by one prediction (differentiable): x0 = (x_t - sqrt(1-a) eps) / sqrt(a)."""
    acp = scheduler.alphas_cumprod.to(device=noisy_latents.device, dtype=torch.float32)[timesteps.long()]
    a = acp.view(-1, *([1] * (noisy_latents.ndim - 1)))
    x_t, pred = noisy_latents.float(), model_pred.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * pred
    if kind == "sample":
        return pred
    raise ValueError(f"unsupported scheduler prediction_type {kind!r}")
