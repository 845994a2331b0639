"""A long-lived worker (``BaseWorker``): the base is loaded once, every per-identity method leaves it bit for bit
as loaded after each identity (done or failed), and an identity trained after another equals it trained alone."""

from __future__ import annotations

from pathlib import Path

import pytest

METHODS = ["dreambooth-lora", "id-ea", "pidiff", "sefi-ide", "textual-inversion"]


def _off():
    from idforge.config import TrackingConfig

    return TrackingConfig(enabled=False)




def test_the_parametrized_methods_are_every_per_identity_method():
    from idforge.methods.personalized import register_per_identity_methods

    assert sorted(METHODS) == register_per_identity_methods()


def _cfg(method: str, e4e: Path):
    from idforge.train.finetune_config import FinetuneConfig

    small = {"pidiff": {"encoder_path": str(e4e), "encoder_image_size": 64}}
    return FinetuneConfig(method_config=small.get(method, {}), steps=2, batch_size=2, sample_steps=1,
                          sample_seeds=[0], num_threads=1, device="cpu")


def _assert_base_as_loaded(pipe, fresh) -> None:
    """Every tensor, flag, processor class, hook and tokenizer entry of ``pipe`` equals a freshly loaded one."""
    import torch

    for name in ("unet", "text_encoder", "vae"):
        got, want = getattr(pipe, name), getattr(fresh, name)
        got_sd, want_sd = got.state_dict(), want.state_dict()
        assert got_sd.keys() == want_sd.keys(), f"{name}: {sorted(set(got_sd) ^ set(want_sd))[:5]}"
        for key, value in want_sd.items():
            assert torch.equal(got_sd[key], value), f"{name}.{key} differs"
        assert [type(m) for m in got.modules()] == [type(m) for m in want.modules()], name
        assert not any(p.requires_grad for p in got.parameters()) and not got.training, name
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in got.modules()), name
    assert ({k: type(v) for k, v in pipe.unet.attn_processors.items()}
            == {k: type(v) for k, v in fresh.unet.attn_processors.items()})
    assert pipe.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()
    assert len(pipe.tokenizer) == len(fresh.tokenizer)


def _artifact_bytes(root: Path) -> dict[str, object]:
    """Every file of an artifact but finetune.json (it records wall times and the run id): the bytes, and for a
    safetensors file its tensors' bytes and its metadata (the header's key order is not stable across writes)."""
    from safetensors import safe_open

    files: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == "finetune.json":
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                files[p.relative_to(root).as_posix()] = (
                    f.metadata(), {k: (str(t.dtype), tuple(t.shape), t.numpy().tobytes())
                                   for k in sorted(f.keys()) for t in [f.get_tensor(k)]})
        else:
            files[p.relative_to(root).as_posix()] = p.read_bytes()
    assert "DONE" in files and any(k.endswith(".safetensors") for k in files), sorted(files)
    return files


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_base_is_restored_and_an_identity_after_another_equals_it_alone(method, curated_tiny_dataset, tiny_sd15_dir,
                                                                        tiny_e4e_checkpoint, tmp_path,
                                                                        one_torch_thread):
    from idforge.diffusion.loading import freeze_pipeline, load_pipeline
    from idforge.train.identity_worker import BaseWorker

    cfg = _cfg(method, tiny_e4e_checkpoint)
    fresh = freeze_pipeline(load_pipeline(tiny_sd15_dir))

    shared = BaseWorker(tiny_sd15_dir, cfg)
    a = shared.finetune(method, "id01", curated_tiny_dataset, tmp_path / "shared", tracking=_off())
    assert a.status == "done" and a.timings["restore"] >= 0
    _assert_base_as_loaded(shared.pipe, fresh)
    b = shared.finetune(method, "id00", curated_tiny_dataset, tmp_path / "shared", tracking=_off())
    _assert_base_as_loaded(shared.pipe, fresh)
    assert shared.identities_done == 2

    alone = BaseWorker(tiny_sd15_dir, cfg).finetune(method, "id00", curated_tiny_dataset, tmp_path / "alone",
                                                    tracking=_off())
    assert b.status == alone.status == "done"
    assert b.final_loss == alone.final_loss
    assert _artifact_bytes(Path(b.artifact_dir)) == _artifact_bytes(Path(alone.artifact_dir))
    # and the two identities did learn different things (the comparison above is not between constants)
    assert _artifact_bytes(Path(a.artifact_dir)) != _artifact_bytes(Path(b.artifact_dir))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dreambooth-lora", "id-ea"])
def test_an_identity_failing_mid_training_leaves_the_base_restored(method, curated_tiny_dataset, tiny_sd15_dir,
                                                                   tiny_e4e_checkpoint, tmp_path, monkeypatch,
                                                                   one_torch_thread):
    """The method is attached (LoRA layers injected / processors installed) when the step raises: detach never
    runs, the worker's restore must undo it, and the next identity is unaffected."""
    from idforge.diffusion.loading import freeze_pipeline, load_pipeline
    from idforge.methods.registry import method_class
    from idforge.train.identity_worker import BaseWorker

    cfg = _cfg(method, tiny_e4e_checkpoint)
    fresh = freeze_pipeline(load_pipeline(tiny_sd15_dir))
    worker = BaseWorker(tiny_sd15_dir, cfg)
    cls = method_class(method)

    def broken(self, batch, pipe, **kw):
        raise RuntimeError("injected failure in the training step")

    with monkeypatch.context() as m:
        m.setattr(cls, "training_loss", broken)
        with pytest.raises(RuntimeError, match="injected failure"):
            worker.finetune(method, "id01", curated_tiny_dataset, tmp_path / "shared", tracking=_off())
    _assert_base_as_loaded(worker.pipe, fresh)
    after = worker.finetune(method, "id00", curated_tiny_dataset, tmp_path / "shared", tracking=_off())
    alone = BaseWorker(tiny_sd15_dir, cfg).finetune(method, "id00", curated_tiny_dataset, tmp_path / "alone",
                                                    tracking=_off())
    assert _artifact_bytes(Path(after.artifact_dir)) == _artifact_bytes(Path(alone.artifact_dir))


def test_a_base_loaded_for_other_settings_is_refused(curated_tiny_dataset, tiny_sd15_dir, tmp_path):
    from idforge.errors import ConfigError
    from idforge.train.finetune_config import FinetuneConfig
    from idforge.train.per_identity import finetune_identity, load_base

    base = load_base(tiny_sd15_dir, FinetuneConfig(device="cpu"))
    with pytest.raises(ConfigError, match="load a base for these settings"):
        finetune_identity("textual-inversion", "id00", curated_tiny_dataset, tiny_sd15_dir, tmp_path,
                          FinetuneConfig(device="cpu", dtype="bfloat16", steps=1), base=base)
