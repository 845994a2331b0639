"""Infinite-ID on the tiny SD1.5- and SDXL-shaped pipelines: training semantics, sizes, the inference switches
(mixed attention, cross-attention merging, AdaIN-mean), identity flow. The contract every method keeps is in
test_methods_contract.py."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from idforge.diffusion.text import encode_prompts, tokenize, unet_call
from idforge.methods.registry import get_method
from idforge.methods.testing import (
    load_frozen_pipeline,
    perturb_,
    synthetic_batch,
)
from idforge.methods.types import IdentityRefs
from idforge.train.validation import identity_gap
from tests.fixtures.method_sizes import infinite_id_params

CFG = dict(clip_dim=32)
OFF = dict(mixed_attention=False, cross_attention_merging=False, adain_mean=False)


@pytest.fixture(scope="module")
def pipes(tiny_sd15_dir, tiny_sdxl_dir):
    return {"sd15": load_frozen_pipeline(tiny_sd15_dir), "sdxl": load_frozen_pipeline(tiny_sdxl_dir)}


@pytest.fixture
def attached(pipes):
    m = get_method("infinite-id", **CFG)
    m.attach(pipes["sd15"])
    perturb_(m, 0.05)
    yield m
    m.detach()


def _refs(seed: int) -> IdentityRefs:
    g = torch.Generator().manual_seed(seed)
    return IdentityRefs(face_embeds=torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1),
                        clip_patch_tokens=torch.randn(1, 17, 32, generator=g))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_parameter_count_and_checkpoint_prefixes_follow_the_config(pipes, kind):
    pipe = pipes[kind]
    m = get_method("infinite-id", **CFG, num_face_tokens=2, mapper_hidden=48)
    m.attach(pipe)
    try:
        assert m.num_trainable_parameters() == infinite_id_params(m.config, pipe)
        assert {k.split(".")[0] for k in m.state_dict()} == {"face_mapper", "clip_mapper", "image_attn"}
    finally:
        m.detach()


def test_text_cross_attention_is_off_in_training(pipes, attached):
    pipe = pipes["sd15"]
    a = synthetic_batch(pipe, 2, prompts=["a photo of a man", "a photo of a man"])
    ids, _ = tokenize(pipe, ["a woman wearing a red sweater on the beach"] * 2)
    b = replace(a, input_ids=ids, text_embeds=torch.randn(2, 77, 32))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(attached.training_loss(a, pipe, generator=gen())["loss"],
                       attached.training_loss(b, pipe, generator=gen())["loss"])
    # ...and depends on the identity.
    other = replace(a, face_embeds=torch.roll(a.face_embeds, 1, 0), clip_patch_tokens=a.clip_patch_tokens + 1.0)
    assert not torch.equal(attached.training_loss(a, pipe, generator=gen())["loss"],
                           attached.training_loss(other, pipe, generator=gen())["loss"])
    # The "w/o identity-enhanced training" ablation reads the caption.
    attached.config.text_in_training = True
    assert not torch.equal(attached.training_loss(a, pipe, generator=gen())["loss"],
                           attached.training_loss(b, pipe, generator=gen())["loss"])


def _denoise(method, pipe, options: dict, cond, x, t, streams: int):
    """One sampling-mode UNet call with the given switches; identity rows only."""
    saved = method.config.model_dump()
    for k, v in options.items():
        setattr(method.config, k, v)
    method.eval()
    method.state.flags.update(streams=streams)
    try:
        with torch.no_grad():
            text = encode_prompts(pipe, ["a woman in a red sweater"])
            text = type(text).cat([text] * streams)
            batch_cond = type(cond).cat([cond] * streams)
            return method.denoise(pipe, torch.cat([x] * streams), t, text, batch_cond)[: x.shape[0]]
    finally:
        method.state.flags.clear()
        method.train()
        for k in options:
            setattr(method.config, k, saved[k])


def test_each_inference_option_changes_the_output(pipes, attached):
    pipe = pipes["sd15"]
    cond = attached.identity_condition(_refs(1), pipe)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(400)
    on = {"adain_mean": True}  # every option on (AdaIN-mean is off by default)
    full = _denoise(attached, pipe, on, cond, x, t, streams=2)
    for option in ("mixed_attention", "cross_attention_merging", "adain_mean"):
        streams = 1 if option == "mixed_attention" else 2
        ablated = _denoise(attached, pipe, {**on, option: False}, cond, x, t, streams=streams)
        assert (ablated - full).abs().max() > 1e-4, option
    # mixed attention without its text stream would silently be plain self-attention: the sampler runs the stream
    assert attached.sampling_streams() == 2
    attached.set_scale(0.0)
    assert attached.sampling_streams() == 1  # no text stream is run for a switched-off identity
    attached.set_scale(1.0)
    attached.config.mixed_attention = False
    assert attached.sampling_streams() == 1


def test_all_options_off_equals_a_plain_image_cross_attention_pass(pipes, attached):
    pipe = pipes["sd15"]
    cond = attached.identity_condition(_refs(1), pipe)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(400)
    ours = _denoise(attached, pipe, OFF, cond, x, t, streams=1)
    # Reference: the stock UNet whose cross-attention K/V weights are the trained image K/V, reading c_id as its
    # "text". Nothing of ours runs in it.
    ref_unet = copy.deepcopy(pipe.unet)
    from diffusers.models.attention_processor import AttnProcessor2_0

    ref_unet.set_attn_processor(AttnProcessor2_0())
    for name, mod in ref_unet.named_modules():
        if name.endswith("attn2"):
            key = name.replace(".", "_")
            mod.to_k.weight.data.copy_(attached.modules["image_attn"][key].to_k.weight.data)
            mod.to_v.weight.data.copy_(attached.modules["image_attn"][key].to_v.weight.data)
    with torch.no_grad():
        reference = ref_unet(x, t, encoder_hidden_states=cond.tensors["c_id"]).sample
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    # The training forward is the same computation.
    with torch.no_grad(), attached.conditioning(cond):
        training_mode = unet_call(pipe, x, t, encode_prompts(pipe, [""]))
    torch.testing.assert_close(training_mode, reference, atol=1e-6, rtol=1e-5)


def test_identity_gap_sees_the_identity(pipes, attached):
    pipe = pipes["sd15"]
    batch = synthetic_batch(pipe, 2)
    gap = identity_gap(attached, pipe, batch, repeats=1)
    assert gap.match > 0 and abs(gap.gap) > 1e-5
    same = identity_gap(attached, pipe, batch, batch, repeats=1)  # "mismatch" with itself: no gap at all
    assert same.gap == 0.0


@pytest.mark.slow
def test_identity_flows_after_a_short_training_run(pipes):
    """Trained on a toy population, the held-out loss is lower with the right identity than with another's, by
    more than the untrained (randomly initialised) mappers show; with its identity input cut the gap is 0."""
    from idforge.methods.testing import SyntheticIdentities, fit

    pipe = pipes["sd15"]
    torch.manual_seed(0)
    m = get_method("infinite-id", **CFG)
    m.attach(pipe)
    try:
        task = SyntheticIdentities(pipe, num_refs=1)
        held = task.heldout()
        before = identity_gap(m, pipe, held, repeats=4)
        losses = fit(m, pipe, task, steps=60, lr=1e-2)
        after = identity_gap(m, pipe, held, repeats=4)
        assert np.mean(losses[-10:]) < np.mean(losses[:10])
        assert after.gap > before.gap + 0.01, (before, after)
        identity_tokens = m.identity_tokens
        m.identity_tokens = lambda face, patches: identity_tokens(face * 0, patches * 0)  # ignore the identity
        assert identity_gap(m, pipe, held, repeats=4).gap == 0.0
    finally:
        m.detach()
