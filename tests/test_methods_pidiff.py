"""PIDiff: W+ encoder + loader, SCA initialised from text cross-attention, style mixing. The contract every method
keeps (lambda = scale 0 is the base model, round trips, ...) is in test_methods_contract.py."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.dataset import fixed_batch, state_copy, train_steps

SMALL = {"encoder_image_size": 64, "encoder_width": 8, "mapping_hidden": 64}


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir, one_torch_thread):
    from idforge.diffusion.loading import load_pipeline

    return load_pipeline(tiny_sd15_dir)


def _method(**cfg):
    from idforge.methods.pidiff import PIDiff

    return PIDiff.from_config({**SMALL, **cfg})


def _refs(seed):
    from idforge.methods.types import IdentityRefs

    g = torch.Generator().manual_seed(seed)
    return IdentityRefs(face_crops=torch.rand(2, 3, 112, 112, generator=g))


def test_wplus_encoder_shapes_and_checkpoint_loader(tmp_path, one_torch_thread):
    from safetensors.torch import save_file

    from idforge.methods.wplus_encoder import load_wplus_encoder

    enc = load_wplus_encoder(None, image_size=64, width=8)
    w = enc(torch.rand(2, 3, 112, 112))
    assert w.shape == (2, 18, 512)
    assert torch.equal(load_wplus_encoder(None, image_size=64, width=8).state_dict()["stem.0.weight"],
                       enc.state_dict()["stem.0.weight"])  # seeded random init: same encoder in every process
    sd = {f"encoder.{k}": v + 1 if v.is_floating_point() else v for k, v in enc.state_dict().items()}
    save_file(sd, str(tmp_path / "e4e.safetensors"))
    loaded = load_wplus_encoder(tmp_path / "e4e.safetensors", image_size=64, width=8)
    assert torch.equal(loaded.state_dict()["stem.0.weight"], enc.state_dict()["stem.0.weight"] + 1)
    save_file({"stem.0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        load_wplus_encoder(tmp_path / "bad.safetensors", image_size=64, width=8)
    with pytest.raises(FileNotFoundError, match="encoder_path"):
        load_wplus_encoder(tmp_path / "absent.pt")


def test_paper_defaults():
    from idforge.methods.pidiff import PIDiff

    cfg = PIDiff.Config()
    assert (cfg.scale, cfg.num_tokens, cfg.visual_dropout, cfg.text_dropout) == (0.4, 4, 0.5, 0.3)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.steps) == (1e-4, 0.01, 4, 600)


def test_only_sca_and_mapping_train_and_loss_falls(pipe):
    m = _method(visual_dropout=0.0, text_dropout=0.0, wplus_noise=0.0)
    m.attach(pipe)
    attn = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    sca = m.modules["sca"]["down_blocks_0_attentions_0_transformer_blocks_0_attn2"]
    for name in ("to_q", "to_k", "to_v"):  # SCA q/k/v start as the text cross-attention's
        assert torch.equal(getattr(sca, name).weight, getattr(attn, name).weight)
    enc_before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    trainable = {n.split(".")[0] for n, p in m.modules.named_parameters() if p.requires_grad}
    assert trainable == {"mapping", "sca"}
    init = state_copy(m)
    first, last = train_steps(m, pipe, fixed_batch(pipe, m), steps=10, lr=1e-3)
    assert last < first
    after = m.state_dict()
    assert not torch.equal(init["mapping.fc2.weight"], after["mapping.fc2.weight"])
    assert all(torch.equal(v, m.encoder.state_dict()[k]) for k, v in enc_before.items())  # W+ encoder frozen
    m.detach()


def test_style_mixing_takes_coarse_layers_from_one_identity_and_fine_from_another(pipe):
    from idforge.methods.pidiff import mix_wplus

    m = _method()
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
    m.set_scale(0.0)
    assert list(img_zero.getdata()) == list(m.generate(pipe, ["a photo of a person"], cond_b, **kw)[0].getdata())
    m.detach()
