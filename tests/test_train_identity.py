"""Identity flows: after a short training run, the denoising loss with the image's own identity condition is lower
than with another identity's, by a margin the untrained adapter does not show — and the same check rejects an
adapter that ignores its identity input.

Set-up notes (why the data and model look the way they do):
- The tiny VAE is random, so its latents are ~0.23 in scale, and the SD1.5 ``scaling_factor`` it inherits makes
  them ~0.04: so small next to unit noise that no condition could change the denoising loss measurably. As SD did
  for 0.18215, the tests set the factor to 1/std of the latents of the training images (a copied model dir).
- On the real sample identities (8 photos of 3 people after curation) a held-out *photo* cannot show a gap at
  this scale: in pixels and in tiny-VAE latents those photos are nearer to other people's photos than to their own
  person's (leave-one-out nearest neighbour: 2 of 8 right), so no denoiser could use the identity to predict an
  unseen photo, and holding one out leaves two people a single training photo. There the check is cross-photo:
  each photo conditioned on a *different* photo of its person vs a photo of another person, with fresh noise.
- The held-out-photo version runs on synthetic identities, where each person's photos share colours and face
  proportions (what real photos share at a scale a tiny model can see) and an identity embedding direction, with
  pose/light/pixel noise per photo. One photo per identity is held out of training entirely (not even as a
  reference).
"""

from __future__ import annotations

import json
import shutil

import pytest

from idforge.train.config import PrepareConfig, TrainConfig

pytestmark = pytest.mark.slow

MARGIN = 1e-3  # absolute loss units (the losses are ~0.7-1.1)


def identity_flows(trained_gap: float, untrained_gap: float, margin: float = MARGIN) -> bool:
    """The criterion: a clear positive gap after training, and clearly more than before training."""
    return trained_gap > margin and trained_gap - untrained_gap > margin


def calibrated_prepare(curated, tiny_sd15_dir, tiny_clip_dir, root, prepare: PrepareConfig | None = None):
    """(model dir, prepared dir): a copy of the tiny model whose VAE scaling makes ``curated``'s latents unit-std."""
    import torch

    from idforge.train.dataset import PreparedDataset
    from idforge.train.prepare import prepare_dataset

    prepare = prepare or PrepareConfig(flip=False)
    first = prepare_dataset(curated, str(tiny_sd15_dir), root / "p0", prepare, clip_model=str(tiny_clip_dir))
    # flattened: photo targets have one latent shape per aspect bucket
    lat = torch.cat([PreparedDataset(first.output_dir).item(i)["latents"].flatten() for i in range(len(first.items))])
    model = root / "tiny-sd15-calibrated"
    shutil.copytree(tiny_sd15_dir, model)
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    vae_cfg["scaling_factor"] = vae_cfg["scaling_factor"] / float(lat.std())  # latents -> unit std
    (model / "vae" / "config.json").write_text(json.dumps(vae_cfg))
    prepared = prepare_dataset(curated, str(model), root / "p", prepare, clip_model=str(tiny_clip_dir))
    assert prepared.computed == len(prepared.items)  # another model: nothing reused from the first cache
    return model, prepared.output_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd15_dir, tiny_clip_dir):
    from idforge.train.testdata import write_curated_synthetic

    root = tmp_path_factory.mktemp("identity")
    curated = write_curated_synthetic(root / "curated", identities=6, images_per_identity=4, size=256, seed=1)
    model, prepared = calibrated_prepare(curated, tiny_sd15_dir, tiny_clip_dir, root)
    return model, prepared, root


def blind(method):
    """``method`` with its identity features replaced by constants: an adapter that ignores its identity input."""
    import torch

    original = method.identity_tokens
    method.identity_tokens = lambda face, patches: original(torch.zeros_like(face), torch.zeros_like(patches))
    return method


def test_identity_flows_to_held_out_images(setup):
    import torch

    from idforge.methods.checkpoint import load_method
    from idforge.methods.registry import get_method
    from idforge.methods.testing import load_frozen_pipeline
    from idforge.train.dataset import PreparedDataset, read_prepared
    from idforge.train.loop import VALIDATION_SEED, method_config_for_data
    from idforge.train.population import train_local
    from idforge.train.validation import heldout_batches, identity_gap, split_holdout

    model, data, root = setup
    cfg = TrainConfig(method="infinite-id", steps=400, batch_size=4, lr=1e-2, flip_prob=0.0, holdout_per_identity=1,
                      checkpoint_every=400, report_every=400, validate_every=400, seed=0)
    index, info = read_prepared(data)
    train_keys, heldout_keys = split_holdout(index, 1, seed=cfg.seed)
    assert len(heldout_keys) == 6 and len(train_keys) == 18
    heldout = PreparedDataset(data, keys=heldout_keys, ref_includes_target=True)
    references = PreparedDataset(data, keys=train_keys)
    pair = heldout_batches(heldout, references)
    pipe = load_frozen_pipeline(model)

    torch.manual_seed(cfg.seed)
    untrained = get_method(cfg.method, method_config_for_data(cfg.method, {}, info))
    untrained.attach(pipe)
    before = identity_gap(untrained, pipe, *pair, repeats=16, seed=VALIDATION_SEED)
    untrained.detach()

    result = train_local(cfg, data, str(model), output_dir=root / "run")
    trained = load_method(result.method_path, pipe)
    after = identity_gap(trained, pipe, *pair, repeats=16, seed=VALIDATION_SEED)
    assert after.match < before.match  # it learned to denoise these faces at all
    assert identity_flows(after.gap, before.gap), (before, after)
    assert before.gap < MARGIN, before  # the untrained adapter shows no such margin
    assert result.metrics["val_identity_gap"] == pytest.approx(after.gap, abs=MARGIN)  # the loop's held-out check

    # An adapter that ignores its identity input: same trained weights, identity features replaced by constants.
    ignoring = identity_gap(blind(trained), pipe, *pair, repeats=16, seed=VALIDATION_SEED)
    assert ignoring.gap == 0.0 and not identity_flows(ignoring.gap, before.gap)


