"""IDAdapter on the tiny SD1.5- and SDXL-shaped pipelines: gradients, sizes, checkpoints, sampling, off-switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idforge.methods.checkpoint import load_method, save_method
from idforge.methods.registry import get_method
from idforge.methods.testing import (
    grads_with_and_without_checkpointing,
    load_frozen_pipeline,
    perturb_,
    synthetic_batch,
)
from idforge.methods.types import IdentityRefs
from idforge.train.validation import identity_gap

CFG = dict(num_refs=2, clip_dim=32, mff_dim=32, mff_heads=4, num_tokens=4, face_loss_weight=0.0)


@pytest.fixture(scope="module")
def pipes(tiny_sd15_dir, tiny_sdxl_dir):
    return {"sd15": load_frozen_pipeline(tiny_sd15_dir), "sdxl": load_frozen_pipeline(tiny_sdxl_dir)}


@pytest.fixture
def attached(pipes):
    """An attached, perturbed ("trained") IDAdapter on the SD1.5 pipe; detached afterwards."""
    m = get_method("id-adapter", **CFG)
    m.attach(pipes["sd15"])
    perturb_(m, 0.2)
    yield m
    m.detach()


def _refs(seed: int, n: int = 1) -> IdentityRefs:
    g = torch.Generator().manual_seed(seed)
    return IdentityRefs(face_embeds=torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1),
                        clip_patch_tokens=torch.randn(n, 17, 32, generator=g), class_noun="man")


def _expected_params(cfg, pipe) -> int:
    """Parameter count from the config and the UNet/text-encoder sizes (independent of the routing code)."""
    d, m = cfg.mff_dim, cfg.mff_ff_mult
    block = 3 * 2 * d + (4 * d * d + 4 * d) + (2 * m * d * d + m * d + d)
    mff = (cfg.face_dim * d + d) + (cfg.clip_dim * d + d) + cfg.num_tokens * d + cfg.mff_blocks * block + 2 * d \
        + d * d + d
    widths = [mod.to_q.in_features for name, mod in pipe.unet.named_modules() if name.endswith("attn1")]
    adapters = sum(d * c + c + 2 * c + 3 * c * c + c * c + c + 1 for c in widths)
    dims = [e.get_input_embeddings().embedding_dim for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
            if e is not None]
    text = sum((t + d) * t + t + t * t + t for t in dims)
    return mff + adapters + text


def _base_grads(pipe) -> list[str]:
    mods = {n: getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    return [f"{k}.{n}" for k, mod in mods.items() if mod is not None
            for n, p in mod.named_parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_attaches_trains_only_its_own_parameters_and_counts_match(pipes, kind):
    pipe = pipes[kind]
    m = get_method("id-adapter", **CFG)
    m.attach(pipe)
    try:
        assert m.num_trainable_parameters() == _expected_params(m.config, pipe)
        assert set(m.state_dict()) == {k for k in m.modules.state_dict()}
        assert {k.split(".")[0] for k in m.state_dict()} == {"mff", "adapter", "text_inj"}
        perturb_(m, 0.2)  # non-zero gates/injections so every weight is on the gradient path
        out = m.training_loss(synthetic_batch(pipe, 2, num_refs=2), pipe, generator=torch.Generator().manual_seed(0))
        assert set(out) == {"loss", "diffusion", "face"} and torch.isfinite(out["loss"])
        out["loss"].backward()
        missing = [n for n, p in m.modules.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert missing == []
        assert _base_grads(pipe) == []
    finally:
        m.detach()


def test_face_identity_loss_reaches_the_adapter_through_the_real_arcface(pipes):
    pipe = pipes["sd15"]
    m = get_method("id-adapter", **{**CFG, "face_loss_weight": 1.0, "face_loss_t_max": 1000})
    m.attach(pipe)
    try:
        perturb_(m, 0.2)
        batch = synthetic_batch(pipe, 2, num_refs=2)
        out = m.training_loss(batch, pipe, generator=torch.Generator().manual_seed(0))
        assert 0.0 < float(out["face"]) <= 2.0
        torch.testing.assert_close(out["loss"].detach(), out["diffusion"] + out["face"])
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in m.modules.named_parameters()}
        assert _base_grads(pipe) == []
        # The face term alone moves the weights: compare with the diffusion-only gradient.
        for p in m.modules.parameters():
            p.grad = None
        m.config.face_loss_weight = 0.0
        m.training_loss(batch, pipe, generator=torch.Generator().manual_seed(0))["loss"].backward()
        changed = [n for n, p in m.modules.named_parameters() if not torch.allclose(p.grad, grads[n])]
        assert any(n.startswith("adapter.") for n in changed) and any(n.startswith("mff.") for n in changed)
    finally:
        m.detach()


def test_face_loss_window_skips_noisy_timesteps(pipes, attached):
    pipe = pipes["sd15"]
    attached.config.face_loss_weight = 1.0
    batch = synthetic_batch(pipe, 2, num_refs=2)
    from dataclasses import replace

    batch = replace(batch, timesteps=torch.tensor([900, 950]))  # outside [0, 400): no decode, no face term
    out = attached.training_loss(batch, pipe)
    assert float(out["face"]) == 0.0 and torch.equal(out["loss"].detach(), out["diffusion"])


def test_save_load_round_trips_bit_exactly(pipes, attached, tmp_path):
    from idforge.diffusion.text import encode_prompts, unet_call

    pipe = pipes["sd15"]
    path = save_method(attached, tmp_path / "ida.safetensors")
    cond = attached.identity_condition(_refs(1), pipe)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text = attached.encode_prompts(pipe, ["a photo of a man"], cond)
        with attached.conditioning(cond):
            before = unet_call(pipe, x, torch.tensor([500]), text)
    sd = attached.state_dict()
    attached.detach()
    loaded = load_method(path, pipe)
    try:
        assert loaded.config == attached.config
        assert sd.keys() == loaded.state_dict().keys()
        assert all(torch.equal(sd[k], loaded.state_dict()[k]) for k in sd)
        cond2 = loaded.identity_condition(_refs(1), pipe)
        with torch.no_grad():
            text2 = loaded.encode_prompts(pipe, ["a photo of a man"], cond2)
            with loaded.conditioning(cond2):
                assert torch.equal(unet_call(pipe, x, torch.tensor([500]), text2), before)
        assert not torch.equal(text2.hidden, encode_prompts(pipe, ["a photo of a man"]).hidden)
    finally:
        loaded.detach()
        attached.attach(pipe)  # the fixture detaches it


def test_generation_is_deterministic_per_seed_and_depends_on_identity(pipes, attached):
    pipe = pipes["sd15"]
    cond = attached.identity_condition(_refs(1), pipe)
    kw = dict(seeds=[0, 1], num_inference_steps=3)
    a = attached.generate(pipe, ["a photo of a man", "a man on the beach"], cond, **kw)
    b = attached.generate(pipe, ["a photo of a man", "a man on the beach"], cond, **kw)
    assert len(a) == 4 and a[0].size == (64, 64)
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.array(a[0]), np.array(a[1]))  # seed 0 vs seed 1
    # prompt-major order: the single-prompt call reproduces image (prompt 0, seed 1), up to float rounding of
    # the different batch size
    single = attached.generate(pipe, ["a photo of a man"], cond, seeds=[1], num_inference_steps=3)
    assert np.abs(np.array(single[0], dtype=int) - np.array(a[1], dtype=int)).max() <= 1
    other = attached.generate(pipe, ["a photo of a man"], attached.identity_condition(_refs(2), pipe), seeds=[1],
                              num_inference_steps=3)
    assert not np.array_equal(np.array(other[0]), np.array(a[1]))


def test_scale_zero_and_detach_give_the_base_model_exactly(pipes, attached):
    pipe = pipes["sd15"]
    cond = attached.identity_condition(_refs(1), pipe)
    prompt = "a photo of a man"
    shape = (1, 4, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with_id = np.array(attached.generate(pipe, [prompt], cond, seeds=[0], num_inference_steps=3)[0])
    attached.set_scale(0.0)
    off = np.array(attached.generate(pipe, [prompt], cond, seeds=[0], num_inference_steps=3)[0])
    attached.set_scale(1.0)
    attached.detach()
    try:
        stock = np.array(pipe(prompt, num_inference_steps=3, guidance_scale=5.0, latents=noise).images[0])
    finally:
        attached.attach(pipe)
    assert np.array_equal(off, stock)
    assert not np.array_equal(with_id, stock)


def test_sdxl_generation_and_its_off_switch(pipes):
    pipe = pipes["sdxl"]
    m = get_method("id-adapter", **CFG)
    m.attach(pipe)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    try:
        perturb_(m, 0.2)
        cond = m.identity_condition(_refs(3), pipe)
        with_id = m.generate(pipe, ["a photo of a man"], cond, seeds=[0], num_inference_steps=2)
        m.set_scale(0.0)
        off = m.generate(pipe, ["a photo of a man"], cond, seeds=[0], num_inference_steps=2)
    finally:
        m.detach()
    stock = pipe("a photo of a man", num_inference_steps=2, guidance_scale=5.0, latents=noise).images[0]
    assert np.array_equal(np.array(off[0]), np.array(stock))
    assert not np.array_equal(np.array(with_id[0]), np.array(stock))


def test_textual_injection_edits_only_the_class_noun_and_what_follows(pipes, attached):
    from idforge.diffusion.text import encode_prompts, tokenize

    pipe = pipes["sd15"]
    cond = attached.identity_condition(_refs(1), pipe)
    with torch.no_grad():
        plain = encode_prompts(pipe, ["a photo of a man", "a photo of a cat"]).hidden
        injected = attached.encode_prompts(pipe, ["a photo of a man", "a photo of a cat"], cond).hidden
    ids = tokenize(pipe, ["a photo of a man"])[0][0]
    noun = int((ids == pipe.tokenizer("man", add_special_tokens=False).input_ids[0]).nonzero()[0])
    # CLIP's text encoder is causal: tokens before the noun cannot see the change.
    assert torch.equal(injected[0, :noun], plain[0, :noun])
    assert not torch.allclose(injected[0, noun], plain[0, noun])
    assert torch.equal(injected[1], plain[1])  # no class noun, no injection


def test_mff_mixes_references_order_free_and_replicates_one_image(pipes, attached):
    pipe = pipes["sd15"]
    mff = attached.modules["mff"]
    g = torch.Generator().manual_seed(0)
    face, patches = torch.randn(1, 3, 512, generator=g), torch.randn(1, 3, 17, 32, generator=g)
    with torch.no_grad():
        out = mff(face, patches)
        perm = torch.tensor([2, 0, 1])
        torch.testing.assert_close(mff(face[:, perm], patches[:, perm]), out)
        changed = patches.clone()
        changed[:, 2] += 1.0
        assert not torch.allclose(mff(face, changed), out)
    assert out.shape == (1, attached.config.num_tokens, attached.config.mff_dim)
    cond = attached.identity_condition(_refs(5, n=1), pipe)
    face_rep = cond.tensors["face"]
    assert face_rep.shape == (1, attached.config.num_refs, 512) and torch.equal(face_rep[0, 0], face_rep[0, 1])


def test_identity_gap_is_zero_untrained_and_nonzero_when_the_adapter_reads_identity(pipes):
    pipe = pipes["sd15"]
    m = get_method("id-adapter", **CFG)
    m.attach(pipe)
    try:
        batch = synthetic_batch(pipe, 2, num_refs=2)
        untrained = identity_gap(m, pipe, batch, repeats=1)
        assert untrained.gap == 0.0  # zero-initialised gates and injections: identity cannot matter yet
        perturb_(m, 0.2)
        assert abs(identity_gap(m, pipe, batch, repeats=1).gap) > 1e-4
    finally:
        m.detach()


def test_gradients_are_the_same_with_gradient_checkpointing(pipes, attached):
    """Checkpointed UNet blocks re-run the processors during backward: the identity must still be there."""
    pipe = pipes["sd15"]
    batch = synthetic_batch(pipe, 2, num_refs=2)
    plain, checkpointed = grads_with_and_without_checkpointing(attached, pipe, batch)
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


@pytest.mark.slow
def test_identity_flows_after_a_short_training_run(pipes):
    """Trained on a toy population, the held-out loss is lower with the right identity than with another's; the
    untrained adapter shows no gap, and the same adapter with its identity input cut shows none either."""
    from idforge.methods.testing import SyntheticIdentities, fit

    pipe = pipes["sd15"]
    torch.manual_seed(0)
    m = get_method("id-adapter", **CFG)
    m.attach(pipe)
    try:
        task = SyntheticIdentities(pipe, num_refs=2)
        held = task.heldout()
        before = identity_gap(m, pipe, held, repeats=4)
        losses = fit(m, pipe, task, steps=100, lr=3e-3)
        after = identity_gap(m, pipe, held, repeats=4)
        assert np.mean(losses[-10:]) < np.mean(losses[:10])
        assert before.gap == 0.0
        assert after.gap > 0.01 and after.relative_gap > 0.01, after
        vision_tokens = m.vision_tokens
        m.vision_tokens = lambda face, patches: vision_tokens(face * 0, patches * 0)  # ignore the identity
        assert identity_gap(m, pipe, held, repeats=4).gap == 0.0
    finally:
        m.detach()


def test_unit_norm_face_embeddings_reach_the_mixer_at_full_scale():
    """ArcFace embeddings come L2-normalised (entries ~0.044); the mixer rescales them to unit RMS, so at init two
    people's vision tokens differ by a real fraction of their size instead of being swamped by the biases."""
    from idforge.methods.id_adapter import IDAdapterConfig, MixedFacialFeatures
    from idforge.methods.layers import unit_rms

    g = torch.Generator().manual_seed(0)
    faces = torch.nn.functional.normalize(torch.randn(2, 1, 512, generator=g), dim=-1)
    scaled = unit_rms(faces)
    torch.testing.assert_close(scaled.pow(2).mean(-1), torch.ones(2, 1))
    torch.testing.assert_close(torch.nn.functional.normalize(scaled, dim=-1), faces)  # direction kept
    torch.testing.assert_close(unit_rms(faces * 7.0), scaled)  # raw or normalised embeddings: same input

    torch.manual_seed(0)
    mff = MixedFacialFeatures(IDAdapterConfig(**{**CFG, "num_refs": 1}))
    patches = torch.zeros(1, 1, 17, 32).expand(2, -1, -1, -1)
    with torch.no_grad():
        tokens = mff(faces, patches)
    assert (tokens[0] - tokens[1]).norm() / tokens[0].norm() > 0.5  # 1.07 here; 0.17 with the unit-norm input
