"""The Method interface's shared pieces: registry, data classes (methods.types), the diffusion objective
(methods.objective), checkpoints (methods.checkpoint)."""

from __future__ import annotations

import pytest
import torch

from idforge.errors import ConfigError
from idforge.methods.base import Method, check_state_keys
from idforge.methods.checkpoint import read_method_metadata, save_method
from idforge.methods.objective import diffusion_loss, predict_x0, sample_timesteps
from idforge.methods.registry import available_methods, get_method
from idforge.methods.sampling import SamplingConfig
from idforge.methods.types import Condition, IdentityRefs, TrainBatch


def test_registry_lists_and_builds_methods_with_typed_configs():
    names = available_methods()
    assert {"id-adapter", "infinite-id"} <= set(names)
    m = get_method("infinite-id", {"mixed_attention": False}, adain_mean=False)
    assert m.name == "infinite-id" and m.regime == "population"
    assert m.config.mixed_attention is False and m.config.adain_mean is False and m.config.cross_attention_merging
    assert isinstance(m, Method)
    with pytest.raises(ConfigError, match="did you mean 'infinite-id'"):
        get_method("infinite_id")
    with pytest.raises(ConfigError, match="mixed_atention"):
        get_method("infinite-id", mixed_atention=False)
    with pytest.raises(ConfigError, match="mff_dim"):
        get_method("id-adapter", mff_dim="big")


def test_every_listed_method_resolves_in_a_fresh_interpreter():
    """A checkpoint names its method; load_method must find it without the caller importing anything first."""
    import subprocess
    import sys

    code = ("from idforge.methods import available_methods, method_class\n"
            "for n in available_methods():\n"
            "    c = method_class(n)\n"
            "    assert c.name == n and c.regime in ('population', 'per-identity'), n\n"
            "print(len(available_methods()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) >= 7


def test_train_batch_from_dict_to_and_require():
    d = {"latents": torch.zeros(2, 4, 8, 8), "input_ids": torch.ones(2, 77, dtype=torch.long), "caption": ["a", "b"]}
    b = TrainBatch.from_dict(d)
    assert b.batch_size == 2 and b.face_embeds is None
    h = b.to(dtype=torch.float16)
    assert h.latents.dtype == torch.float16 and h.input_ids.dtype == torch.long
    with pytest.raises(ValueError, match="face_embeds, clip_patch_tokens"):
        b.require("latents", "face_embeds", "clip_patch_tokens")
    with pytest.raises(ValueError, match="latents"):
        TrainBatch.from_dict({"input_ids": d["input_ids"]})
    other = TrainBatch(latents=torch.ones(2, 4, 8, 8), face_embeds=torch.ones(2, 1, 512),
                         identity=torch.tensor([7, 8]))
    mixed = b.with_identity_of(other)
    assert torch.equal(mixed.latents, b.latents) and torch.equal(mixed.identity, other.identity)


def test_identity_refs_check_their_reference_counts():
    refs = IdentityRefs(face_embeds=torch.zeros(3, 512), clip_patch_tokens=torch.zeros(3, 17, 32))
    assert refs.num_refs == 3
    with pytest.raises(ValueError, match="disagree"):
        IdentityRefs(face_embeds=torch.zeros(3, 512), clip_patch_tokens=torch.zeros(2, 17, 32))
    with pytest.raises(ValueError, match="at least one"):
        IdentityRefs()
    with pytest.raises(ValueError, match="clip_patch_tokens"):
        IdentityRefs(face_embeds=torch.zeros(1, 512)).require("face_embeds", "clip_patch_tokens")


def test_condition_expand_cat_zeros():
    c = Condition("x", {"tokens": torch.ones(1, 4, 8)}, {"class_noun": "man"})
    e = c.expand(3)
    assert e.batch_size == 3 and torch.equal(e.tensors["tokens"][2], c.tensors["tokens"][0])
    z = c.zeros_like()
    assert z.tensors["tokens"].abs().sum() == 0 and z.meta == c.meta
    assert Condition.cat([z, c]).batch_size == 2
    with pytest.raises(ValueError, match="cannot expand"):
        e.expand(2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_targets_and_x0(prediction_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 300, 999])
    expected = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    # An oracle that predicts the right target has zero loss and recovers x0 exactly.
    out = diffusion_loss(lambda x, ts: expected, x0, sched, noise=noise, timesteps=t)
    assert float(out.loss) == 0.0
    assert torch.equal(out.target, expected) and torch.equal(out.noisy_latents, sched.add_noise(x0, noise, t))
    torch.testing.assert_close(predict_x0(sched, out.noisy_latents, out.model_pred, t), x0, atol=2e-4, rtol=1e-4)
    wrong = diffusion_loss(lambda x, ts: expected + 1.0, x0, sched, noise=noise, timesteps=t)
    assert float(wrong.loss) == pytest.approx(1.0)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, :4] = 1
    half = diffusion_loss(lambda x, ts: expected + (torch.arange(8) >= 4).float().view(1, 1, 8, 1), x0, sched,
                            noise=noise, timesteps=t, mask=mask)
    assert float(half.loss) == 0.0  # the error lies outside the mask


