"""Streamed per-rank training input (``train.input: stream``): the samples equal ``PreparedDataset``'s over the same
prepared set, ranks split the identities and read only their own shards, the shard cache stays within its byte
bound, a stream resumed at a position continues exactly, and a streamed training run killed after a checkpoint
resumes bit-exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from idforge.errors import DataError
from idforge.train.config import TrainConfig
from tests.fixtures.dataset import prepare_synthetic
from tests.fixtures.resume import assert_same_end, killed_and_resumed


@pytest.fixture(scope="module")
def per_item(tmp_path_factory, tiny_sd15_dir, tiny_clip_dir) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("stream-data"), tiny_sd15_dir, tiny_clip_dir, identities=4,
                             images_per_identity=3, size=128)


@pytest.fixture(scope="module")
def sharded(per_item) -> Path:
    from idforge.train.shards import reshard

    return reshard(per_item, per_item.parent / "sharded", shard_items=2)  # 12 items, 6 shards


def _dataset(sharded: Path, tmp: Path, rank: int = 0, world: int = 1, copy: bool = False,
             max_bytes: int = 1 << 30, **kw):
    from idforge.train.stream import ShardCache, StreamDataset

    cache = ShardCache(str(sharded), tmp / f"cache{rank}", max_bytes, copy=copy)
    return StreamDataset(sharded, cache, rank=rank, world_size=world, **kw)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_samples_equal_the_prepared_datasets(per_item, sharded, tmp_path):
    from idforge.train.dataset import PreparedDataset

    stream = _dataset(sharded, tmp_path, refs_per_item=2, seed=3)
    for root in (per_item, sharded):  # the per-item cache and its shards read the same
        ref = PreparedDataset(root, refs_per_item=2, seed=3)
        assert len(ref) == len(stream) == 12
        for row in range(12):
            for position in (0, 7, 1001):
                assert _equal(stream[(row, position)], ref[(row, position)]), (root, row, position)
        got, want = stream.identity_refs("id01", n=2), ref.identity_refs("id01", n=2)
        assert got.class_noun == want.class_noun
        for name in ("face_embeds", "clip_image_embeds", "clip_patch_tokens", "face_crops"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    # a different seed draws different references/captions/flips somewhere
    other = _dataset(sharded, tmp_path, refs_per_item=2, seed=4)
    assert not all(_equal(stream[(r, 0)], other[(r, 0)]) for r in range(12))


def test_ranks_split_identities_and_read_only_their_shards(sharded, tmp_path):
    from idforge.train.stream import RankStream

    seen_ids, seen_rows = [], []
    for rank in range(2):
        ds = _dataset(sharded, tmp_path, rank=rank, world=2, copy=True)
        stream = iter(RankStream(ds, seed=0, world_size=2, rank=rank, window=2))
        rows = [next(stream)[0] for _ in range(len(ds))]
        assert sorted(rows) == sorted(int(r) for r in ds.targets)  # every item of the rank once per epoch
        batch = [ds[(r, p)] for r, p in [next(stream) for _ in range(4)]]  # samples, references included
        own = {ds.shard_of(r) for r in ds.targets}
        fetched = {p.name for p in (tmp_path / f"cache{rank}" / "shards").glob("*.safetensors")}
        assert fetched and fetched <= {Path(ds.files[s]).name for s in own}  # only its own shards came over
        assert all(int(s["identity"]) in {ds.identity_ids[r] for r in ds.targets} for s in batch)
        seen_ids.append(set(ds.members))
        seen_rows.append(set(rows))
    assert seen_ids[0].isdisjoint(seen_ids[1]) and len(seen_ids[0] | seen_ids[1]) == 4
    assert len(seen_ids[0]) == len(seen_ids[1]) == 2  # balanced: 3 items each
    assert seen_rows[0].isdisjoint(seen_rows[1]) and len(seen_rows[0] | seen_rows[1]) == 12
    with pytest.raises(DataError, match="fewer workers than identities"):
        _dataset(sharded, tmp_path, rank=4, world=5)


def test_shard_cache_stays_within_its_byte_bound(sharded, tmp_path):
    from idforge.train.stream import RankStream

    sizes = sorted(p.stat().st_size for p in (sharded / "shards").glob("*.safetensors"))
    bound = sizes[-1] + sizes[0]  # room for one or two shards of the six
    ds = _dataset(sharded, tmp_path, copy=True, max_bytes=bound)
    stream = iter(RankStream(ds, seed=1, window=1))
    for _ in range(3 * len(ds)):  # three epochs
        ds[next(stream)]
        on_disk = sum(p.stat().st_size for p in (tmp_path / "cache0" / "shards").glob("*.safetensors"))
        assert on_disk == ds.cache.bytes <= bound
    assert ds.cache.peak_bytes <= bound and ds.cache.misses > 6  # shards were evicted and fetched again
    assert ds.cache.hits > 0
    with pytest.raises(DataError, match="stream_cache_bytes"):
        _dataset(sharded, tmp_path, copy=True, max_bytes=0)


def test_a_resumed_stream_continues_where_it_stopped(sharded, tmp_path):
    from idforge.train.stream import RankStream

    ds = _dataset(sharded, tmp_path, rank=1, world=2)
    whole = iter(RankStream(ds, seed=5, world_size=2, rank=1, window=2))
    head = [next(whole) for _ in range(20)]
    resumed = iter(RankStream(ds, seed=5, start=13, world_size=2, rank=1, window=2))
    assert [next(resumed) for _ in range(7)] == head[13:]
    # epochs differ in order (a fresh permutation each) but cover the same items
    n = len(ds)
    assert sorted(r for r, _ in head[:n]) == sorted(r for r, _ in head[n:2 * n])
    assert [r for r, _ in head[:n]] != [r for r, _ in head[n:2 * n]] or n < 3


def test_stream_refuses_the_per_item_layout(per_item, tmp_path):
    from idforge.train.stream import StreamInput

    with pytest.raises(DataError, match="prepare.engine=ray"):
        StreamInput(str(per_item), None, TrainConfig(input="stream"), 0, cache_dir=tmp_path)


def test_streamed_training_killed_after_a_checkpoint_resumes_bit_exactly(sharded, tiny_sd15_dir, tmp_path,
                                                                          monkeypatch):
    from idforge.train.population import train_local

    monkeypatch.setenv("IDFORGE_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(method="infinite-id", steps=4, batch_size=2, lr=1e-2, checkpoint_every=2, report_every=2,
                      input="stream", stream_window_shards=2)
    whole, resumed = killed_and_resumed(cfg, sharded, str(tiny_sd15_dir), tmp_path)
    assert resumed.metrics["resumed_from"] == 2
    assert_same_end(whole, resumed)
    # the streamed order is its own: not the local input's run
    local = train_local(cfg.model_copy(update={"input": "local"}), sharded, str(tiny_sd15_dir),
                        output_dir=tmp_path / "local")
    assert np.isfinite(local.metrics["loss"]) and local.metrics["loss"] != whole.metrics["loss"]


@pytest.mark.s3
@pytest.mark.slow
def test_two_ray_train_workers_stream_only_their_shards_from_s3(per_item, tiny_sd15_dir, s3_server, s3_env, s3_prefix,
                                                                 tmp_path):
    """Each rank downloads its own identities' shards and nothing else; no node copies the prepared set."""
    import ray

    from idforge.io.storage import open_storage
    from idforge.train.population import train_population
    from idforge.train.shards import reshard

    data = reshard(per_item, tmp_path / "sharded", shard_items=3)  # 4 identities x 3 photos: one shard each
    open_storage(s3_prefix).upload_dir(data, f"{s3_prefix}/prepared")
    cache = tmp_path / "cache"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**s3_server.env, "IDFORGE_CACHE": str(cache)}})
    try:
        cfg = TrainConfig(method="infinite-id", steps=2, batch_size=2, lr=1e-3, checkpoint_every=2, report_every=2,
                          input="stream", stream_window_shards=1, stream_cache_bytes=1 << 20)
        result = train_population(cfg, f"{s3_prefix}/prepared", str(tiny_sd15_dir), workers=2,
                                  output_dir=tmp_path / "run")
    finally:
        ray.shutdown()
    assert result.steps == 2 and result.metrics["weight_checksums"][0] == result.metrics["weight_checksums"][1]
    fetched = {r: {p.name for p in cache.glob(f"stream/*/rank{r}/shards/shards/*.safetensors")} for r in (0, 1)}
    assert len(fetched[0]) == len(fetched[1]) == 2 and fetched[0].isdisjoint(fetched[1])
    assert not (cache / "prepared").exists()  # nothing localized whole


def test_streamed_training_validates_on_held_out_photos(sharded, tiny_sd15_dir, tmp_path, monkeypatch):
    from idforge.train.population import train_local

    monkeypatch.setenv("IDFORGE_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(method="infinite-id", steps=2, batch_size=2, checkpoint_every=2, report_every=2,
                      input="stream", holdout_per_identity=1, validate_every=2)
    result = train_local(cfg, sharded, str(tiny_sd15_dir), output_dir=tmp_path / "run")
    for name in ("val_matched", "val_mismatched", "val_identity_gap"):
        assert np.isfinite(result.metrics[name]), name
