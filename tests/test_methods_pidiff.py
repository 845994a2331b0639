"""PIDiff: e4e required, SCA (q/k/v from text cross-attention, frozen to_out) and F train, 38.5 M at SD1.5 shape,
S* in prompts, style mixing. The contract every method keeps (scale 0 is the base model, round trips, frozen base
weights, ...) is in test_methods_contract.py."""

from __future__ import annotations

import pytest
import torch

from idforge.errors import ConfigError
from tests.fixtures.dataset import fixed_batch, state_copy, train_steps


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir, one_torch_thread):
    from idforge.diffusion.loading import load_pipeline

    return load_pipeline(tiny_sd15_dir)


@pytest.fixture(scope="module")
def small(tiny_e4e_checkpoint):
    """Method config with the injected random-weight e4e checkpoint (released layout, width 16), fed 64 px."""
    return {"encoder_path": str(tiny_e4e_checkpoint), "encoder_image_size": 64}


@pytest.fixture()
def make(small):
    from idforge.methods.pidiff import PIDiff

    return lambda **cfg: PIDiff.from_config({**small, **cfg})


def _refs(seed):
    from idforge.methods.types import IdentityRefs

    g = torch.Generator().manual_seed(seed)
    return IdentityRefs(wplus_pixels=torch.rand(2, 3, 64, 64, generator=g) * 2 - 1)


def test_refuses_without_e4e_weights(pipe, tmp_path):
    from idforge.methods.pidiff import PIDiff

    with pytest.raises(ConfigError, match=r"download e4e_ffhq_encode\.pt .*encoder_path="):
        PIDiff.from_config({}).attach(pipe)
    with pytest.raises(ConfigError, match=r"encoder_path .*absent\.pt does not exist"):
        PIDiff.from_config({"encoder_path": str(tmp_path / "absent.pt")}).attach(pipe)
    before = dict(pipe.unet.attn_processors)
    m = PIDiff.from_config({})
    with pytest.raises(ConfigError):
        m.attach(pipe)
    assert not m.is_attached and dict(pipe.unet.attn_processors) == before  # nothing installed


def test_paper_defaults_and_pseudo_word():
    from idforge.methods.pidiff import PIDiff

    cfg = PIDiff.Config()
    assert (cfg.scale, cfg.visual_dropout, cfg.text_dropout) == (0.4, 0.5, 0.3)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.steps) == (1e-4, 0.01, 4, 600)
    m = PIDiff(cfg)
    assert m.prompt("an image of {}", "man") == "an image of sks"  # S* replaces the class noun (§2.2.1)
    assert "an image of {}" in cfg.templates


def test_trainable_parameters_at_sd15_shape_match_table_8(tiny_e4e_checkpoint):
    """On the real SD1.5 UNet (meta device): 16 SCA layers, q/k/v + F = 38.64 M (Table 8: 38.5 M), no to_out."""
    from types import SimpleNamespace

    from idforge.methods.pidiff import PIDiff
    from tests.fixtures.unet_layouts import meta_unet

    unet = meta_unet("sd15")
    m = PIDiff.from_config({"encoder_path": str(tiny_e4e_checkpoint)})
    m.build(SimpleNamespace(unet=unet))
    sca = m.modules["sca"]
    assert len(sca) == 16
    assert all(set(dict(layer.named_children())) == {"to_q", "to_k", "to_v"} for layer in sca.values())
    n_sca = sum(p.numel() for p in sca.parameters())
    n_map = sum(p.numel() for p in m.modules["mapping"].parameters())
    widths = [320] * 5 + [640] * 5 + [1280] * 6
    assert n_sca == sum(c * c + 2 * 768 * c for c in widths) == 31_559_680
    assert n_map == 3 * (2048 * 768 + 768) + (3072 * 768 + 768) + 2 * 768 == 7_082_496
    total = m.num_trainable_parameters()
    assert total == n_sca + n_map and abs(total - 38.5e6) / 38.5e6 < 0.005
    assert tuple(m.modules["mapping"](torch.zeros(1, 18, 512, device="meta")).shape) == (1, 4, 768)


def test_only_sca_qkv_and_mapping_train_and_loss_falls(pipe, make):
    m = make(visual_dropout=0.0, text_dropout=0.0, wplus_noise=0.0)
    m.attach(pipe)
    attn = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    key = "down_blocks_0_attentions_0_transformer_blocks_0_attn2"
    sca = m.modules["sca"][key]
    for name in ("to_q", "to_k", "to_v"):  # SCA q/k/v start as the text cross-attention's
        assert torch.equal(getattr(sca, name).weight, getattr(attn, name).weight)
    enc_before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    trainable = {n.split(".")[0] for n, p in m.modules.named_parameters() if p.requires_grad}
    assert trainable == {"mapping", "sca"}
    init = state_copy(m)
    first, last = train_steps(m, pipe, fixed_batch(pipe, m), steps=10, lr=1e-3)
    assert last < first
    after = m.state_dict()
    assert not torch.equal(init["mapping.proj.3.weight"], after["mapping.proj.3.weight"])
    assert not torch.equal(init[f"sca.{key}.to_k.weight"], after[f"sca.{key}.to_k.weight"])
    assert not any("to_out" in k for k in after)  # SCA's output projection is the frozen text one
    assert all(torch.equal(v, m.encoder.state_dict()[k]) for k, v in enc_before.items())  # W+ encoder frozen
    m.detach()


def test_style_mixing_takes_coarse_layers_from_one_identity_and_fine_from_another(pipe, make):
    from idforge.methods.pidiff import mix_wplus

    m = make()
    m.attach(pipe)
    m.eval()
    cond_a, cond_b = m.identity_condition(_refs(0), pipe), m.identity_condition(_refs(1), pipe)
    mixed = m.style_mix(cond_a, cond_b)
    w = mixed.tensors["wplus"]
    assert torch.equal(w[:, :7], cond_a.tensors["wplus"][:, :7])
    assert torch.equal(w[:, 7:], cond_b.tensors["wplus"][:, 7:])
    assert torch.equal(mix_wplus(cond_a.tensors["wplus"], cond_b.tensors["wplus"], 0), cond_b.tensors["wplus"])
    kw = {"num_inference_steps": 2, "seeds": [0]}
    img_b = m.generate(pipe, ["a photo of a person"], cond_b, **kw)[0]
    img_mixed = m.generate(pipe, ["a photo of a person"], mixed, **kw)[0]
    assert list(img_b.getdata()) != list(img_mixed.getdata())
    m.set_scale(0.0)
    img_zero = m.generate(pipe, ["a photo of a person"], mixed, **kw)[0]
    assert list(img_zero.getdata()) == list(m.generate(pipe, ["a photo of a person"], cond_b, **kw)[0].getdata())
    m.detach()


def test_generation_without_matted_refs_uses_the_trained_identity(pipe, make):
    """References without wplus_pixels (e.g. generate's 112 crops) fall back to the stored w+, never to e4e on a
    112 crop."""
    from idforge.methods.types import IdentityRefs

    m = make()
    m.attach(pipe)
    m.prepare_identity(_refs(0), pipe)
    stored = m.sample_condition(pipe).tensors["wplus"]
    crops_only = IdentityRefs(face_crops=torch.rand(1, 3, 112, 112))
    assert torch.equal(m.identity_condition(crops_only, pipe).tensors["wplus"], stored)
    with pytest.raises(ValueError, match="wplus_pixels"):
        m.prepare_identity(crops_only, pipe)
    m.detach()
