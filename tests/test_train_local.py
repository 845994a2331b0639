"""The training loop in-process (no Ray): bad inputs fail with clear errors, init_from, the bench's step runs, the base
model stays frozen, a killed run resumes bit-exactly, held-out photos are measured against training references."""

from __future__ import annotations

import subprocess
import sys

import pytest

from idforge.errors import ConfigError, DataError
from idforge.train.config import TrainConfig
from tests.fixtures.dataset import prepare_synthetic
from tests.fixtures.resume import assert_same_end, killed_and_resumed


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


def test_the_loop_freezes_every_base_weight(prepared_dir, tiny_sd15_dir):
    """After an optimizer step no base weight asks for or keeps a gradient (the optimizer holds only the method's
    weights, so an unfrozen base model would train nothing but would keep and allocate its .grad every step)."""
    import torch

    from idforge.methods.registry import get_method
    from idforge.methods.types import TrainBatch
    from idforge.train.dataset import PreparedDataset, collate, read_prepared
    from idforge.train.loop import TrainStep, load_frozen_pipeline, method_config_for_data

    cfg = TrainConfig(method="infinite-id", steps=1, batch_size=2, lr=1e-3)
    pipe = load_frozen_pipeline(str(tiny_sd15_dir), "auto", "float32", torch.device("cpu"), True, cfg)
    _, info = read_prepared(prepared_dir)
    method = get_method(cfg.method, method_config_for_data(cfg.method, {}, info))
    method.attach(pipe)
    try:
        method.train()
        ds = PreparedDataset(prepared_dir)
        step = TrainStep(method, pipe, cfg)
        step([TrainBatch.from_dict(collate([ds[0], ds[1]]))])
        own = {id(p) for p in method.modules.parameters()}
        base = [(f"{c}.{n}", p) for c in ("unet", "vae", "text_encoder") for n, p in getattr(pipe, c).named_parameters()
                if id(p) not in own]
        assert len(base) > 100
        assert [n for n, p in base if p.requires_grad] == []
        assert [n for n, p in base if p.grad is not None] == []
        assert all(not getattr(pipe, c).training for c in ("unet", "vae", "text_encoder"))
    finally:
        method.detach()


@pytest.mark.parametrize("target", ["aligned", "photo"])
def test_a_run_killed_after_a_checkpoint_resumes_bit_exactly(target, prepared_dir, tiny_sd15_dir, tmp_path, request):
    """Killed after step 3, restarted from the step-2 checkpoint: the same weights, EMA and metrics at the end as a
    run never interrupted (the data stream, the noise generator, the optimizer and the EMA all resume). The photo
    target's stream is the bucket sampler's (one bucket per batch), with the identity-gap check over its buckets."""
    extra = {}
    if target == "photo":
        prepared_dir = request.getfixturevalue("prepared_photos").output_dir
        extra = {"validate_every": 4}  # once, at the end: both runs measure the same weights
    cfg = TrainConfig(method="infinite-id", steps=4, batch_size=2, lr=1e-2, checkpoint_every=2, report_every=2,
                      ema=True, ema_decay=0.5, **extra)
    whole, resumed = killed_and_resumed(cfg, prepared_dir, str(tiny_sd15_dir), tmp_path)
    assert resumed.metrics["resumed_from"] == 2 and whole.metrics["resumed_from"] == 0
    assert_same_end(whole, resumed)
    if target == "photo":
        assert resumed.metrics["val_identity_gap"] == whole.metrics["val_identity_gap"]


def test_an_unreadable_latest_checkpoint_falls_back_to_the_newest_readable_one(prepared_dir, tiny_sd15_dir,
                                                                              tmp_path, caplog):
    """A kill that truncated the newest checkpoint's state: the rerun skips it with a warning naming it, resumes
    from the older one and still ends where an uninterrupted run ends; with no readable checkpoint left, a clear
    error instead of a silent start from step 0."""
    from idforge.train.population import train_local

    cfg = TrainConfig(method="infinite-id", steps=4, batch_size=2, lr=1e-2, checkpoint_every=1, report_every=1,
                      keep_checkpoints=2)
    whole = train_local(cfg, prepared_dir, str(tiny_sd15_dir), output_dir=tmp_path / "whole")
    marker, out = tmp_path / "fault", tmp_path / "killed"
    with pytest.raises(RuntimeError, match="injected fault at step 3"):
        train_local(cfg, prepared_dir, str(tiny_sd15_dir), output_dir=out, fault_step=3, fault_marker=marker)
    kept = sorted((out / "checkpoints").glob("checkpoint_*"))
    assert [p.name for p in kept] == ["checkpoint_00000001", "checkpoint_00000002"]
    state = kept[-1] / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="idforge.train.loop"):
        resumed = train_local(cfg, prepared_dir, str(tiny_sd15_dir), output_dir=out, fault_step=3,
                              fault_marker=marker)
    assert resumed.metrics["resumed_from"] == 1
    assert resumed.metrics["weight_checksum"] == whole.metrics["weight_checksum"]
    assert "checkpoint_00000002 is unreadable" in caplog.text
    for d in (out / "checkpoints").glob("checkpoint_*"):  # now 3 and 4: both damaged
        (d / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"no readable checkpoint to resume from: .*checkpoint_00000004"):
        train_local(cfg.model_copy(update={"steps": 5}), prepared_dir, str(tiny_sd15_dir), output_dir=out)


