"""CFG with a trained unconditional branch: the dropout stream and the sampler's matching unconditional branch."""

from __future__ import annotations

import pytest
import torch

from idforge.methods.guidance import GuidanceDropoutConfig, draw_drops
from idforge.methods.registry import get_method
from idforge.methods.testing import load_frozen_pipeline, perturb_, synthetic_batch
from idforge.methods.types import IdentityRefs

SIZES = {
    "id-adapter": dict(num_refs=2, clip_dim=32, mff_dim=32, mff_heads=4, face_loss_weight=0.0),
    "infinite-id": dict(clip_dim=32),
}


@pytest.fixture(scope="module")
def pipes(tiny_sd15_dir, tiny_sdxl_dir):
    return {"sd15": load_frozen_pipeline(tiny_sd15_dir), "sdxl": load_frozen_pipeline(tiny_sdxl_dir)}


def test_the_training_stream_drops_at_the_configured_rates_reproducibly():
    cfg = GuidanceDropoutConfig(drop_identity=0.05, drop_text=0.10, drop_both=0.15)
    n = 40_000
    d = draw_drops(cfg, n, torch.Generator().manual_seed(7))
    only_id = (d.identity & ~d.text).float().mean()
    only_text = (d.text & ~d.identity).float().mean()
    both = (d.identity & d.text).float().mean()
    for got, want in ((only_id, 0.05), (only_text, 0.10), (both, 0.15)):
        assert abs(float(got) - want) < 0.006, (got, want)  # ~4 standard errors at n = 40k
    again = draw_drops(cfg, n, torch.Generator().manual_seed(7))
    assert torch.equal(again.identity, d.identity) and torch.equal(again.text, d.text)
    other = draw_drops(cfg, n, torch.Generator().manual_seed(8))
    assert not torch.equal(other.identity, d.identity)
    off = draw_drops(GuidanceDropoutConfig(drop_identity=0, drop_text=0, drop_both=0), 100,
                     torch.Generator().manual_seed(7))
    assert not bool(off.identity.any() or off.text.any())
    with pytest.raises(ValueError, match="exceeds 1"):
        GuidanceDropoutConfig(drop_identity=0.5, drop_text=0.4, drop_both=0.2)


@pytest.mark.parametrize("name", ["id-adapter", "infinite-id"])
def test_training_reports_its_drops_and_evaluation_drops_nothing(pipes, name):
    pipe = pipes["sd15"]
    m = get_method(name, **SIZES[name], drop_identity=0.3, drop_text=0.3, drop_both=0.3)
    m.attach(pipe)
    try:
        batch = synthetic_batch(pipe, 8, num_refs=2 if name == "id-adapter" else 1)
        out = m.training_loss(batch, pipe, generator=torch.Generator().manual_seed(0))
        d = draw_drops(m.config, 8, torch.Generator().manual_seed(0))  # the loss draws them first
        assert float(out["drop_identity"]) == float(d.identity.float().mean()) > 0
        assert float(out["drop_text"]) == float(d.text.float().mean()) > 0
        m.modules.eval()
        out = m.training_loss(batch, pipe, generator=torch.Generator().manual_seed(0))
        assert float(out["drop_identity"]) == float(out["drop_text"]) == 0.0
    finally:
        m.modules.train()
        m.detach()


@pytest.mark.parametrize("name", ["id-adapter", "infinite-id"])
def test_a_fully_dropped_identity_makes_the_loss_identity_blind(pipes, name):
    pipe = pipes["sd15"]
    m = get_method(name, **SIZES[name], drop_identity=1.0, drop_text=0.0, drop_both=0.0)
    m.attach(pipe)
    try:
        perturb_(m, 0.2)
        refs = 2 if name == "id-adapter" else 1
        a, b = synthetic_batch(pipe, 2, num_refs=refs, seed=0), synthetic_batch(pipe, 2, num_refs=refs, seed=1)
        losses = [float(m.training_loss(x, pipe, generator=torch.Generator().manual_seed(3))["diffusion"])
                  for x in (a, a.with_identity_of(b))]
        assert losses[0] == losses[1]
        m.config.drop_identity = 0.0
        kept = [float(m.training_loss(x, pipe, generator=torch.Generator().manual_seed(3))["diffusion"])
                for x in (a, a.with_identity_of(b))]
        assert kept[0] != kept[1]  # the same weights read identity when it is not dropped
    finally:
        m.detach()


def _record_unet_calls(pipe, method):
    calls = []

    def hook(_module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        calls.append({"hidden": kwargs["encoder_hidden_states"].detach().clone(),
                      "pooled": None if "text_embeds" not in added else added["text_embeds"].detach().clone(),
                      "context": {k: v.detach().clone() for k, v in method.state.context.items()}})

    return calls, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", ["id-adapter", "infinite-id"])
def test_the_sampler_unconditional_branch_is_the_training_dropped_condition_bit_for_bit(pipes, name, kind):
    """Training with both conditions dropped feeds the UNet exactly what the sampler's unconditional rows get:
    the same text states (SDXL: pooled too) and the same identity tensors."""
    pipe = pipes[kind]
    m = get_method(name, **SIZES[name], drop_identity=0.0, drop_text=0.0, drop_both=1.0)
    m.attach(pipe)
    refs = 2 if name == "id-adapter" else 1
    g = torch.Generator().manual_seed(5)
    # three reference photos at inference, whatever the training count (the unconditional branch is one null input)
    id_refs = IdentityRefs(face_embeds=torch.nn.functional.normalize(torch.randn(3, 512, generator=g), dim=-1),
                           clip_patch_tokens=torch.randn(3, 17, 32, generator=g), class_noun="man")
    calls, handle = _record_unet_calls(pipe, m)
    try:
        perturb_(m, 0.2)
        m.training_loss(synthetic_batch(pipe, 2, num_refs=refs), pipe, generator=torch.Generator().manual_seed(0))
        train = calls[-1]
        calls.clear()
        m.generate(pipe, ["a photo of a man"], m.identity_condition(id_refs, pipe), seeds=[0],
                   num_inference_steps=1, guidance_scale=5.0)
        infer = calls[0]  # rows [uncond, cond] (Infinite-ID: then the text-only stream's)
    finally:
        handle.remove()
        m.detach()
    assert torch.equal(train["hidden"][0], infer["hidden"][0])
    assert torch.equal(train["hidden"][1], infer["hidden"][0])
    if kind == "sdxl":
        assert torch.equal(train["pooled"][0], infer["pooled"][0])
    keys = {"id-adapter": ["tokens", "class_token"], "infinite-id": ["c_id"]}[name]
    for k in keys:
        assert torch.equal(train["context"][k][0], infer["context"][k][0]), k
        assert not torch.equal(infer["context"][k][0], infer["context"][k][1])  # the conditional row differs
