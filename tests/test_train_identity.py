"""Identity flows: after a short training run, the held-out denoising loss with the image's own identity condition
is lower than with another identity's, by a margin the untrained adapter does not show — and the same check
rejects an adapter that ignores its identity input.

Set-up notes (why the data and model look the way they do):
- The tiny VAE is random, so its latents are ~0.23 in scale, and the SD1.5 ``scaling_factor`` it inherits makes
  them ~0.04: so small next to unit noise that no condition could change the denoising loss measurably. As SD did
  for 0.18215, the test sets the factor to 1/std of the latents of the training images (a copied model dir).
- The three real sample identities (8 photos after curation) give held-out gaps at noise level on a random tiny
  UNet, so the identities here are synthetic: each has its own colours and face proportions (what its photos
  share) and an identity embedding direction, with pose/light/pixel noise per photo. One photo per identity is
  held out of training entirely (not even used as a reference).
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd15_dir, tiny_clip_dir):
    import torch

    from idforge.train.dataset import PreparedDataset
    from idforge.train.prepare import prepare_dataset
    from idforge.train.testdata import write_curated_synthetic

    root = tmp_path_factory.mktemp("identity")
    curated = write_curated_synthetic(root / "curated", identities=6, images_per_identity=4, size=256, seed=1)
    first = prepare_dataset(curated, str(tiny_sd15_dir), root / "p0", PrepareConfig(flip=False),
                            clip_model=str(tiny_clip_dir))
    lat = torch.stack([PreparedDataset(first.output_dir).item(i)["latents"] for i in range(len(first.items))])
    model = root / "tiny-sd15-calibrated"
    shutil.copytree(tiny_sd15_dir, model)
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    vae_cfg["scaling_factor"] = vae_cfg["scaling_factor"] / float(lat.std())  # latents -> unit std
    (model / "vae" / "config.json").write_text(json.dumps(vae_cfg))
    prepared = prepare_dataset(curated, str(model), root / "p", PrepareConfig(flip=False),
                               clip_model=str(tiny_clip_dir))
    assert prepared.computed == len(prepared.items)  # another model: nothing reused from the first cache
    return model, prepared.output_dir, root


def test_identity_flows_to_held_out_images(setup):
    import torch

    from idforge.methods.base import get_method, load_method
    from idforge.methods.testing import load_frozen_pipeline
    from idforge.train.dataset import PreparedDataset, read_prepared
    from idforge.train.loop import method_config_for_data
    from idforge.train.population import train_local
    from idforge.train.validation import identity_gap, split_holdout

    model, data, root = setup
    cfg = TrainConfig(method="infinite-id", steps=400, batch_size=4, lr=1e-2, flip_prob=0.0, holdout_per_identity=1,
                      checkpoint_every=400, report_every=400, seed=0)
    index, info = read_prepared(data)
    train_keys, heldout_keys = split_holdout(index, 1, seed=cfg.seed)
    assert len(heldout_keys) == 6 and len(train_keys) == 18
    heldout = PreparedDataset(data, keys=heldout_keys, ref_includes_target=True)
    references = PreparedDataset(data, keys=train_keys)
    pipe = load_frozen_pipeline(model)

    torch.manual_seed(cfg.seed)
    untrained = get_method(cfg.method, method_config_for_data(cfg.method, {}, info))
    untrained.attach(pipe)
    before = identity_gap(untrained, pipe, heldout, references, repeats=16)
    untrained.detach()

    result = train_local(cfg, data, str(model), output_dir=root / "run")
    trained = load_method(result.method_path, pipe)
    after = identity_gap(trained, pipe, heldout, references, repeats=16)
    assert after.match < before.match  # it learned to denoise these faces at all
    assert identity_flows(after.gap, before.gap), (before, after)
    assert before.gap < MARGIN, before  # the untrained adapter shows no such margin

    # An adapter that ignores its identity input: same trained weights, identity features replaced by constants.
    original = trained.identity_tokens
    trained.identity_tokens = lambda face, patches: original(torch.zeros_like(face), torch.zeros_like(patches))
    blind = identity_gap(trained, pipe, heldout, references, repeats=16)
    assert blind.gap == 0.0 and not identity_flows(blind.gap, before.gap)
