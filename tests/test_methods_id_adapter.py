"""IDAdapter on the tiny SD1.5- and SDXL-shaped pipelines: sizes, the face identity loss, textual injection, the
MFF mixer, identity flow. The contract every method keeps is in test_methods_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idforge.methods.registry import get_method
from idforge.methods.testing import (
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


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_parameter_count_and_checkpoint_prefixes_follow_the_config(pipes, kind):
    pipe = pipes[kind]
    m = get_method("id-adapter", **CFG)
    m.attach(pipe)
    try:
        assert m.num_trainable_parameters() == _expected_params(m.config, pipe)
        assert set(m.state_dict()) == {k for k in m.modules.state_dict()}
        assert {k.split(".")[0] for k in m.state_dict()} == {"mff", "adapter", "text_inj"}
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
