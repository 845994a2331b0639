"""The bucket sampler: one bucket per batch, every item once per epoch across ranks, seeded, resumable; and the
loader over a multi-bucket prepared set only ever stacks one shape."""

from __future__ import annotations

import itertools

import pytest

from idforge.errors import DataError
from idforge.train.bucket_sampler import BucketBatchSampler

# 11 items in three buckets of 5, 4 and 2
BUCKETS = [(64, 64), (48, 80), (64, 64), (80, 48), (48, 80), (64, 64), (48, 80), (64, 64), (80, 48), (48, 80),
           (64, 64)]


def _take(sampler: BucketBatchSampler, n: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(iter(sampler), n))


def test_batches_hold_one_bucket_and_an_epoch_uses_every_item_once():
    s = BucketBatchSampler(BUCKETS, batch_size=2, seed=3)
    assert s.batches_per_epoch == 3 + 2 + 1  # ceil(5/2) + ceil(4/2) + ceil(2/2)
    epoch = _take(s, s.batches_per_epoch)
    for batch in epoch:
        assert len({BUCKETS[i] for i, _ in batch}) == 1
    items = sorted(i for batch in epoch for i, _ in batch)
    assert items == list(range(len(BUCKETS)))
    positions = [p for batch in _take(s, 3 * s.batches_per_epoch) for _, p in batch]
    assert len(set(positions)) == len(positions)  # unique positions seed the samples' random choices
    # the next epoch is another order (seeded by the epoch), the same seed is the same stream
    second = _take(BucketBatchSampler(BUCKETS, 2, seed=3), 2 * s.batches_per_epoch)[s.batches_per_epoch:]
    assert [[i for i, _ in b] for b in second] != [[i for i, _ in b] for b in epoch]
    assert _take(BucketBatchSampler(BUCKETS, 2, seed=3), 9) == _take(s, 9)
    assert _take(BucketBatchSampler(BUCKETS, 2, seed=4), 9) != _take(s, 9)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_epoch_and_resume_where_they_stopped(world):
    one = BucketBatchSampler(BUCKETS, 2, seed=1)
    full = _take(one, world * 2 * one.batches_per_epoch)
    per_rank = [_take(BucketBatchSampler(BUCKETS, 2, r, world, seed=1), 2 * one.batches_per_epoch)
                for r in range(world)]
    # the ranks interleave the one global stream: disjoint batches, together every item once per epoch
    merged = [per_rank[g % world][g // world] for g in range(len(per_rank[0]) * world)]
    assert merged == full[:len(merged)]
    first_epoch = merged[:one.batches_per_epoch]
    assert sorted(i for b in first_epoch for i, _ in b) == list(range(len(BUCKETS)))
    resumed = _take(BucketBatchSampler(BUCKETS, 2, world - 1, world, seed=1, start=3), 4)
    assert resumed == per_rank[world - 1][3:7]


def test_bad_arguments():
    with pytest.raises(DataError, match="empty"):
        BucketBatchSampler([], 2)
    with pytest.raises(ValueError, match="rank 2"):
        BucketBatchSampler(BUCKETS, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(BUCKETS, 0)


def test_loader_over_photo_buckets_batches_one_shape(prepared_photos):
    import torch

    from idforge.methods.types import TrainBatch
    from idforge.train.dataset import PreparedDataset, collate, make_loader
    from idforge.train.prepare import flip_kps

    ds = PreparedDataset(prepared_photos.output_dir, refs_per_item=2, ref_includes_target=True, flip_prob=1.0)
    buckets = ds.target_buckets()
    assert len(set(buckets)) == 3
    loader = make_loader(ds, batch_size=2, seed=0)
    shapes = set()
    for batch in itertools.islice(iter(loader), 10):
        tb = TrainBatch.from_dict(batch)
        h, w = tb.latents.shape[-2:]
        assert tb.face_mask.shape[-2:] == (h, w) and tb.face_embeds.shape[1] == 2
        shapes.add((h * 8, w * 8))
    assert shapes == set(buckets)  # every bucket came round, each batch one shape
    # a flipped photo target mirrors its landmarks across its own width, not the nominal resolution
    wide = next(i for i, b in enumerate(buckets) if b[1] != b[0])
    row = int(ds.targets[wide])
    s = ds[(wide, 0)]
    torch.testing.assert_close(flip_kps(s["target_kps"], buckets[wide][1]), ds.item(row)["target_kps"])
    # resuming mid-stream gives the batches the uninterrupted loader gave
    full = list(itertools.islice(iter(make_loader(ds, 2, seed=0)), 6))
    resumed = list(itertools.islice(iter(make_loader(ds, 2, seed=0, start_sample=8)), 2))
    for a, b in zip(full[4:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="whole number of batches"):
        make_loader(ds, 2, start_sample=3)
    other = next(i for i, b in enumerate(buckets) if b != buckets[wide])
    with pytest.raises(DataError, match="'latents' shapes differ"):
        collate([ds[(wide, 0)], ds[(other, 0)]])


def test_training_samples_draw_the_most_common_bucket(prepared_photos, tiny_sd15_dir):
    from collections import Counter

    from idforge.methods.registry import get_method
    from idforge.methods.testing import load_frozen_pipeline
    from idforge.train.config import TrainConfig
    from idforge.train.dataset import PreparedDataset
    from idforge.train.loop import _sample_grid, method_config_for_data

    ds = PreparedDataset(prepared_photos.output_dir)
    pipe = load_frozen_pipeline(tiny_sd15_dir)
    method = get_method("infinite-id", method_config_for_data("infinite-id", {}, ds.info))
    method.attach(pipe)
    images = _sample_grid(method, pipe, ds, TrainConfig(sample_steps=2), refs=1)
    (h, w), _ = Counter(ds.target_buckets()).most_common(1)[0]
    assert images[0].size == (w, h)
