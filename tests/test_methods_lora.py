"""DreamBooth-LoRA: only LoRA A/B train and the loss falls; ``pipe.load_lora_weights`` reads the export. The contract
every method keeps is in test_methods_contract.py."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.dataset import fixed_batch, state_copy, train_steps


@pytest.fixture
def pipe(tiny_sd15_dir, one_torch_thread):
    """A fresh pipeline per test: LoRA layers stay in the UNet after detach (disabled)."""
    from idforge.diffusion.loading import load_pipeline

    return load_pipeline(tiny_sd15_dir)


def _method(**cfg):
    from idforge.methods.dreambooth_lora import DreamBoothLoRA

    return DreamBoothLoRA.from_config(cfg)


def _unet_out(pipe, text_hidden):
    from idforge.diffusion.text import TextCondition, unet_call

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return unet_call(pipe, x, torch.tensor([500]), TextCondition(text_hidden))


def test_only_lora_trains_and_loss_falls(pipe):
    m = _method(rank=2)
    m.attach(pipe)
    names = [n for n, _ in m.modules.named_parameters()]
    assert names and all(n.endswith(("A.weight", "B.weight")) for n in names)
    init = state_copy(m)
    first, last = train_steps(m, pipe, fixed_batch(pipe, m), steps=15, lr=5e-3)
    assert last < first
    after = m.state_dict()
    assert all(not torch.equal(init[k], after[k]) for k in init if k.endswith("B.weight"))  # B starts at 0
    m.detach()


def test_diffusers_loader_reads_the_export(pipe, tiny_sd15_dir, tmp_path):
    import json

    from idforge.diffusion.loading import load_pipeline
    from idforge.diffusion.text import encode_prompts

    text = encode_prompts(pipe, ["a photo of sks person"]).hidden
    base = _unet_out(pipe, text)
    m = _method(rank=2)
    m.attach(pipe)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    tuned = _unet_out(pipe, text)
    assert not torch.allclose(tuned, base)
    m.save_artifact(tmp_path / "a")
    m.detach()
    assert json.loads((tmp_path / "a" / "artifact.json").read_text())["identity_phrase"] == "sks person"

    fresh = load_pipeline(tiny_sd15_dir)
    fresh.load_lora_weights(str(tmp_path / "a"))  # diffusers' own loader, default weight name
    torch.testing.assert_close(_unet_out(fresh, text), tuned, rtol=1e-5, atol=1e-5)
