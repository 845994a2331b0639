"""The contract every method keeps, checked for each one on the tiny pipelines (as diffusers' tester mixins do).

attach -> detach restores the stock processors and the base model's output bit for bit; scale 0 is the base model
exactly (and a non-zero scale is not); a training step gives gradients to the method's parameters only and leaves
every base weight as it was, and the UNet's gradient checkpointing does not change them; save -> load round-trips
bit-exactly, and a checkpoint with missing or stray keys is refused by a strict check that names them; seeded
generation is deterministic and prompt-major; a checkpoint for another UNet architecture is refused with a message
that says so. How each method is built small: tests/fixtures/method_cases.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from idforge.methods.checkpoint import CHECKPOINT_FORMAT, load_method, read_method_metadata, save_method
from idforge.methods.registry import available_methods, method_class
from tests.fixtures.dataset import assert_frozen_unchanged, frozen_snapshot
from tests.fixtures.method_cases import CASES, FILES, build_method, condition, identity_prompt

PLAIN = "a photo of a man"  # names no identity: what the base model is compared on
STEPS = 2  # sampling steps: enough for every processor to run in both guidance branches


def _params(kinds: bool) -> list:
    if not kinds:
        return [pytest.param(n, id=n) for n in CASES]
    return [pytest.param(n, k, id=f"{n}-{k}") for n, c in CASES.items() for k in c.kinds]


@pytest.fixture(scope="module")
def pipelines(tiny_sd15_dir, tiny_sdxl_dir, tiny_e4e_checkpoint):
    """(method, kind) -> a frozen tiny pipeline, loaded on first use and shared by the module's tests (a method
    with ``own_pipeline`` gets one of its own to attach to)."""
    from idforge.methods.testing import load_frozen_pipeline

    FILES["e4e"] = tiny_e4e_checkpoint

    dirs = {"sd15": tiny_sd15_dir, "sdxl": tiny_sdxl_dir}
    cache: dict = {}

    def get(name: str, kind: str = "sd15", attach: bool = True):
        key = (name if CASES[name].own_pipeline and attach else None, kind)
        if key not in cache:
            cache[key] = load_frozen_pipeline(dirs[kind])
        return cache[key]

    return get


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def _base_output(pipe) -> torch.Tensor:
    """The UNet's prediction for a fixed input and a plain prompt (no method involved in the text)."""
    from idforge.diffusion.text import encode_prompts, unet_call

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return unet_call(pipe, x, torch.tensor([500]), encode_prompts(pipe, [PLAIN]))


def test_every_library_method_has_a_contract_case():
    library = {n for n in available_methods() if method_class(n).__module__.startswith("idforge.")}
    assert library == set(CASES), f"register these in tests/fixtures/method_cases.py: {sorted(library - set(CASES))}"
    assert len(library) >= 7


@pytest.mark.parametrize(("name", "kind"), _params(kinds=True))
def test_detach_restores_the_stock_processors_and_output_bit_for_bit(pipelines, name, kind):
    pipe = pipelines(name, kind)
    stock = dict(pipe.unet.attn_processors)
    base = _base_output(pipe)
    method = build_method(name, pipe)
    method.detach()
    after = pipe.unet.attn_processors
    assert after.keys() == stock.keys() and all(after[k] is stock[k] for k in stock)
    assert torch.equal(_base_output(pipe), base)
    assert not method.is_attached and method.processors == {}


@pytest.mark.parametrize(("name", "kind"), _params(kinds=True))
def test_scale_zero_is_the_base_model_exactly(pipelines, name, kind):
    pipe = pipelines(name, kind)
    method = build_method(name, pipe)
    try:
        cond, prompt = condition(method, pipe), identity_prompt(method)
        kw = dict(seeds=[0], num_inference_steps=STEPS, batch_size=1)  # one prompt per UNet batch, as diffusers
        with_identity = _pixels(method.generate(pipe, [prompt], cond, **kw))
        method.set_scale(0.0)
        off = _pixels(method.generate(pipe, [prompt, PLAIN], cond, **kw))
    finally:
        method.detach()
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    stock = np.asarray(pipe(PLAIN, num_inference_steps=STEPS, guidance_scale=5.0, latents=noise).images[0])
    assert np.array_equal(off[1], stock)  # the diffusers pipeline itself, bit for bit
    assert not np.array_equal(with_identity[0], off[0])  # the scale switches the identity


