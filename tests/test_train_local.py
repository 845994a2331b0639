"""The training loop in-process (no Ray): bad inputs fail with clear errors, init_from, the bench's step runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from idforge.errors import ConfigError, DataError
from idforge.train.config import TrainConfig
from tests.fixtures.dataset import prepare_synthetic


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, tiny_sd15_dir, tiny_clip_dir):
    return prepare_synthetic(tmp_path_factory.mktemp("local-data"), tiny_sd15_dir, tiny_clip_dir, identities=2,
                             images_per_identity=2, size=128)


def test_train_local_then_init_from(prepared_dir, tiny_sd15_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from idforge.train.population import train_local

    cfg = TrainConfig(method="infinite-id", steps=2, batch_size=2, checkpoint_every=1, report_every=1, lr=1e-3,
                      keep_checkpoints=1)
    first = train_local(cfg, prepared_dir, str(tiny_sd15_dir), output_dir=tmp_path / "a")
    assert first.steps == 2 and len(list((tmp_path / "a" / "checkpoints").iterdir())) == 1  # only the newest kept
    # a second call on the same output resumes: nothing left to do, same weights
    again = train_local(cfg, prepared_dir, str(tiny_sd15_dir), output_dir=tmp_path / "a")
    assert again.steps == 2 and again.metrics["resumed_from"] == 2
    # init_from starts a new run from those weights (a vanishing learning rate keeps them)
    cfg2 = cfg.model_copy(update={"init_from": str(first.method_path), "lr": 1e-12, "steps": 1,
                                  "weight_decay": 0.0})
    second = train_local(cfg2, prepared_dir, str(tiny_sd15_dir), output_dir=tmp_path / "b")
    a, b = load_file(first.method_path), load_file(second.method_path)
    assert a.keys() == b.keys()
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    with pytest.raises(ConfigError, match="init_from"):
        train_local(cfg.model_copy(update={"init_from": str(tmp_path / "missing.safetensors")}), prepared_dir,
                    str(tiny_sd15_dir), output_dir=tmp_path / "c")
    # resuming "a" with another method config: a clear refusal naming the checkpoint, and "a" is left as it was
    before = load_file(first.method_path)
    other = cfg.model_copy(update={"method_config": {"num_face_tokens": 2}, "steps": 3})
    with pytest.raises(ConfigError, match=r"cannot resume from .*checkpoints.*another method config"):
        train_local(other, prepared_dir, str(tiny_sd15_dir), output_dir=tmp_path / "a")
    after = load_file(first.method_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_inputs(prepared_dir, tiny_sd15_dir, tmp_path):
    from idforge.train.population import train_local, train_population

    with pytest.raises(DataError, match="not a prepared dataset"):
        train_local(TrainConfig(steps=1), tmp_path / "nope", str(tiny_sd15_dir), output_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match="workers"):
        train_population(TrainConfig(steps=1), prepared_dir, str(tiny_sd15_dir), workers=0, output_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown method"):
        train_local(TrainConfig(method="no-such", steps=1), prepared_dir, str(tiny_sd15_dir), output_dir=tmp_path)
    with pytest.raises(ValueError):
        TrainConfig(steps=0)


@pytest.mark.slow
def test_bench_runs_on_tiny(repo_root, tmp_path):
    import json

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(repo_root / "bench" / "train_throughput.py"), "--model", "tiny",
                           "--method", "infinite-id", "--steps", "1", "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["ours_samples_per_s"] > 0 and res["reference_samples_per_s"] > 0
    assert res["ratio_ours_over_reference"] == pytest.approx(res["ours_samples_per_s"] / res["reference_samples_per_s"])
    assert res["loader_samples_per_s"] > 0


def test_validation_batches_are_capped_and_evaluated_in_chunks(prepared_dir, tiny_sd15_dir):
    """The identity-gap check costs a fixed amount on any dataset, and chunking does not change its value."""
    import torch

    from idforge.methods.objective import training_scheduler
    from idforge.methods.registry import get_method
    from idforge.methods.testing import load_frozen_pipeline
    from idforge.train.dataset import PreparedDataset, read_prepared
    from idforge.train.loop import method_config_for_data
    from idforge.train.validation import cross_photo_batches, fix_noise, held_out_loss, heldout_batches, split_holdout

    ds = PreparedDataset(prepared_dir)
    match, mismatch = cross_photo_batches(ds)  # 2 identities x 2 photos: 4 (image, own ref, other) triples
    assert match.batch_size == mismatch.batch_size == 4
    assert torch.equal(match.latents, mismatch.latents) and not torch.equal(match.face_embeds, mismatch.face_embeds)
    few, _ = cross_photo_batches(ds, max_pairs=3, seed=1)
    again, _ = cross_photo_batches(ds, max_pairs=3, seed=1)
    assert few.batch_size == 3 and torch.equal(few.latents, again.latents)  # a seeded, stable subset

    index, info = read_prepared(prepared_dir)
    train_keys, held_keys = split_holdout(index, 1)
    held = PreparedDataset(prepared_dir, keys=held_keys, ref_includes_target=True)
    refs = PreparedDataset(prepared_dir, keys=train_keys, ref_includes_target=True)
    assert heldout_batches(held, refs)[0].batch_size == 2
    assert heldout_batches(held, refs, max_pairs=1)[0].batch_size == 1

    pipe = load_frozen_pipeline(tiny_sd15_dir)
    torch.manual_seed(0)
    method = get_method("infinite-id", method_config_for_data("infinite-id", {}, info))
    method.attach(pipe)
    try:
        batch = fix_noise(match, training_scheduler(pipe), seed=3)
        whole = held_out_loss(method, pipe, batch, chunk=64)
        assert held_out_loss(method, pipe, batch, chunk=3) == pytest.approx(whole, rel=1e-5)
    finally:
        method.detach()