@pytest.fixture(scope="module")
def samples_curated(tmp_path_factory, samples_dir):
    """The bundled sample photos curated (insightface, landmark matte)."""
    from idforge.curate.config import CurateConfig
    from idforge.curate.run import curate_dataset

    root = tmp_path_factory.mktemp("identity_samples")
    cfg = CurateConfig(backend="insightface", matte={"backend": "landmarks"}, progress=False,
                       work_dir=str(root / "work"))
    report = curate_dataset(str(samples_dir), str(root / "curated"), cfg=cfg)
    assert report.identities >= 3, report
    return root / "curated"


# Both training targets: the aligned face crop, and the photo around the face in aspect buckets (tiny model:
# 64 px native, buckets of 16 px steps: 48x80, 64x64, 80x48 ...).
TARGETS = {"aligned": PrepareConfig(flip=False), "photo": PrepareConfig(flip=False, target="photo", bucket_step=16)}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def samples_setup(request, samples_curated, tmp_path_factory, tiny_sd15_dir, tiny_clip_dir):
    """The curated samples prepared (for each target) for a calibrated tiny model."""
    root = tmp_path_factory.mktemp(f"identity_samples_{request.param}")
    model, prepared = calibrated_prepare(samples_curated, tiny_sd15_dir, tiny_clip_dir, root, TARGETS[request.param])
    return model, prepared, root


def _identities(batch) -> set[int]:
    """Identity ids of a batch, or of a list of per-bucket batches."""
    return {int(i) for b in (batch if isinstance(batch, list) else [batch]) for i in b.identity.tolist()}


# Seed 1 passes as well (measured below); one seed keeps the suite's time down.
@pytest.mark.parametrize("seed", [0])
def test_identity_flows_on_sample_identities(samples_setup, seed):
    """Real photos: conditioned on another photo of the same person, the denoiser does better than on another
    person's photo, after training and not before; the noise draws are fresh (none was seen in training). For
    both targets: the aligned crops, and the photos in their aspect buckets (batches of one bucket each)."""
    import torch

    from idforge.methods.checkpoint import load_method
    from idforge.methods.registry import get_method
    from idforge.methods.testing import load_frozen_pipeline
    from idforge.train.dataset import PreparedDataset, read_prepared
    from idforge.train.loop import VALIDATION_SEED, method_config_for_data
    from idforge.train.population import train_local
    from idforge.train.validation import cross_photo_batches, identity_gap

    model, data, root = samples_setup
    cfg = TrainConfig(method="infinite-id", steps=800, batch_size=4, lr=5e-3, flip_prob=0.0, holdout_per_identity=0,
                      checkpoint_every=800, report_every=800, validate_every=800, seed=seed)
    _, info = read_prepared(data)
    match, mismatch = cross_photo_batches(PreparedDataset(data))
    assert len(_identities(match)) >= 3
    if info["target"] == "photo":  # the real photos fall into several buckets: one validation batch per bucket
        assert len(info["buckets"]) > 1 and isinstance(match, list), info["buckets"]
    pipe = load_frozen_pipeline(model)
    eval_seed = VALIDATION_SEED + seed  # apart from the training noise streams: these draws are new

    torch.manual_seed(cfg.seed)  # the loop's initial weights
    untrained = get_method(cfg.method, method_config_for_data(cfg.method, {}, info))
    untrained.attach(pipe)
    before = identity_gap(untrained, pipe, match, mismatch, repeats=16, seed=eval_seed)
    untrained.detach()

    result = train_local(cfg, data, str(model), output_dir=root / f"run{seed}")
    trained = load_method(result.method_path, pipe)
    after = identity_gap(trained, pipe, match, mismatch, repeats=16, seed=eval_seed)
    assert after.match < before.match
    # Measured (aligned): untrained gaps -0.0009 / -0.0029, trained 0.0041 / 0.0063 (seeds 0 / 1); photo target
    # (buckets 64x64 x6, 80x48 x2), seed 0: untrained -0.0013, trained 0.0041. Twice the default margin,
    # as Infinite-ID's untrained image attention already reads its (random) identity tokens.
    assert identity_flows(after.gap, before.gap, margin=2e-3), (before, after)
    assert before.gap < 2e-3, before

    ignoring = identity_gap(blind(trained), pipe, match, mismatch, repeats=16, seed=eval_seed)
    assert ignoring.gap == 0.0
    # the loop's own validation (nothing held out -> cross-photo, 8 draws of its own) sees the same gap
    assert result.metrics["val_identity_gap"] > 0 and abs(result.metrics["val_identity_gap"] - after.gap) < 2e-3