@pytest.mark.parametrize(("name", "kind"), _params(kinds=True))
def test_only_the_methods_parameters_get_gradients(pipelines, name, kind):
    pipe = pipelines(name, kind)
    method = build_method(name, pipe, train=True)
    before = frozen_snapshot(pipe)
    try:
        trainable = {id(p) for p in method.trainable_parameters()}
        assert trainable, "a method trains something"
        everything = {id(p): (f"{c}.{n}", p) for c in ("unet", "vae", "text_encoder", "text_encoder_2")
                      if getattr(pipe, c, None) is not None for n, p in getattr(pipe, c).named_parameters()}
        everything.update({id(p): (f"method.{n}", p) for n, p in method.modules.named_parameters()})
        method.train()
        out = method.training_loss(CASES[name].batch(method, pipe), pipe, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out["loss"]) and "diffusion" in out
        out["loss"].backward()
        stray = [n for i, (n, p) in everything.items()
                 if i not in trainable and (p.grad is not None or p.requires_grad)]
        assert stray == [], f"base or frozen weights on the gradient path: {stray[:5]}"
        dead = [n for i, (n, p) in everything.items() if i in trainable and (p.grad is None or not p.grad.any())]
        assert dead == [], f"trainable weights that get no gradient: {dead[:5]}"
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert_frozen_unchanged(before, pipe)  # a step moves the method alone
    finally:
        method.detach()


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.checkpointing])
def test_gradients_are_the_same_with_gradient_checkpointing(pipelines, name):
    """Checkpointed UNet blocks re-run the processors during backward: the identity must still be there."""
    from idforge.methods.testing import grads_with_and_without_checkpointing

    pipe = pipelines(name)
    method = build_method(name, pipe, train=True)
    try:
        method.train()
        plain, checkpointed = grads_with_and_without_checkpointing(method, pipe, CASES[name].batch(method, pipe))
    finally:
        method.detach()
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


@pytest.mark.parametrize("name", _params(kinds=False))
def test_save_load_round_trips_bit_exactly_with_a_strict_key_check(pipelines, name, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe = pipelines(name)
    stock = dict(pipe.unet.attn_processors)
    method = build_method(name, pipe)
    try:
        path = save_method(method, tmp_path / "m.safetensors")
        sd = {k: v.detach().clone() for k, v in method.state_dict().items()}
        prompt = identity_prompt(method)
        images = _pixels(method.generate(pipe, [prompt], condition(method, pipe), seeds=[0], num_inference_steps=STEPS))
    finally:
        method.detach()
    loaded = load_method(path, pipe)
    try:
        assert type(loaded) is type(method) and loaded.config == method.config
        got = loaded.state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
        again = _pixels(loaded.generate(pipe, [prompt], condition(loaded, pipe), seeds=[0], num_inference_steps=STEPS))
        assert all(np.array_equal(a, b) for a, b in zip(images, again, strict=True))
    finally:
        loaded.detach()
    # One key dropped, one stray key added: the strict check names both, and the pipeline is left as it was.
    raw = load_file(str(path))
    dropped = sorted(raw)[0]
    raw.pop(dropped)
    raw["stray.weight"] = torch.zeros(1)
    meta = read_method_metadata(path)
    bad = tmp_path / "bad.safetensors"
    save_file(raw, str(bad), metadata={"format": CHECKPOINT_FORMAT, "method": name,
                                       "config": json.dumps(meta["config"]), "unet": json.dumps(meta["unet"])})
    with pytest.raises(ValueError, match=rf"missing keys \[{dropped}\].*unexpected keys \[stray.weight\]"):
        load_method(bad, pipe)
    after = pipe.unet.attn_processors
    assert after.keys() == stock.keys() and all(after[k] is stock[k] for k in stock)


@pytest.mark.parametrize("name", _params(kinds=False))
def test_seeded_generation_is_deterministic_and_prompt_major(pipelines, name):
    pipe = pipelines(name)
    method = build_method(name, pipe)
    kw = dict(num_inference_steps=STEPS, batch_size=1)
    try:
        cond, prompt = condition(method, pipe), identity_prompt(method)
        a = _pixels(method.generate(pipe, [prompt, PLAIN], cond, seeds=[0, 1], **kw))
        single = _pixels(method.generate(pipe, [PLAIN], cond, seeds=[1], **kw))
        other = None
        if method.regime == "population":  # the references decide the identity
            other = _pixels(method.generate(pipe, [prompt], condition(method, pipe, seed=2), seeds=[0], **kw))
    finally:
        method.detach()
    assert len(a) == 4 and not np.array_equal(a[0], a[1])  # the seed decides the image
    # Another call, alone, gives the same pixels for (prompt 1, seed 1): deterministic, and the images come
    # prompt-major (every seed of prompt 0, then of prompt 1).
    assert np.array_equal(single[0], a[3])
    assert other is None or not np.array_equal(other[0], a[0])


@pytest.mark.parametrize("name", _params(kinds=False))
def test_a_checkpoint_for_another_architecture_is_refused_clearly(pipelines, name, tmp_path):
    pipe = pipelines(name)
    method = build_method(name, pipe)
    try:
        path = save_method(method, tmp_path / "m.safetensors")
    finally:
        method.detach()
    other = pipelines(name, "sdxl", attach=False)  # nothing may be built on it
    stock = dict(other.unet.attn_processors)
    with pytest.raises(ValueError, match=r"for another UNet architecture .*cross_attention_dim.*trained on"):
        load_method(path, other)
    after = other.unet.attn_processors
    assert after.keys() == stock.keys() and all(after[k] is stock[k] for k in stock)
