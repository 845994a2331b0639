"""Memory and speed options of the training step: the optimiser choice, gradient checkpointing, peak memory."""

from __future__ import annotations

import pytest
import torch

from idforge.errors import ConfigError
from idforge.train.config import TrainConfig
from idforge.train.optim import make_optimizer, peak_memory_gib
from tests.fixtures.dataset import prepare_synthetic


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _steps(optimizer: str, n: int = 3) -> list[torch.Tensor]:
    params = _params()
    opt = make_optimizer(params, TrainConfig(optimizer=optimizer, lr=1e-2, weight_decay=0.01))
    for i in range(n):
        loss = sum((p * (i + 1)).pow(2).sum() for p in params)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach() for p in params]


def test_fused_adamw_makes_the_same_update_as_adamw():
    plain, fused = _steps("adamw"), _steps("adamw_fused")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, fused, strict=True))
    assert not torch.equal(plain[0], _params()[0])  # it did move


def test_8bit_adamw_without_bitsandbytes_fails_naming_the_fix():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"train.optimizer=adamw_8bit needs the bitsandbytes package"):
            make_optimizer(_params(), TrainConfig(optimizer="adamw_8bit"))
    else:  # installed: CPU parameters are still refused, with the reason
        with pytest.raises(ConfigError, match="CUDA only"):
            make_optimizer(_params(), TrainConfig(optimizer="adamw_8bit"))
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def test_peak_memory_is_the_process_peak_on_cpu():
    import resource

    peak = peak_memory_gib(torch.device("cpu"))
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rel=0.01)
    assert peak > 0.05  # a Python process with torch imported


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, tiny_sd15_dir, tiny_clip_dir):
    return prepare_synthetic(tmp_path_factory.mktemp("options-data"), tiny_sd15_dir, tiny_clip_dir, identities=2,
                             images_per_identity=2, size=128)


def test_the_loop_checkpoints_the_frozen_unet_and_logs_peak_memory(prepared_dir, tiny_sd15_dir, tmp_path,
                                                                   monkeypatch):
    from diffusers import UNet2DConditionModel

    from idforge.train.population import train_local

    enabled = []
    original = UNet2DConditionModel.enable_gradient_checkpointing

    def record(self, *args, **kwargs):
        enabled.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "enable_gradient_checkpointing", record)
    losses = {}
    for on in (False, True):
        cfg = TrainConfig(method="infinite-id", steps=1, batch_size=2, report_every=1, checkpoint_every=1,
                          gradient_checkpointing=on, optimizer="adamw_fused")
        result = train_local(cfg, prepared_dir, str(tiny_sd15_dir), output_dir=tmp_path / str(on))
        assert result.metrics["peak_memory_gib"] > 0
        losses[on] = result.metrics["loss"]
        assert enabled == (["UNet2DConditionModel"] if on else [])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)  # recomputation changes no value
