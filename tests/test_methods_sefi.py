"""SeFi-IDE: face-wise attention loss, per-stage K/V tokens (K forms keys only, V values only), training. The
contract every method keeps is in test_methods_contract.py."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.dataset import fixed_batch, state_copy, train_steps


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir, one_torch_thread):
    from idforge.diffusion.loading import load_pipeline

    return load_pipeline(tiny_sd15_dir)


def _method(**cfg):
    from idforge.methods.sefi_ide import SeFiIDE

    return SeFiIDE.from_config(cfg)


def test_attention_loss_lower_inside_the_face_mask_than_outside():
    from idforge.methods.sefi_ide import face_attention_loss

    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1
    inside = torch.zeros(1, 8, 8)
    inside[:, 3:5, 3:5] = 1.0  # identity attention on the face
    outside = torch.zeros(1, 8, 8)
    outside[:, 0:2, 0:2] = 1.0  # the same mass on the background
    spread = torch.full((1, 8, 8), 1 / 64)  # attention over the whole image (the "attention overfit")
    assert face_attention_loss(inside, mask) < face_attention_loss(spread, mask) < face_attention_loss(outside, mask)
    assert float(face_attention_loss(mask * 0.3, mask)) == pytest.approx(0.0)  # scale-free: the mask's shape is ideal
    with pytest.raises(ValueError, match="differ in shape"):
        face_attention_loss(inside, torch.zeros(1, 4, 4))


def test_five_contiguous_stages(pipe):
    from idforge.diffusion.attention import select_sites
    from idforge.methods.sefi_ide import stage_of_sites

    sites = select_sites(pipe.unet, "cross")
    stages = stage_of_sites(sites, 5)
    assert sorted(set(stages.values())) == [0, 1, 2, 3, 4]
    assert stages["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == 0
    assert stages["mid_block.attentions.0.transformer_blocks.0.attn2.processor"] == 2  # forward order: down, mid, up
    assert stages["up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"] == 4
    with pytest.raises(ValueError, match="fewer than num_stages"):
        stage_of_sites(sites, 6)


def test_k_token_forms_only_keys_and_v_token_only_values(pipe):
    from idforge.diffusion.text import tokenize, unet_call

    m = _method()
    m.attach(pipe)
    with torch.no_grad():
        m.kv.copy_(torch.randn_like(m.kv))
    ids, _ = tokenize(pipe, [m.prompt("a photo of {}")])
    text = m.pack_ids(pipe, ids, with_identity=True)
    seen: dict[str, torch.Tensor] = {}
    attn = pipe.unet.get_submodule("up_blocks.1.attentions.1.transformer_blocks.0.attn2")  # stage 4
    hooks = [attn.to_k.register_forward_hook(lambda _m, inp, _o: seen.__setitem__("k", inp[0].detach())),
             attn.to_v.register_forward_hook(lambda _m, inp, _o: seen.__setitem__("v", inp[0].detach()))]
    try:
        with torch.no_grad():
            unet_call(pipe, torch.randn(1, 4, 8, 8), torch.tensor([10]), text)
            want_k = m.tokens.encode_ids(pipe, ids, m.kv[4, 0][None]).hidden
            want_v = m.tokens.encode_ids(pipe, ids, m.kv[4, 1][None]).hidden
    finally:
        for h in hooks:
            h.remove()
        m.detach()
    torch.testing.assert_close(seen["k"], want_k)
    torch.testing.assert_close(seen["v"], want_v)
    assert not torch.allclose(want_k, want_v)


def test_only_tokens_train_with_attention_loss_and_loss_falls(pipe):
    m = _method(attn_loss_weight=0.1)
    m.attach(pipe)
    batch = fixed_batch(pipe, m)
    with torch.no_grad():
        parts = m.training_loss(batch, pipe)
    assert float(parts["attn"]) > 0
    assert float(parts["loss"]) == pytest.approx(float(parts["diffusion"]) + 0.1 * float(parts["attn"]), rel=1e-5)
    init = state_copy(m)
    first, last = train_steps(m, pipe, batch, steps=15, lr=0.05)
    assert last < first
    assert list(init) == ["tokens.kv"] and not torch.equal(init["tokens.kv"], m.state_dict()["tokens.kv"])
    m.detach()
