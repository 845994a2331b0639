"""Prepare on Ray Data (``prepare.engine=ray``) on a local two-worker Ray: the shards hold the local engine's tensors
bit for bit, a rerun writes nothing (and reads no input file to know it), and one changed input recomputes only its
item, into a new shard, leaving every other shard untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from idforge.train.config import PrepareConfig

# batches of 4 on both engines and shards of 4: each engine encodes the same groups of images together
LOCAL = PrepareConfig(batch_size=4)
ON_RAY = PrepareConfig(batch_size=4, engine="ray", workers=2, shard_items=4)


pytestmark = pytest.mark.slow  # two encoder actors start (each loads the encoders): ~1-2 min on 2 shared cores


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """A local two-CPU Ray; its workers get the S3 server's credentials (they start before a test patches env)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": s3_server.env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    from idforge.train.testdata import write_curated_synthetic

    ds = write_curated_synthetic(tmp_path_factory.mktemp("curated") / "ds", identities=3, images_per_identity=3)
    # what `idforge curate` records: the digest of its per-file settings and models (the stored-hash key uses it)
    (ds / "report.json").write_text(json.dumps({"output": str(ds), "config_digest": "0123456789abcdef"}))
    return ds


@pytest.fixture(scope="module")
def both(curated, tiny_sd15_dir, tiny_clip_dir, local_ray, tmp_path_factory):
    from idforge.train.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("prepared")
    local = prepare_dataset(curated, str(tiny_sd15_dir), root / "local", LOCAL, clip_model=str(tiny_clip_dir))
    on_ray = prepare_dataset(curated, str(tiny_sd15_dir), root / "ray", ON_RAY, clip_model=str(tiny_clip_dir))
    return local, on_ray


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _items_by_source(prepared_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from idforge.train.dataset import PreparedDataset

    ds = PreparedDataset(prepared_dir)
    return {ds.all_items.at[i, "source"]: ds.item(i) for i in range(len(ds.all_items))}


def test_ray_engine_writes_shards_with_the_local_engines_tensors(both):
    from idforge.train.dataset import PreparedDataset

    local, on_ray = both
    assert on_ray.computed == 9 and on_ray.text_computed and not on_ray.noop
    out = on_ray.output_dir
    shard_files = sorted((out / "shards").glob("*.safetensors"))
    assert len(shard_files) == 3 and not (out / "items").exists()  # 9 items in shards of 4: 4 + 4 + 1
    assert on_ray.info["layout"] == "shards" and on_ray.info["input_hashes"] == "stored"
    assert on_ray.info["shapes"] == local.info["shapes"] and on_ray.info["resolution"] == local.info["resolution"]
    assert on_ray.info["captions"] == local.info["captions"]
    a, b = _items_by_source(local.output_dir), _items_by_source(out)
    assert sorted(a) == sorted(b)
    for source in a:
        assert sorted(a[source]) == sorted(b[source])
        for name in a[source]:
            assert torch.equal(a[source][name], b[source][name]), (source, name)
    # the training samples over both caches are the same, sample for sample
    da, db = PreparedDataset(local.output_dir, refs_per_item=2), PreparedDataset(out, refs_per_item=2)
    for i in range(len(da)):
        sa, sb = da[(i, 5)], db[(i, 5)]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), i


def test_ray_rerun_is_a_noop_without_reading_inputs(both, curated, tiny_sd15_dir, tiny_clip_dir, monkeypatch):
    from idforge.train import prepare

    _, on_ray = both
    before = _mtimes(on_ray.output_dir)

    hash_file = prepare._sha256_file

    def no_hashing(path, *a):  # the stored hashes decide: reading the inputs would be the 10^5-file cost again
        assert curated not in Path(path).parents, f"re-hashed the input {path}"
        return hash_file(path, *a)  # model files are fingerprinted, as the local engine does

    monkeypatch.setattr(prepare, "_sha256_file", no_hashing)
    again = prepare.prepare_dataset(curated, str(tiny_sd15_dir), on_ray.output_dir, ON_RAY,
                                    clip_model=str(tiny_clip_dir))
    assert again.noop and again.computed == 0 and again.reused == 9
    assert again.fingerprint == on_ray.fingerprint
    assert _mtimes(on_ray.output_dir) == before


