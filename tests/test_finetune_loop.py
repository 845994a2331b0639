"""The per-identity loop: every method trains one identity of a curated dataset, leaves an atomic artifact and an
MLflow run, and the artifact generates the same images in a fresh process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

METHODS = ["textual-inversion", "dreambooth-lora", "id-ea", "sefi-ide", "pidiff"]


def _cfg(method_config: dict | None = None, **kw):
    from idforge.train.finetune_config import FinetuneConfig

    return FinetuneConfig(method_config=method_config or {}, steps=3, batch_size=2, sample_steps=2,
                          sample_seeds=[0], num_threads=1, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, curated_tiny_dataset, tiny_sd15_dir, _mlflow_template_db, one_torch_thread,
            tiny_e4e_checkpoint):
    """Each method trained on identity id00 (3 steps), one MLflow store for all (pidiff: the injected random e4e
    checkpoint, fed 64 px)."""
    from idforge.config import TrackingConfig
    from idforge.train.per_identity import finetune_identity

    root = tmp_path_factory.mktemp("finetune")
    db = root / "mlruns.db"
    shutil.copyfile(_mlflow_template_db, db)
    tracking = TrackingConfig(uri=f"sqlite:///{db}")
    small = {"pidiff": {"encoder_path": str(tiny_e4e_checkpoint), "encoder_image_size": 64}}
    results = {m: finetune_identity(m, "id00", curated_tiny_dataset, tiny_sd15_dir, root / m, _cfg(small.get(m)),
                                    tracking=tracking) for m in METHODS}
    return root, tracking, results


@pytest.mark.slow
def test_every_method_leaves_a_complete_artifact_and_status(trained):
    root, _, results = trained
    for method, res in results.items():
        art = Path(res.artifact_dir)
        assert res.status == "done" and art == root / method / "id00"
        assert (art / "DONE").is_file() and (art / "artifact.json").is_file()
        assert not list((root / method).glob(".id00.tmp-*"))  # no temp dir left behind
        meta = json.loads((art / "finetune.json").read_text())
        assert meta["method"] == method and len(meta["losses"]) == 3
        assert set(res.timings) == {"load", "base_load", "train", "sample", "save", "total"}
        assert 0 < res.timings["base_load"] <= res.timings["load"]  # loaded its own base
        assert all(v >= 0 for v in res.timings.values()) and res.timings["total"] >= res.timings["train"]
        status = json.loads((root / method / "_status" / "id00.json").read_text())
        assert status["status"] == "done" and status["run_id"] == res.run_id
    assert (root / "id-ea" / "id00" / "learned_embeds.safetensors").is_file()
    assert (root / "dreambooth-lora" / "id00" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_one_mlflow_run_per_identity_with_loss_curve_images_and_timings(trained):
    from mlflow import MlflowClient

    _, tracking, results = trained
    client = MlflowClient(tracking_uri=tracking.uri)
    for method, res in results.items():
        run = client.get_run(res.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["idforge.identity"] == "id00" and run.data.tags["idforge.method"] == method
        assert [m.step for m in client.get_metric_history(res.run_id, "train/loss")] == [0, 2]
        assert {"time/load_s", "time/train_s", "time/save_s", "time/sample_s"} <= set(run.data.metrics)
        assert "samples" in {a.path for a in client.list_artifacts(res.run_id)}
        # the identity's artifact is a logged model of its run, the final loss linked to it
        (model,) = client.search_logged_models([run.info.experiment_id],
                                                filter_string=f"source_run_id = '{res.run_id}'")
        assert model.name == f"{method}-id00"
        assert {m.key: m.value for m in model.metrics}["final_loss"] == pytest.approx(res.final_loss)
        assert "finetune.json" in {a.path for a in client.list_logged_model_artifacts(model.model_id)}


@pytest.mark.slow
def test_artifacts_generate_the_same_images_in_a_fresh_process(trained, tiny_sd15_dir, tmp_path):
    root, _, _ = trained
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        torch.set_num_threads(1)
        from idforge.diffusion.loading import load_pipeline
        from idforge.train.per_identity import load_finetuned
        out = {{}}
        for method in {METHODS!r}:
            pipe = load_pipeline({str(tiny_sd15_dir)!r})
            m, meta = load_finetuned({str(root)!r} + "/" + method + "/id00", pipe)
            imgs = m.generate(pipe, meta["sample_prompts"], m.sample_condition(pipe), **meta["sampling"])
            out[method] = np.stack([np.asarray(i) for i in imgs])
        np.savez(sys.argv[1], **out)
    """)
    npz = tmp_path / "fresh.npz"
    proc = subprocess.run([sys.executable, "-c", script, str(npz)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = np.load(npz)
    from PIL import Image

    for method in METHODS:
        saved = np.asarray(Image.open(root / method / "id00" / "samples" / "000.png").convert("RGB"))
        assert fresh[method].shape == (1, *saved.shape)
        assert np.array_equal(fresh[method][0], saved), method


def test_bad_inputs_fail_clearly_without_leaving_an_artifact(curated_tiny_dataset, tiny_sd15_dir, tmp_path,
                                                             one_torch_thread):
    from idforge.config import TrackingConfig
    from idforge.errors import ConfigError, DataError
    from idforge.train.per_identity import finetune_identity, load_finetuned, read_status

    off = TrackingConfig(enabled=False)
    with pytest.raises(DataError, match="identity 'nobody' has no accepted images"):
        finetune_identity("textual-inversion", "nobody", curated_tiny_dataset, tiny_sd15_dir, tmp_path, _cfg(),
                          tracking=off)
    assert not (tmp_path / "nobody").exists()
    status = read_status(tmp_path, "nobody")
    assert status["status"] == "failed" and "DataError" in status["error"]
    with pytest.raises(ConfigError, match="population method"):
        finetune_identity("id-adapter", "id00", curated_tiny_dataset, tiny_sd15_dir, tmp_path, _cfg(), tracking=off)
    with pytest.raises(ConfigError, match="unknown method"):
        finetune_identity("textual-inversio", "id00", curated_tiny_dataset, tiny_sd15_dir, tmp_path, _cfg(),
                          tracking=off)
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="no DONE marker"):
        load_finetuned(tmp_path / "half", pipe=None)


def test_recipe_defaults_come_from_the_method_and_overrides_win():
    from idforge.methods.id_ea import IDEA
    from idforge.train.finetune_config import FinetuneConfig
    from idforge.train.per_identity import recipe

    m = IDEA.from_config({})
    r = recipe(m, FinetuneConfig())
    assert (r["steps"], r["batch_size"], r["effective_lr"]) == (320, 8, pytest.approx(0.012))
    r = recipe(m, FinetuneConfig(steps=5, batch_size=2, scale_lr=False))
    assert (r["steps"], r["batch_size"], r["effective_lr"]) == (5, 2, 0.0015)
    r = recipe(m, FinetuneConfig())
    assert (r["eps"], r["flip_prob"], r["max_images"], r["weight_decay"]) == (1e-7, 0.5, 1, 1e-2)  # the release's
    assert recipe(m, FinetuneConfig(max_images=3))["max_images"] == 3


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_recipe_flips_and_image_cap_reach_the_batches(flip_prob, curated_tiny_dataset, tiny_sd15_dir, tmp_path,
                                                      monkeypatch, one_torch_thread):
    import torch

    from idforge.config import TrackingConfig
    from idforge.diffusion.loading import load_pipeline
    from idforge.methods.textual_inversion import TextualInversion
    from idforge.train.finetune_config import FinetuneConfig
    from idforge.train.per_identity import _encode_latents, finetune_identity, load_identity_data

    seen = []
    original = TextualInversion.training_loss

    def spy(self, batch, pipe, **kw):
        seen.append(batch.latents.detach().cpu().clone())
        return original(self, batch, pipe, **kw)

    monkeypatch.setattr(TextualInversion, "training_loss", spy)
    cfg = FinetuneConfig(method_config={"train": {"flip_prob": flip_prob, "max_images": 1}}, steps=3, batch_size=2,
                         sample_steps=1, sample_seeds=[0], num_threads=1, device="cpu")
    finetune_identity("textual-inversion", "id00", curated_tiny_dataset, tiny_sd15_dir, tmp_path, cfg,
                      tracking=TrackingConfig(enabled=False))
    pipe = load_pipeline(tiny_sd15_dir)
    images = load_identity_data(curated_tiny_dataset, "id00", 64, max_images=1).images
    plain, mirrored = _encode_latents(pipe, images)[0], _encode_latents(pipe, torch.flip(images, dims=[-1]))[0]
    rows = torch.cat(seen)
    assert rows.shape[0] == 6 and not torch.allclose(plain, mirrored)
    want = mirrored if flip_prob else plain  # one image (max_images=1): every row is it, mirrored when flipped
    assert all(torch.allclose(row, want, atol=1e-5) for row in rows)


def test_identity_data_feeds_e4e_the_ffhq_crop_on_white_at_256(curated_tiny_dataset):
    """PIDiff's e4e input: the FFHQ-aligned crop (not the 112 crop), background white, 256 px, [-1, 1]."""
    import pandas as pd
    import torch
    from PIL import Image

    from idforge.train.per_identity import load_identity_data

    data = load_identity_data(curated_tiny_dataset, "id00", 64)
    assert data.wplus is not None and tuple(data.wplus.shape) == (2, 3, 256, 256)
    rows = pd.read_parquet(curated_tiny_dataset / "manifest.parquet").query("identity == 'id00' and status == "
                                                                            "'accepted'").sort_values("sha256")
    row = rows.iloc[0]
    matte = np.asarray(Image.open(curated_tiny_dataset / row["mask"]).convert("L").resize((256, 256)))
    crop = np.asarray(Image.open(curated_tiny_dataset / row["aligned_ffhq"]).convert("RGB").resize(
        (256, 256), Image.Resampling.BICUBIC)).astype(np.float32) / 127.5 - 1
    x = data.wplus[0].permute(1, 2, 0).numpy()

    def erode(m):  # away from the matte's soft edge
        return m & np.roll(m, 4, 0) & np.roll(m, -4, 0) & np.roll(m, 4, 1) & np.roll(m, -4, 1)

    outside, inside = erode(matte == 0), erode(matte == 255)  # the face mask is soft: its hard parts
    assert outside.any() and inside.any()
    assert np.allclose(x[outside], 1.0, atol=0.02)  # background -> white
    assert np.abs(x[inside] - crop[inside]).mean() < 0.02  # the FFHQ crop's own pixels where the person is
    assert torch.isfinite(data.wplus).all()