def test_sample_timesteps_window_and_seeded():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    t = sample_timesteps(sched, 500, generator=torch.Generator().manual_seed(0), t_min=100, t_max=200)
    assert t.dtype == torch.long and int(t.min()) >= 100 and int(t.max()) < 200
    t2 = sample_timesteps(sched, 500, generator=torch.Generator().manual_seed(0), t_min=100, t_max=200)
    assert torch.equal(t, t2)
    with pytest.raises(ValueError, match="empty"):
        sample_timesteps(sched, 2, t_min=5, t_max=5)


def test_check_state_keys_names_offenders():
    expected = {"a.w": torch.zeros(2), "b.w": torch.zeros(3)}
    check_state_keys(expected, {"a.w": torch.ones(2), "b.w": torch.ones(3)})
    with pytest.raises(ValueError) as err:
        check_state_keys(expected, {"a.w": torch.zeros(5), "c.w": torch.zeros(1)}, source="ckpt.safetensors")
    msg = str(err.value)
    assert "ckpt.safetensors" in msg and "missing keys [b.w]" in msg and "unexpected keys [c.w]" in msg
    assert "a.w: expected (2,), got (5,)" in msg


def test_sampling_config_rejects_typos():
    assert SamplingConfig(seeds=[1, 2]).seeds == [1, 2]
    with pytest.raises(Exception, match="num_inference_step"):
        SamplingConfig.model_validate({"num_inference_step": 3})


def test_read_metadata_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an idforge method checkpoint"):
        read_method_metadata(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_method_metadata(tmp_path / "missing.safetensors")


def test_checkpoint_metadata_and_description(tmp_path, tiny_sd15_dir):
    from safetensors.torch import load_file

    from idforge.methods.testing import load_frozen_pipeline

    pipe = load_frozen_pipeline(tiny_sd15_dir)
    m = get_method("infinite-id", clip_dim=32, mixed_attention=False)
    with pytest.raises(ValueError, match="attach it"):
        save_method(m, tmp_path / "early.safetensors")
    m.attach(pipe)
    try:
        path = save_method(m, tmp_path / "m.safetensors")
        meta = read_method_metadata(path)
        assert meta["method"] == "infinite-id" and meta["config"]["mixed_attention"] is False
        assert meta["unet"]["cross_attention_dim"] == 32
        sd = load_file(str(path))
        assert {k.split(".")[0] for k in sd} == {"face_mapper", "clip_mapper", "image_attn"}
        from idforge.methods.describe import describe_checkpoint

        text = describe_checkpoint(path)
        n_attn = sum(v.numel() for k, v in sd.items() if k.startswith("image_attn."))
        assert "method: infinite-id" in text and f"image_attn: {n_attn:,} parameters" in text
        with pytest.raises(ValueError, match="already attached"):
            m.attach(pipe)
    finally:
        m.detach()


def test_describe_lists_methods_and_config_keys():
    from idforge.methods.describe import config_table, describe_method, method_summaries

    rows = {r["name"]: r for r in method_summaries()}
    assert rows["infinite-id"]["regime"] == "population" and rows["id-adapter"]["summary"].startswith("IDAdapter")
    table = {r["key"]: r for r in config_table("infinite-id")}
    assert table["mixed_attention"]["default"] is True and table["scale"]["default"] == 1.0
    assert "  adain_mean: false (bool)" in describe_method("infinite-id")