def test_ray_one_changed_input_recomputes_only_its_item(both, curated, tiny_sd15_dir, tiny_clip_dir, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from idforge.train.prepare import prepare_dataset

    _, on_ray = both
    ds, out = tmp_path / "ds", tmp_path / "p"
    shutil.copytree(curated, ds)
    shutil.copytree(on_ray.output_dir, out)
    table = pq.read_table(ds / "manifest.parquet")
    crop = ds / table.column("aligned_ffhq")[0].as_py()
    changed_source = table.column("source")[0].as_py()
    arr = np.asarray(Image.open(crop)).copy()
    arr[:, :, 0] = 255 - arr[:, :, 0]
    Image.fromarray(arr).save(crop)
    # a crop changed behind curation's back is not seen: the key comes from what curation stored
    same = prepare_dataset(ds, str(tiny_sd15_dir), out, ON_RAY, clip_model=str(tiny_clip_dir))
    assert same.noop
    # re-curating a changed photo records its new content hash: now that item (only) is recomputed
    shas = table.column("sha256").to_pylist()
    shas[0] = "f" * 64
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(shas, pa.string()))
    pq.write_table(table, ds / "manifest.parquet")
    before = _mtimes(out)
    changed = prepare_dataset(ds, str(tiny_sd15_dir), out, ON_RAY, clip_model=str(tiny_clip_dir))
    assert changed.computed == 1 and changed.reused == 8 and not changed.text_computed
    assert changed.pruned == 0  # the old version is dead bytes in a shard whose other items are alive
    new_shards = set(changed.items["file"]) - set(on_ray.items["file"])
    assert len(new_shards) == 1 and (changed.items["file"] == next(iter(new_shards))).sum() == 1
    new_shard = next(iter(new_shards))
    after = {k: v for k, v in _mtimes(out).items() if k.startswith("shards/")}
    assert after == {k: v for k, v in before.items() if k.startswith("shards/")} | {new_shard: after[new_shard]}
    old, new = _items_by_source(on_ray.output_dir), _items_by_source(out)
    assert not torch.equal(old[changed_source]["latents"], new[changed_source]["latents"])
    for source in old:
        if source != changed_source:
            assert all(torch.equal(old[source][k], new[source][k]) for k in old[source]), source


def test_ray_engine_refuses_an_output_of_the_local_engine(both, curated, tiny_sd15_dir, tiny_clip_dir):
    from idforge.errors import DataError
    from idforge.train.prepare import prepare_dataset

    local, _ = both
    with pytest.raises(DataError, match="local engine"):
        prepare_dataset(curated, str(tiny_sd15_dir), local.output_dir, ON_RAY, clip_model=str(tiny_clip_dir))


@pytest.mark.s3
def test_ray_engine_writes_shards_straight_to_s3(both, curated, tiny_sd15_dir, tiny_clip_dir, s3_env, s3_prefix,
                                                 tmp_path):
    from idforge.io.storage import open_storage
    from idforge.train.prepare import prepare_dataset

    local, _ = both
    out = f"{s3_prefix}/prepared"
    first = prepare_dataset(curated, str(tiny_sd15_dir), out, ON_RAY, clip_model=str(tiny_clip_dir))
    assert first.computed == 9 and first.info["num_shards"] == 3
    store = open_storage(out)
    listed = store.list(out)
    assert len([u for u in listed if "/shards/" in u]) == 3 and not [u for u in listed if "/items/" in u]
    again = prepare_dataset(curated, str(tiny_sd15_dir), out, ON_RAY, clip_model=str(tiny_clip_dir))
    assert again.noop and store.list(out) == listed
    down = tmp_path / "down"
    store.download_dir(out, down)
    a, b = _items_by_source(local.output_dir), _items_by_source(down)
    assert sorted(a) == sorted(b) and all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])
