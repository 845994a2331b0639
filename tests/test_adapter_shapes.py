"""The adapters at the real SD2.1 and SDXL configurations, random weights on the meta device (no memory): module
shapes, trainable-parameter counts and the identity-token shapes the presets' CLIP models give."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from idforge.methods.registry import get_method
from tests.fixtures.method_sizes import id_adapter_params, infinite_id_params


def _text_encoder(hidden: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def meta_pipe(kind: str) -> SimpleNamespace:
    """The components a method attaches to, in the real architecture, on the meta device."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from idforge.diffusion.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with torch.device("meta"):
        if kind == "sd21":  # stabilityai/stable-diffusion-2-1-base unet/config.json + OpenCLIP ViT-H text tower
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                        use_linear_projection=True)
            return SimpleNamespace(unet=unet, text_encoder=_text_encoder(1024, 23, 16), tokenizer=tok,
                                   scheduler=sched)
        unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
            sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        return SimpleNamespace(unet=unet, text_encoder=_text_encoder(768, 12, 12), tokenizer=tok,
                               text_encoder_2=_text_encoder(1280, 32, 20, projection=1280), tokenizer_2=tok,
                               scheduler=sched)


@pytest.fixture(scope="module")
def sd21():
    return meta_pipe("sd21")


@pytest.fixture(scope="module")
def sdxl():
    return meta_pipe("sdxl")


def test_id_adapter_at_sd21_size(sd21):
    # the preset's CLIP: OpenCLIP ViT-H/14 vision tower, 1280 wide, 257 tokens at 224 px
    with torch.device("meta"):
        m = get_method("id-adapter", clip_dim=1280)
        m.attach(sd21)
    try:
        sites = {k.split(".")[0]: len(v) for k, v in m.modules.items() if hasattr(v, "__len__")}
        assert sites == {"adapter": 16, "text_inj": 1, "text_kv": 16}  # 16 transformer blocks in SD2.1
        # 201.9M; the paper reports 262M (App. A) with widths it does not give
        assert m.num_trainable_parameters() == id_adapter_params(m.config, sd21) == 201_882_192
        assert all(p.requires_grad for p in m.trainable_parameters())
        face, patches = torch.zeros(1, 4, 512, device="meta"), torch.zeros(1, 4, 257, 1280, device="meta")
        tokens = m.vision_tokens(face, patches)
        assert tuple(tokens.shape) == (1, 4 * 256 + 1, 768)  # E_r: N = 4 references' patches + the face token
        cond = m._condition_tensors(face, patches)
        assert tuple(cond["class_token"].shape) == (1, 1280)
        e_c = m.modules["text_inj"][0](cond["class_token"])
        assert tuple(e_c.shape) == (1, 1024)  # replaces "sks" in the OpenCLIP-H token embeddings
    finally:
        m.detach()


def test_id_adapter_and_infinite_id_at_sdxl_size(sdxl):
    with torch.device("meta"):
        ida = get_method("id-adapter", clip_dim=1664)
        ida.attach(sdxl)
    try:
        assert len(ida.modules["adapter"]) == 70 and len(ida.modules["text_inj"]) == 2
        assert ida.num_trainable_parameters() == id_adapter_params(ida.config, sdxl)
    finally:
        ida.detach()
    # the preset's CLIP: OpenCLIP ViT-bigG/14 last hidden states, 257 x 1664 (the paper's stated width)
    with torch.device("meta"):
        m = get_method("infinite-id", clip_dim=1664)
        m.attach(sdxl)
    try:
        assert len(m.modules["image_attn"]) == 70  # paper l.86: every one of SDXL's 70 cross-attention layers
        assert m.num_trainable_parameters() == infinite_id_params(m.config, sdxl) == 353_648_640
        c_id = m.identity_tokens(torch.zeros(1, 1, 512, device="meta"), torch.zeros(1, 1, 257, 1664, device="meta"))
        assert tuple(c_id.shape) == (1, 257 + 1, 2048)  # all CLIP tokens + the face token, at the text width
    finally:
        m.detach()
