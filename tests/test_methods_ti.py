"""Textual Inversion: only the token vectors train and the loss falls; diffusers' loader reads the export. The
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
    from idforge.methods.textual_inversion import TextualInversion

    return TextualInversion.from_config(cfg)


def test_only_token_vectors_train_and_loss_falls(pipe):
    m = _method(num_tokens=2)
    m.attach(pipe)
    assert m.identity_phrase() == "<idf-0> <idf-1>"
    init = state_copy(m)
    first, last = train_steps(m, pipe, fixed_batch(pipe, m), steps=15, lr=0.05)
    assert last < first
    assert [n for n, _ in m.modules.named_parameters()] == ["embeds.vectors"]
    assert not torch.equal(init["embeds.vectors"], m.state_dict()["embeds.vectors"])
    m.detach()


def test_diffusers_loader_reads_the_export(pipe, tiny_sd15_dir, tmp_path):
    from idforge.diffusion.loading import load_pipeline
    from idforge.methods.personalized import load_artifact

    m = _method()
    m.attach(pipe)
    with torch.no_grad():
        m.vectors.add_(torch.randn_like(m.vectors))
    m.save_artifact(tmp_path / "a")
    m.detach()

    loaded, meta = load_artifact(tmp_path / "a", pipe)
    assert meta["identity_phrase"] == "<idf>" and meta["placeholders"] == ["<idf>"]
    ours = loaded.encode_prompts(pipe, ["a photo of <idf>"], loaded.sample_condition(pipe)).hidden
    loaded.detach()

    fresh = load_pipeline(tiny_sd15_dir)
    fresh.load_textual_inversion(str(tmp_path / "a" / "learned_embeds.safetensors"))
    ids = fresh.tokenizer(["a photo of <idf>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = fresh.text_encoder(ids)[0]
    torch.testing.assert_close(ours, theirs)


def test_untrained_identity_off_is_the_init_word(pipe):
    """Without the identity (cond None) the placeholder encodes as the init word, not as garbage ids."""
    from idforge.diffusion.text import encode_prompts

    m = _method(init_word="person")
    m.attach(pipe)
    off = m.encode_prompts(pipe, ["a photo of <idf>"], None).hidden
    m.detach()
    torch.testing.assert_close(off, encode_prompts(pipe, ["a photo of person"]).hidden)


def test_pseudo_tokens_refuse_two_text_encoder_pipelines_clearly():
    from types import SimpleNamespace

    from idforge.errors import ConfigError

    sdxl_like = SimpleNamespace(text_encoder_2=object(), tokenizer=None, text_encoder=None)
    with pytest.raises(ConfigError, match="use dreambooth-lora or pidiff for SDXL"):
        _method().tokens.install(sdxl_like)
