"""SeFi-IDE: K/V token pairs per timestep interval (and per layer group as an option, on the real layouts), the
face-wise attention loss toward the class word's map (and the face-mask variant), training. The contract every
method keeps is in test_methods_contract.py."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.dataset import fixed_batch, state_copy, train_steps

LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir, one_torch_thread):
    from idforge.diffusion.loading import load_pipeline

    return load_pipeline(tiny_sd15_dir)


def _method(**cfg):
    from idforge.methods.sefi_ide import SeFiIDE

    return SeFiIDE.from_config(cfg)


def test_paper_defaults():
    cfg = _method().config
    assert (cfg.num_stages, cfg.stage_by, cfg.attn_loss_weight, cfg.attn_target, cfg.train.max_images) \
        == (5, "timestep", 0.003, "class-word", 1)
    assert cfg.templates == ["a photo of the face of {}"]


def test_stage_of_timestep_is_prospects_equal_bins():
    from idforge.methods.sefi_ide import stage_of_timestep

    t = torch.tensor([0, 199, 200, 399, 400, 799, 800, 999])
    assert stage_of_timestep(t, 5, 1000).tolist() == [0, 0, 1, 1, 2, 3, 4, 4]
    assert stage_of_timestep(torch.tensor([0.0, 99.9, 950.5]), 10, 1000).tolist() == [0, 0, 9]  # ProSpect: t // 100


def _seen_kv(pipe, m, timesteps):
    """The inputs of to_k / to_v of one cross-attention layer for a UNet call at ``timesteps`` (B,)."""
    from idforge.diffusion.text import tokenize

    ids, _ = tokenize(pipe, [m.prompt("a photo of {}")] * len(timesteps))
    text = m.pack_ids(pipe, ids, with_identity=True)
    seen: dict[str, torch.Tensor] = {}
    attn = pipe.unet.get_submodule(LAYER)
    hooks = [attn.to_k.register_forward_hook(lambda _m, inp, _o: seen.__setitem__("k", inp[0].detach())),
             attn.to_v.register_forward_hook(lambda _m, inp, _o: seen.__setitem__("v", inp[0].detach()))]
    try:
        with torch.no_grad():
            x = torch.randn(len(timesteps), 4, 8, 8)
            m.denoise(pipe, x, torch.tensor(timesteps), text, m.sample_condition(pipe).expand(len(timesteps)))
    finally:
        for h in hooks:
            h.remove()
    return ids, seen


def test_pair_follows_the_timestep_per_row_k_forms_keys_v_values(pipe):
    m = _method()
    m.attach(pipe)
    with torch.no_grad():
        m.kv.copy_(torch.randn_like(m.kv))
    ids, seen = _seen_kv(pipe, m, [10, 950])  # row 0 at the end of sampling, row 1 at its start
    with torch.no_grad():
        want_k = torch.cat([m.tokens.encode_ids(pipe, ids[:1], m.kv[0, 0][None]).hidden,
                            m.tokens.encode_ids(pipe, ids[1:], m.kv[4, 0][None]).hidden])
        want_v = torch.cat([m.tokens.encode_ids(pipe, ids[:1], m.kv[0, 1][None]).hidden,
                            m.tokens.encode_ids(pipe, ids[1:], m.kv[4, 1][None]).hidden])
    torch.testing.assert_close(seen["k"], want_k)
    torch.testing.assert_close(seen["v"], want_v)
    assert not torch.allclose(want_k, want_v)
    _, mid = _seen_kv(pipe, m, [450, 450])  # the same layer at another interval: pair 2
    with torch.no_grad():
        torch.testing.assert_close(mid["k"][:1], m.tokens.encode_ids(pipe, ids[:1], m.kv[2, 0][None]).hidden)
    with pytest.raises(ValueError, match="need the current timestep"):
        from idforge.diffusion.text import unet_call

        unet_call(pipe, torch.randn(1, 4, 8, 8), torch.tensor([10]), m.pack_ids(pipe, ids[:1], True))
    m.detach()


def test_layer_option_fixes_the_pair_per_layer(pipe):
    m = _method(stage_by="layer")
    m.attach(pipe)
    with torch.no_grad():
        m.kv.copy_(torch.randn_like(m.kv))
    ids, seen = _seen_kv(pipe, m, [10, 950])
    with torch.no_grad():  # LAYER is in the last group whatever the timestep
        torch.testing.assert_close(seen["k"], m.tokens.encode_ids(pipe, ids, m.kv[4, 0][None]).hidden)
    m.detach()


@pytest.mark.parametrize("kind, layers, groups", [
    ("sd15", [4, 3, 3, 3, 3], [["down_blocks.0", "down_blocks.1"], ["down_blocks.2", "mid_block"], ["up_blocks.1"],
                               ["up_blocks.2"], ["up_blocks.3"]]),
    ("sd21", [4, 3, 3, 3, 3], [["down_blocks.0", "down_blocks.1"], ["down_blocks.2", "mid_block"], ["up_blocks.1"],
                               ["up_blocks.2"], ["up_blocks.3"]]),
    ("sdxl", [4, 20, 10, 30, 6], [["down_blocks.1"], ["down_blocks.2"], ["mid_block"], ["up_blocks.0"],
                                  ["up_blocks.1"]]),
])
def test_layer_groups_on_the_real_layouts(kind, layers, groups):
    from idforge.diffusion.attention import select_sites
    from idforge.methods.sefi_ide import stage_of_sites
    from tests.fixtures.unet_layouts import meta_unet

    stages = stage_of_sites(select_sites(meta_unet(kind), "cross"), 5)
    assert [sum(1 for s in stages.values() if s == i) for i in range(5)] == layers
    got: list[set[str]] = [set() for _ in range(5)]
    for name, stage in stages.items():
        got[stage].add("mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2]))
    assert got == [set(g) for g in groups]
    with pytest.raises(ValueError, match="fewer than num_stages"):
        stage_of_sites(select_sites(meta_unet(kind), "cross"), 8)


def test_attention_losses_orientation():
    from idforge.methods.sefi_ide import class_word_attention_loss, face_attention_loss

    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1
    inside = torch.zeros(1, 8, 8)
    inside[:, 3:5, 3:5] = 1.0
    outside = torch.zeros(1, 8, 8)
    outside[:, 0:2, 0:2] = 1.0
    spread = torch.full((1, 8, 8), 1 / 64)
    assert face_attention_loss(inside, mask) < face_attention_loss(spread, mask) < face_attention_loss(outside, mask)
    assert float(face_attention_loss(mask * 0.3, mask)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        face_attention_loss(inside, torch.zeros(1, 4, 4))
    # class-word target: V*'s map moves, the class word's map is the fixed anchor
    a_t = torch.rand(2, 16, requires_grad=True)
    a_r = torch.rand(2, 16, requires_grad=True)
    loss = class_word_attention_loss(a_t, a_r)
    loss.backward()
    assert a_r.grad is None and float(a_t.grad.abs().sum()) > 0
    torch.testing.assert_close(a_t.grad, (a_t - a_r).detach())  # d/dA_t of sum (A_t - A_r)^2 / B, B = 2
    assert float(class_word_attention_loss(a_r.detach(), a_r)) == 0.0


def _attention_gap(m, pipe, batch) -> float:
    """Mean squared distance between V*'s map and the class word's over the captured layers (no gradient)."""
    with torch.no_grad():
        return float(m.training_loss(batch, pipe)["attn"])


def test_attention_term_reaches_the_tokens_and_training_pulls_v_toward_the_class_word(pipe):
    m = _method()
    m.attach(pipe)
    with torch.no_grad():
        m.kv.add_(0.5 * torch.randn(m.kv.shape, generator=torch.Generator().manual_seed(0)))
    batch = fixed_batch(pipe, m)  # timesteps 300 and 700: pairs 1 and 3

    def grad(weight):
        m.config.attn_loss_weight = weight
        m.kv.grad = None
        m.training_loss(batch, pipe)["loss"].backward()
        return m.kv.grad.clone()

    g_with, g_without = grad(0.003), grad(0.0)
    diff = (g_with - g_without).abs().sum((1, 2))
    assert float(diff[1]) > 0 and float(diff[3]) > 0  # the attention term's gradient reaches the used pairs
    assert float(diff[0] + diff[2] + diff[4]) == 0.0  # and only them (other timestep intervals)
    m.config.attn_loss_weight = 1.0
    before = _attention_gap(m, pipe, batch)
    assert before > 0
    opt = torch.optim.Adam([m.kv], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        parts = m.training_loss(batch, pipe)
        (parts["loss"] - parts["diffusion"]).backward()  # the attention term alone
        opt.step()
    assert _attention_gap(m, pipe, batch) < 0.9 * before  # V*'s map moved toward the class word's
    m.detach()


def test_only_tokens_train_and_loss_falls_with_both_targets(pipe):
    for target in ("class-word", "face-mask"):
        m = _method(attn_loss_weight=0.1, attn_target=target)
        m.attach(pipe)
        batch = fixed_batch(pipe, m)
        with torch.no_grad():
            # initialised from the class word, V*'s map IS the class word's: the class-word term starts at 0
            assert (float(m.training_loss(batch, pipe)["attn"]) == 0.0) == (target == "class-word")
            m.kv.add_(0.5 * torch.randn(m.kv.shape, generator=torch.Generator().manual_seed(1)))
            parts = m.training_loss(batch, pipe)
        assert float(parts["attn"]) > 0
        assert float(parts["loss"]) == pytest.approx(float(parts["diffusion"]) + 0.1 * float(parts["attn"]),
                                                     rel=1e-5)
        init = state_copy(m)
        first, last = train_steps(m, pipe, batch, steps=10, lr=0.05)
        assert last < first
        assert list(init) == ["tokens.kv"] and not torch.equal(init["tokens.kv"], m.state_dict()["tokens.kv"])
        m.detach()


def test_artifact_records_the_stage_reading(pipe, tmp_path):
    import json

    m = _method(stage_by="layer")
    m.attach(pipe)
    m.save_artifact(tmp_path / "a")
    m.detach()
    meta = json.loads((tmp_path / "a" / "artifact.json").read_text())
    assert meta["placeholders"] == ["<sefi>"] and meta["stage_by"] == "layer"
    assert sorted(set(meta["stages"].values())) == [0, 1, 2, 3, 4]


def test_preset_loads_as_a_config_and_matches_the_defaults():
    from idforge.config import load_config

    cfg = load_config(preset="sefi-ide")
    assert cfg.model.base == "runwayml/stable-diffusion-v1-5"
    assert _method(**cfg.finetune.method_config).config == _method().config
