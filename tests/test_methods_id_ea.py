"""ID-EA as released: Cross-Init from the name list, one gated self-attention adapter on the text-encoder output,
the Mahalanobis regulariser, the release's recipe, and inference with only the two learned embeddings.
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
    return IdentityRefs(face_embeds=torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1))


def test_release_recipe_and_packaged_resources():
    from idforge.methods.id_ea import read_anchor_names, release_templates

    cfg = _method().config
    r = cfg.train
    assert (cfg.num_tokens, r.steps, r.batch_size, r.lr, r.scale_lr, r.weight_decay, r.eps, r.flip_prob,
            r.max_images) == (2, 320, 8, 0.0015, True, 1e-2, 1e-7, 0.5, 1)
    assert (cfg.reg_weight, cfg.reg_ridge, cfg.adapter_beta, cfg.heads, cfg.adapter_at_inference) \
        == (8e-4, 2e-5, 0.4, 8, False)
    names = read_anchor_names()  # package data: found wherever idforge is installed
    assert len(names) == 691 and names[0] == "Adam Sandler"
    templates = release_templates()
    assert len(templates) == 81 and templates[0] == "a photo of a face of {} person" == cfg.templates[0]
    assert all(t.count("{}") == 1 for t in templates)
    with pytest.raises(ValueError, match="does not exist"):
        read_anchor_names("/nonexistent/names.txt")


def test_cross_init_is_the_encoders_output_at_the_name_token_positions(pipe, tmp_path):
    from idforge.diffusion.text import encode_ids
    from idforge.methods.id_ea import cross_init, read_anchor_names
    from idforge.methods.personalized import PlaceholderTokens

    tok = pipe.tokenizer
    (tmp_path / "one.txt").write_text("# one two-token name\nBarack Obama\n")
    words = tok("Barack Obama", add_special_tokens=False).input_ids
    assert len(words) == 2
    tokens = PlaceholderTokens(["<x-0>", "<x-1>"])
    got = cross_init(pipe, tokens, read_anchor_names(tmp_path / "one.txt"))
    # One name: the column means ARE its token embeddings, so Cross-Init equals encoding the name itself.
    ids = [tok.bos_token_id, *words, tok.eos_token_id]
    ids += [tok.pad_token_id] * (tok.model_max_length - len(ids))
    with torch.no_grad():
        want = encode_ids(pipe, torch.tensor([ids])).hidden[0, 1:3]
    torch.testing.assert_close(got, want)
    table = pipe.text_encoder.get_input_embeddings().weight
    assert not torch.allclose(got, table[words].float())  # output states, not the input embeddings
    # A one-token name only adds to column 0; the 2nd column averages the names that have a 2nd token.
    (tmp_path / "two.txt").write_text("Barack Obama\nTom\n")
    mixed = cross_init(pipe, PlaceholderTokens(["<y-0>", "<y-1>"]), read_anchor_names(tmp_path / "two.txt"))
    assert not torch.allclose(mixed, got)
    with pytest.raises(ValueError, match="no anchor name has 3 tokens"):
        cross_init(pipe, PlaceholderTokens(["<z-0>", "<z-1>", "<z-2>"]), ["Tom"])


def test_adapter_acts_once_on_the_text_output_and_starts_as_identity(pipe):
    from idforge.methods.id_ea import IDAdapter

    m = _method()
    original = dict(pipe.unet.attn_processors)
    m.attach(pipe)
    assert m.processors == {}  # no per-layer branch: the UNet's attention is untouched
    assert all(pipe.unet.attn_processors[k] is v for k, v in original.items())
    m.detach()

    g = torch.Generator().manual_seed(0)
    adapter = IDAdapter(32, 8, 0.4)
    text, fused = torch.randn(2, 77, 32, generator=g), torch.randn(2, 2, 64, generator=g)
    assert torch.equal(adapter(text, fused), text)  # gamma = 0: an untrained adapter changes nothing
    with torch.no_grad():
        adapter.gate.fill_(0.7)
    out = adapter(text, fused)
    x = torch.cat([text, adapter.fc1(fused)], 1)
    s = adapter.attn(x, x, x, need_weights=False)[0][:, :77]
    torch.testing.assert_close(out, text + 0.4 * torch.tanh(torch.tensor(0.7)) * s)
    assert out.shape == (2, 77, 32)
    assert not torch.allclose(adapter(text, fused + 1), out)  # the identity tokens reach every text token


def test_mahalanobis_to_the_initial_embeddings():
    from idforge.methods.id_ea import mahalanobis, mahalanobis_precision

    g = torch.Generator().manual_seed(0)
    init = torch.randn(2, 16, generator=g)
    p = mahalanobis_precision(init, 2e-5)
    want = torch.linalg.pinv(torch.cov(init.double().T) + 2e-5 * torch.eye(16, dtype=torch.float64)).float()
    torch.testing.assert_close(p, want, rtol=1e-4, atol=1e-2)
    x = init.clone().requires_grad_(True)
    zero = mahalanobis(x, init, p)
    zero.backward()
    assert float(zero.detach()) == pytest.approx(0.0, abs=1e-5) and float(x.grad.abs().max()) == 0.0
    along = init + 0.1 * (init[0] - init[1]) / (init[0] - init[1]).norm()  # the direction the two inits span
    ortho_dir = torch.randn(16, generator=g)
    d = init[0] - init[1]
    ortho_dir = ortho_dir - (ortho_dir @ d) / (d @ d) * d
    ortho = init + 0.1 * ortho_dir / ortho_dir.norm()
    # rank-1 covariance plus a small ridge: drift along the inits' difference is cheap, drift off it costs
    # about |delta| / sqrt(ridge) = 0.1 * 223.6
    assert float(mahalanobis(ortho, init, p)) == pytest.approx(0.1 / 2e-5 ** 0.5, rel=1e-2)
    assert float(mahalanobis(along, init, p)) < 0.01 * float(mahalanobis(ortho, init, p))


def test_tokens_adapter_and_enhancer_train(pipe):
    m = _method()
    m.attach(pipe)
    m.prepare_identity(_refs(0), pipe)
    assert torch.equal(m.vectors, m._init)  # the tokens start at their Cross-Init embeddings
    enh = {k: v.detach().clone() for k, v in m.enhancer.state_dict().items()}
    init = state_copy(m)
    assert list(init) == ["embeds.vectors"]  # as released: the artifact is the two embeddings
    names = {id(p) for p in m.trainable_parameters()}
    assert all(id(p) in names for p in [*m.enhancer.parameters(), *m.adapter.parameters()])
    batch = fixed_batch(pipe, m)
    with torch.no_grad():
        parts = m.training_loss(batch, pipe)
    assert float(parts["reg"]) == pytest.approx(0.0, abs=1e-5)
    first, last = train_steps(m, pipe, batch, steps=15, lr=0.02)
    assert last < first
    assert not torch.equal(init["embeds.vectors"], m.vectors)
    assert float(m.adapter.gate.detach()) != 0.0
    # The Enhancer is optimised (the release's never is): its weights moved.
    assert any(not torch.equal(v, m.enhancer.state_dict()[k]) for k, v in enh.items())
    with torch.no_grad():
        assert float(m.training_loss(batch, pipe)["reg"]) > 0
    m.detach()


def test_inference_uses_only_the_embeddings(pipe, tmp_path):
    from safetensors import safe_open

    m = _method()
    m.attach(pipe)
    m.prepare_identity(_refs(0), pipe)
    with torch.no_grad():
        m.vectors.add_(torch.randn_like(m.vectors))
        m.adapter.gate.fill_(0.5)  # a trained adapter: not used when sampling, as released
    prompt = m.config.sample_prompt.format(m.identity_phrase())
    assert prompt == "<idea-0> <idea-1> wearing an oversized sweater"
    text = m.encode_prompts(pipe, [prompt], m.sample_condition(pipe))
    torch.testing.assert_close(text.hidden, m.tokens.encode(pipe, [prompt], m.vectors).hidden)
    m.save_artifact(tmp_path / "a")
    m.detach()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["artifact.json", "learned_embeds.safetensors"]
    with safe_open(str(tmp_path / "a" / "learned_embeds.safetensors"), framework="pt") as fh:
        assert list(fh.keys()) == ["embeds.vectors"]


def test_adapter_at_inference_saves_adapter_and_fused_tokens(pipe, tmp_path):
    from safetensors import safe_open

    from idforge.methods.personalized import load_artifact

    m = _method(adapter_at_inference=True)
    m.attach(pipe)
    m.prepare_identity(_refs(0), pipe)
    with torch.no_grad():
        m.adapter.gate.fill_(0.5)
    train_steps(m, pipe, fixed_batch(pipe, m), steps=1, lr=0.01)  # fills id_tokens from the identity's face
    assert float(m.modules["id_tokens"].tokens.abs().sum()) > 0
    prompt = m.config.sample_prompt.format(m.identity_phrase())
    plain = m.tokens.encode(pipe, [prompt], m.vectors).hidden
    assert not torch.allclose(m.encode_prompts(pipe, [prompt], m.sample_condition(pipe)).hidden, plain)
    images = m.generate(pipe, [prompt], m.sample_condition(pipe), num_inference_steps=2, seeds=[1])
    m.save_artifact(tmp_path / "b")
    m.detach()
    with safe_open(str(tmp_path / "b" / "learned_embeds.safetensors"), framework="pt") as fh:
        assert {k.split(".")[0] for k in fh.keys()} == {"embeds", "adapter", "id_tokens"}
    loaded, _ = load_artifact(tmp_path / "b", pipe)
    again = loaded.generate(pipe, [prompt], loaded.sample_condition(pipe), num_inference_steps=2, seeds=[1])
    assert list(images[0].getdata()) == list(again[0].getdata())
    loaded.detach()


def test_preset_is_the_release_and_modules_have_its_shapes():
    from idforge.config import load_config
    from idforge.methods.id_ea import IDAdapter, IDEnhancer

    cfg = load_config(preset="id-ea")
    assert cfg.model.base == "stabilityai/stable-diffusion-2-1-base"
    assert (cfg.finetune.resolution, cfg.finetune.sample_steps, cfg.generate.num_inference_steps) == (512, 50, 50)
    assert _method(**cfg.finetune.method_config).config == _method().config  # the defaults are the release's
    # SD2.1-base text width 1024 ([T] l.66-91, 209-241): fc1 2048->1024 + MHA(1024); the Enhancer's 512->1024,
    # q and kv 1024->1024, MHA(1024), 1024->2048.
    mha = 4 * 1024 * 1024 + 4 * 1024
    assert sum(p.numel() for p in IDAdapter(1024, 8, 0.4).parameters()) == 2048 * 1024 + 1024 + mha + 1
    assert sum(p.numel() for p in IDEnhancer(512, 1024, 8).parameters()) \
        == 512 * 1024 + 1024 + 2 * (1024 * 1024 + 1024) + mha + 1024 * 2048 + 2048
