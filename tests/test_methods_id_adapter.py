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
from tests.fixtures.method_sizes import id_adapter_params

CFG = dict(num_refs=2, clip_dim=32, mff_dim=32, mff_heads=4, face_loss_weight=0.0)


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


def _base_grads(pipe) -> list[str]:
    mods = {n: getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    return [f"{k}.{n}" for k, mod in mods.items() if mod is not None
            for n, p in mod.named_parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_parameter_count_and_checkpoint_prefixes_follow_the_config(pipes, kind):
    pipe = pipes[kind]
    m = get_method("id-adapter", **CFG)
    m.attach(pipe)
    try:
        assert m.num_trainable_parameters() == id_adapter_params(m.config, pipe)
        assert set(m.state_dict()) == {k for k in m.modules.state_dict()}
        assert {k.split(".")[0] for k in m.state_dict()} == {"mff", "adapter", "text_inj", "text_kv"}
        out = m.training_loss(synthetic_batch(pipe, 2, num_refs=2), pipe, generator=torch.Generator().manual_seed(0))
        assert set(out) == {"loss", "diffusion", "face", "drop_identity", "drop_text"}
    finally:
        m.detach()


def test_face_identity_loss_reaches_the_adapter_through_the_real_arcface(pipes):
    pipe = pipes["sd15"]
    m = get_method("id-adapter", **{**CFG, "face_loss_weight": 1.0, "face_loss_gate": "window",
                                    "face_loss_t_max": 1000, "drop_identity": 0.0, "drop_both": 0.0})
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
    attached.config.face_loss_gate = "window"
    batch = synthetic_batch(pipe, 2, num_refs=2)
    from dataclasses import replace

    batch = replace(batch, timesteps=torch.tensor([900, 950]))  # outside [0, 400): no decode, no face term
    out = attached.training_loss(batch, pipe)
    assert float(out["face"]) == 0.0 and torch.equal(out["loss"].detach(), out["diffusion"])


def test_textual_injection_appends_class_noun_is_sks_and_replaces_only_the_placeholder(pipes, attached):
    from idforge.diffusion.text import encode_prompts, tokenize

    pipe = pipes["sd15"]
    cond = attached.identity_condition(_refs(1), pipe)
    with torch.no_grad():
        suffixed = encode_prompts(pipe, ["a photo of a man man is sks"]).hidden
        injected = attached.encode_prompts(pipe, ["a photo of a man"], cond).hidden
    ids = tokenize(pipe, ["a photo of a man man is sks"])[0]
    # the method's own insertion gives the ids of the spelled-out suffix
    assert torch.equal(attached.with_placeholder(tokenize(pipe, ["a photo of a man"])[0], 0, ["man"]), ids)
    sks = int((ids[0] == pipe.tokenizer("sks", add_special_tokens=False).input_ids[0]).nonzero()[0])
    # CLIP's text encoder is causal: tokens before the placeholder cannot see the change; the placeholder does.
    assert torch.equal(injected[0, :sks], suffixed[0, :sks])
    assert not torch.allclose(injected[0, sks], suffixed[0, sks])
    other = attached.encode_prompts(pipe, ["a photo of a man"], attached.identity_condition(_refs(2), pipe)).hidden
    assert not torch.allclose(other[0, sks], injected[0, sks])  # E_c follows the identity's class tokens


def test_captions_without_a_known_class_noun_fail_clearly(pipes, attached):
    from idforge.diffusion.text import tokenize

    pipe = pipes["sd15"]
    ids = tokenize(pipe, ["a photo of a man", "a photo of a cat"])[0]
    with pytest.raises(ValueError, match="caption 1 of the batch has no class noun"):
        attached.with_placeholder(ids, 0)
    with pytest.raises(ValueError, match="class noun 'dog' is not in id-adapter's class_nouns"):
        attached.encode_prompts(pipe, ["a photo of a dog"], attached.identity_condition(
            IdentityRefs(face_embeds=_refs(1).face_embeds, clip_patch_tokens=_refs(1).clip_patch_tokens,
                         class_noun="dog"), pipe))
    # a caption too long for the suffix keeps it (and the end token) at the cost of the caption's tail
    long = tokenize(pipe, ["a photo of a man " + "on the beach " * 40])[0]
    out = attached.with_placeholder(long, 0)
    eos = pipe.tokenizer.eos_token_id
    sks = pipe.tokenizer("sks", add_special_tokens=False).input_ids[0]
    assert out.shape == long.shape and int(out[0, -1]) == eos and int(out[0, -2]) == sks


def test_face_loss_is_gated_by_a_face_detected_in_predicted_x0(pipes, attached):
    """The paper's F(x0): the face term counts only the samples whose decoded x0 has a face."""
    pipe = pipes["sd15"]
    attached.config.face_loss_weight = 1.0
    attached.config.drop_identity = attached.config.drop_both = 0.0
    batch = synthetic_batch(pipe, 2, num_refs=2)
    seen = []

    def detector(found):
        def detect(images):
            seen.append(images.shape[0])
            return torch.tensor(found)
        return detect

    parts = {}
    for found in ([True, True], [True, False], [False, False]):
        attached.face_detector = detector(found)
        parts[tuple(found)] = attached.training_loss(batch, pipe, generator=torch.Generator().manual_seed(0))
    assert seen == [2, 2, 2]  # every sample is looked at: no timestep window
    both, first, none = (float(parts[k]["face"]) for k in ((True, True), (True, False), (False, False)))
    assert none == 0.0 and 0.0 < first < both
    assert torch.equal(parts[(False, False)]["loss"].detach(), parts[(False, False)]["diffusion"])


def test_mff_reads_every_reference_and_replicates_one_image(pipes, attached):
    pipe = pipes["sd15"]
    mff = attached.modules["mff"]
    g = torch.Generator().manual_seed(0)
    face, patches = torch.randn(1, 3, 512, generator=g), torch.randn(1, 3, 17, 32, generator=g)
    with torch.no_grad():
        out = mff(face, patches)
        changed = patches.clone()
        changed[:, 2, 1:] += 1.0
        assert not torch.allclose(mff(face, changed), out)
        cls_only = patches.clone()
        cls_only[:, :, 0] += 1.0  # the class token feeds the textual injection, not E_r
        assert torch.equal(mff(face, cls_only), out)
        other_face = face.clone()
        other_face[:, 0] = -other_face[:, 0]
        assert not torch.allclose(mff(other_face, patches), out)
    # E_r: the 16 patch tokens of each of the 3 references plus the mean face token
    assert out.shape == (1, 3 * 16 + 1, attached.config.mff_dim)
    cond = attached.identity_condition(_refs(5, n=1), pipe)
    face_rep = cond.tensors["face"]
    assert face_rep.shape == (1, attached.config.num_refs, 512) and torch.equal(face_rep[0, 0], face_rep[0, 1])


def test_adapter_sits_on_the_residual_stream_between_self_and_cross_attention(pipes, attached):
    """The adapter reads y = block input + self-attention output (eq. 7) and its output joins that stream before
    the block's cross-attention."""
    from idforge.diffusion import attention as A

    pipe = pipes["sd15"]
    site = A.select_sites(pipe.unet, "self")[0]
    block = pipe.unet.get_submodule(site.name.removesuffix(".attn1.processor"))
    seen = {}
    hooks = [
        attached.modules["adapter"][site.key].register_forward_hook(
            lambda _m, args, out: seen.update(y=args[0].detach(), delta=out.detach())),
        block.attn1.register_forward_hook(lambda _m, args, out: seen.update(attn1=out.detach())),
        block.register_forward_pre_hook(lambda _m, args, kw: seen.update(x=(args[0] if args else
                                                                             kw["hidden_states"]).detach()),
                                        with_kwargs=True),
        block.norm2.register_forward_hook(lambda _m, args, out: seen.update(stream=args[0].detach())),
    ]
    try:
        attached.training_loss(synthetic_batch(pipe, 2, num_refs=2), pipe)
    finally:
        for h in hooks:
            h.remove()
    assert float(seen["delta"].abs().max()) > 0  # the perturbed gate is open
    torch.testing.assert_close(seen["y"], seen["x"] + seen["attn1"] - seen["delta"])
    torch.testing.assert_close(seen["stream"], seen["y"] + seen["delta"])  # what the cross-attention's norm reads


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
    # No guidance dropout: 100 toy steps measure whether identity flows, not the unconditional branch.
    m = get_method("id-adapter", **CFG, drop_identity=0.0, drop_text=0.0, drop_both=0.0)
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
        condition = m._condition_tensors  # E_r and the class token of the textual injection
        m._condition_tensors = lambda face, patches: condition(face * 0, patches * 0)  # ignore the identity
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
    face_token = tokens[:, -1]  # E_r's mean-ArcFace token (the patch tokens are equal here)
    assert (face_token[0] - face_token[1]).norm() / face_token[0].norm() > 0.5  # 1.00 here; 0.10 unscaled
