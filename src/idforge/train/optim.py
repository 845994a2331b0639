"""The optimiser a training step uses (``train.optimizer``) and the peak memory it reports per step.

- ``adamw``: ``torch.optim.AdamW`` (its default multi-tensor implementation);
- ``adamw_fused``: the same update as one fused kernel per step (``fused=True``: CUDA, and CPU in recent torch);
- ``adamw_8bit``: bitsandbytes' ``AdamW8bit`` (optimizer state in 8 bits: ~75 % less state memory; CUDA only).

Adam is AdamW with ``weight_decay: 0`` (the decoupled decay term vanishes), so a paper's Adam needs no option.
"""

from __future__ import annotations

from typing import Any

from idforge.errors import ConfigError


def make_optimizer(params: list[Any], cfg: Any) -> Any:
    """The configured optimiser over ``params`` (cfg: a TrainConfig). Raises ConfigError where the backend is
    missing, naming the option and the fix."""
    import torch

    kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    device = params[0].device
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    if cfg.optimizer == "adamw_fused":
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except RuntimeError as exc:
            raise ConfigError(f"train.optimizer=adamw_fused is not available for {device.type} parameters in this "
                              f"torch ({exc}); use train.optimizer=adamw") from None
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer=adamw_8bit needs the bitsandbytes package, which is not installed "
                              "(pip install bitsandbytes, on a CUDA machine); or use train.optimizer=adamw_fused"
                              ) from None
        if device.type != "cuda":
            raise ConfigError(f"train.optimizer=adamw_8bit runs on CUDA only, the parameters are on {device.type}; "
                              "use train.optimizer=adamw or adamw_fused")
        return bnb.optim.AdamW8bit(params, **kw)
    raise ConfigError(f"unknown train.optimizer {cfg.optimizer!r}; choose adamw, adamw_fused or adamw_8bit")


def reset_peak_memory(device: Any) -> None:
    """Start a new peak-memory window (CUDA; the CPU's peak RSS cannot be reset, so it stays the process peak)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: Any) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA allocated bytes, or the process's peak RSS on CPU, in GiB."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


__all__ = ["make_optimizer", "peak_memory_gib", "reset_peak_memory"]
