"""ID-EA: pseudo-tokens from the ID-Enhancer, the gated ID-Adapter on cross-attention k/v, what the artifact holds.
The contract every method keeps is in test_methods_contract.py."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.dataset import fixed_batch, state_copy, train_steps


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir, one_torch_thread):
    from idforge.diffusion.loading import load_pipeline

    return load_pipeline(tiny_sd15_dir)


def _method(**cfg):
    from idforge.methods.id_ea import IDEA

    return IDEA.from_config(cfg)


def _refs(seed=0):
    from idforge.methods.types import IdentityRefs

    g = torch.Generator().manual_seed(seed)
    return IdentityRefs(face_embeds=torch.nn.functional.normalize(torch.randn(3, 512, generator=g), dim=-1))


def test_paper_defaults_and_anchor_file():
    from idforge.methods.id_ea import read_anchor_names

    cfg = _method().config
    assert (cfg.num_tokens, cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.scale_lr, cfg.reg_weight) \
        == (2, 320, 8, 0.0015, True, 8e-4)
    assert len(read_anchor_names()) >= 20
    with pytest.raises(ValueError, match="does not exist"):
        read_anchor_names("/nonexistent/names.txt")


def test_identity_initialises_tokens_and_only_method_weights_train(pipe):
    m = _method()
    m.attach(pipe)
    anchor = m.enhancer.anchor.clone()
    m.prepare_identity(_refs(0), pipe)
    v0 = m.vectors.detach().clone()
    assert not torch.allclose(v0, anchor.expand_as(v0))  # the face moved the tokens off the name anchor
    m.prepare_identity(_refs(1), pipe)
    assert not torch.allclose(m.vectors, v0)  # another face, other tokens
    init = state_copy(m)
    gate_before = {k: v for k, v in init.items() if k.endswith("gate")}
    first, last = train_steps(m, pipe, fixed_batch(pipe, m), steps=15, lr=0.02)
    assert last < first
    after = m.state_dict()
    assert not torch.equal(init["embeds.vectors"], after["embeds.vectors"])
    assert any(not torch.equal(v, after[k]) for k, v in gate_before.items())
    m.detach()


def test_artifact_holds_only_embeds_adapter_and_id_tokens(pipe, tmp_path):
    from safetensors import safe_open

    m = _method()
    m.attach(pipe)
    m.prepare_identity(_refs(0), pipe)
    assert m.config.sample_prompt.format(m.identity_phrase()) == "<idea-0> <idea-1> wearing an oversized sweater"
    m.save_artifact(tmp_path / "a")
    m.detach()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["artifact.json", "learned_embeds.safetensors"]
    with safe_open(str(tmp_path / "a" / "learned_embeds.safetensors"), framework="pt") as fh:
        prefixes = {k.split(".")[0] for k in fh.keys()}
    assert prefixes == {"embeds", "adapter", "id_tokens"}
