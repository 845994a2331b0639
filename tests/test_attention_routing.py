"""Attention-processor routing and the processor building blocks, on the tiny SD1.5- and SDXL-shaped UNets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from idforge.diffusion import attention as A


@pytest.fixture(scope="module")
def pipes(tiny_sd15_dir, tiny_sdxl_dir):
    from idforge.methods.testing import load_frozen_pipeline

    return {"sd15": load_frozen_pipeline(tiny_sd15_dir), "sdxl": load_frozen_pipeline(tiny_sdxl_dir)}


def test_hidden_size_follows_the_block_for_the_real_sd15_layout():
    cfg = SimpleNamespace(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
    t = "attentions.0.transformer_blocks.0.attn1.processor"
    assert A.hidden_size_for(f"down_blocks.0.{t}", cfg) == 320
    assert A.hidden_size_for(f"down_blocks.2.{t}", cfg) == 1280
    assert A.hidden_size_for(f"mid_block.{t}", cfg) == 1280
    assert A.hidden_size_for(f"up_blocks.1.{t}", cfg) == 1280
    assert A.hidden_size_for(f"up_blocks.2.{t}", cfg) == 640
    assert A.hidden_size_for(f"up_blocks.3.{t}", cfg) == 320
    with pytest.raises(ValueError, match="not a UNet attention processor"):
        A.hidden_size_for("conv_in.processor", cfg)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_sites_match_the_modules(pipes, kind):
    unet = pipes[kind].unet
    sites = A.attention_sites(unet)
    assert [s.name for s in sites] == list(unet.attn_processors)
    assert {s.kind for s in sites} == {"self", "cross"}
    assert {s.block for s in sites} == {"down", "mid", "up"}
    assert len({s.key for s in sites}) == len(sites) and all("." not in s.key for s in sites)
    for s in sites:
        attn = A.attention_module(unet, s)
        assert s.hidden_size == attn.to_q.in_features, s.name
        assert s.heads == attn.heads
        assert (s.kind == "self") == s.name.endswith("attn1.processor")
        if s.kind == "cross":
            assert s.context_dim == attn.to_k.in_features == unet.config.cross_attention_dim
        else:
            assert s.context_dim is None and attn.to_k.in_features == s.hidden_size
    assert len(A.select_sites(unet, "self")) == len(A.select_sites(unet, "cross")) == len(sites) // 2
    assert {s.block for s in A.select_sites(unet, "cross", ["mid"])} == {"mid"}


class ReplayProcessor:
    """AttnProcessor2_0 rebuilt from the helpers (must be bit-identical)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        prep = A.prepare(attn, hidden_states, attention_mask, temb, ctx_len)
        ctx = A.context_of(attn, prep.hidden, encoder_hidden_states)
        out = A.sdpa(attn, attn.to_q(prep.hidden), attn.to_k(ctx), attn.to_v(ctx), prep.mask)
        return A.finish(attn, out, prep)


def _unet_out(pipe):
    from idforge.diffusion.text import encode_prompts, unet_call

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        text = encode_prompts(pipe, ["a photo of a man", "a woman"])
        return unet_call(pipe, x, torch.tensor([10, 500]), text)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_helpers_replay_the_stock_processor_exactly_and_install_restores(pipes, kind):
    pipe = pipes[kind]
    unet = pipe.unet
    before = _unet_out(pipe)
    procs = A.route(unet, self_attn=lambda s: ReplayProcessor(), cross_attn=lambda s: ReplayProcessor())
    assert set(procs) == set(unet.attn_processors)
    replaced = A.install(unet, procs)
    try:
        assert all(isinstance(p, ReplayProcessor) for p in unet.attn_processors.values())
        assert torch.equal(_unet_out(pipe), before)
    finally:
        A.install(unet, replaced)
    assert not any(isinstance(p, ReplayProcessor) for p in unet.attn_processors.values())
    assert torch.equal(_unet_out(pipe), before)


def test_route_only_where_asked_and_install_rejects_unknown_names(pipes):
    unet = pipes["sd15"].unet
    procs = A.route(unet, cross_attn=lambda s: ReplayProcessor() if s.block == "mid" else None)
    assert list(procs) == ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    with pytest.raises(ValueError, match="not in this UNet"):
        A.install(unet, {"down_blocks.9.attentions.0.transformer_blocks.0.attn1.processor": ReplayProcessor()})


def test_adain_mean_moves_the_token_mean_and_keeps_the_deviations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 6, generator=g)
    y = torch.randn(2, 3, 6, generator=g) + 5.0
    out = A.adain_mean(x, y)
    assert out.shape == x.shape
    torch.testing.assert_close(out.mean(dim=1), y.mean(dim=1))
    torch.testing.assert_close(out - out.mean(dim=1, keepdim=True), x - x.mean(dim=1, keepdim=True))


def _sdxl_layout_pipe(base):
    """The tiny SDXL pipeline with a UNet laid out like the real SDXL one: no attention in the first down block,
    several transformer blocks per attention (transformer_layers_per_block), text_time added conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=base.unet.config.cross_attention_dim,
        attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=base.unet.config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=base.unet.config.projection_class_embeddings_input_dim,
    ).requires_grad_(False).eval()
    return StableDiffusionXLPipeline(**{**base.components, "unet": unet})


def test_sdxl_layout_routes_every_transformer_block_and_methods_train_on_it(pipes):
    from idforge.methods.registry import get_method
    from idforge.methods.testing import synthetic_batch

    pipe = _sdxl_layout_pipe(pipes["sdxl"])
    sites = A.attention_sites(pipe.unet)
    names = [s.name for s in sites]
    assert not any(n.startswith("down_blocks.0.") or n.startswith("up_blocks.1.") for n in names)
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor" in names
    assert "mid_block.attentions.0.transformer_blocks.1.attn1.processor" in names
    for s in sites:
        assert s.hidden_size == A.attention_module(pipe.unet, s).to_q.in_features == 64
    before = _unet_out(pipe)
    for name, cfg in {"id-adapter": dict(num_refs=1, clip_dim=32, mff_dim=32, mff_heads=4,
                                         face_loss_weight=0.0),
                      "infinite-id": dict(clip_dim=32)}.items():
        m = get_method(name, **cfg)
        m.attach(pipe)
        try:
            assert len(m.processors) == len(sites)
            out = m.training_loss(synthetic_batch(pipe, 2), pipe)
            out["loss"].backward()
            assert all(p.grad is not None for p in m.trainable_parameters())
            assert all(p.grad is None for p in pipe.unet.parameters())
        finally:
            m.detach()
        assert torch.equal(_unet_out(pipe), before)