def test_held_out_photos_are_measured_against_references_from_the_training_photos(prepared_dir):
    """The loop's identity-gap pair: each held-out photo is conditioned on a TRAINING photo of its own identity
    (matched) and of the other identity (mismatched), never on itself or another held-out photo."""
    import torch

    from idforge.train.dataset import PreparedDataset, read_prepared
    from idforge.train.loop import validation_batches
    from idforge.train.validation import split_holdout

    index, _ = read_prepared(prepared_dir)
    train_keys, held_keys = split_holdout(index, 1)
    assert len(held_keys) == 2 and not set(held_keys) & set(train_keys)  # one photo of each of the 2 identities
    full = PreparedDataset(prepared_dir)
    by_key = {full.all_items.at[r, "key"]: (full.all_items.at[r, "identity"], full.item(r)) for r in full.targets}
    training = PreparedDataset(prepared_dir, keys=train_keys)
    matched, mismatched = validation_batches(str(prepared_dir), training, held_keys, 1, 0, torch.device("cpu"))

    def key_of(tensor, field):
        found = [k for k, (_, item) in by_key.items() if torch.equal(item[field], tensor)]
        assert len(found) == 1
        return found[0]

    assert matched.batch_size == mismatched.batch_size == 2
    for i in range(matched.batch_size):
        target = key_of(matched.latents[i], "latents")
        assert target in held_keys and torch.equal(mismatched.latents[i], matched.latents[i])
        own, other = key_of(matched.face_embeds[i, 0], "face_embed"), key_of(mismatched.face_embeds[i, 0], "face_embed")
        assert own in train_keys and other in train_keys
        assert by_key[own][0] == by_key[target][0] != by_key[other][0]


@pytest.mark.s3
def test_init_from_an_s3_checkpoint(prepared_dir, tiny_sd15_dir, tmp_path, s3_env, s3_prefix, monkeypatch):
    from safetensors.torch import load_file

    from idforge.io.storage import open_storage
    from idforge.train.population import train_local

    monkeypatch.setenv("IDFORGE_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(method="infinite-id", steps=1, batch_size=2, checkpoint_every=1, lr=1e-3, keep_checkpoints=1)
    first = train_local(cfg, prepared_dir, str(tiny_sd15_dir), output_dir=tmp_path / "a")
    uri = f"{s3_prefix}/champion/method.safetensors"
    open_storage(uri).put_file(first.method_path, uri)
    cfg2 = cfg.model_copy(update={"init_from": uri, "lr": 1e-12, "weight_decay": 0.0})
    second = train_local(cfg2, prepared_dir, str(tiny_sd15_dir), output_dir=tmp_path / "b")
    a, b = load_file(first.method_path), load_file(second.method_path)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_the_loop_takes_reference_sampling_and_feature_sizes_from_the_method():
    """No method names in the loop: what a method declares (references per item, may the target be one, which
    config fields the prepared data sizes) is what the loop uses, unless the training config says otherwise."""
    from idforge.methods.registry import get_method
    from idforge.train.loop import method_config_for_data, sampling_defaults

    assert sampling_defaults(get_method("id-adapter", num_refs=3), TrainConfig()) == (3, True)
    infinite = get_method("infinite-id")
    assert sampling_defaults(infinite, TrainConfig()) == (1, False)
    assert sampling_defaults(infinite, TrainConfig(refs_per_item=2, ref_includes_target=True)) == (2, True)
    info = {"shapes": {"face_embed": [128], "clip_patch_tokens": [17, 48], "latents": [4, 8, 8]}}
    assert method_config_for_data("infinite-id", {"clip_dim": 32}, info) == {"clip_dim": 32, "face_dim": 128}
    assert method_config_for_data("id-adapter", {}, info) == {"face_dim": 128, "clip_dim": 48}
    assert method_config_for_data("textual-inversion", {"num_tokens": 2}, info) == {"num_tokens": 2}


def test_validation_pairs_are_sampled_without_enumerating_them_stable_under_a_seed():
    import time

    from idforge.train.validation import sample_pair_indices

    counts = [199_999] * 200_000  # 200 k held-out rows x (200 k - 1) other identities: 4e10 pairs, never listed
    start = time.perf_counter()
    first = sample_pair_indices(counts, 64, seed=3)
    assert time.perf_counter() - start < 5.0
    assert first == sample_pair_indices(counts, 64, seed=3)
    assert first != sample_pair_indices(counts, 64, seed=4)
    assert len(set(first)) == 64 and first == sorted(first)
    assert all(0 <= i < len(counts) and 0 <= j < counts[i] for i, j in first)
    assert sample_pair_indices([2, 0, 1], None, seed=0) == [(0, 0), (0, 1), (2, 0)]  # uncapped: every pair, in order
