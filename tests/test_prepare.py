"""The prepare stage: cached tensors have the right shapes and values, re-runs are no-ops, changes recompute only
what changed, and the dataset over the cache samples identity groups deterministically and per rank."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from idforge.errors import DataError
from idforge.train.config import PrepareConfig


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    from idforge.train.testdata import write_curated_synthetic

    return write_curated_synthetic(tmp_path_factory.mktemp("curated") / "ds", identities=3, images_per_identity=3)


@pytest.fixture(scope="module")
def prepared(curated, tiny_sd15_dir, tiny_clip_dir, tmp_path_factory):
    from idforge.train.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "p"
    return prepare_dataset(curated, str(tiny_sd15_dir), out, PrepareConfig(), clip_model=str(tiny_clip_dir))


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_prepare_writes_items_with_model_shapes(prepared, curated):
    import pandas as pd
    from safetensors.torch import load_file

    index = prepared.items
    assert len(index) == 9 and index["identity"].nunique() == 3
    assert prepared.computed == 9 and prepared.text_computed and not prepared.noop
    info = prepared.info
    assert info["resolution"] == 64  # tiny sd15: sample_size 8 x vae scale 8
    assert info["shapes"]["latents"] == [4, 8, 8] and info["shapes"]["latents_flip"] == [4, 8, 8]
    assert info["shapes"]["clip_patch_tokens"] == [17, 32]  # 1 + (32/8)^2 tokens, hidden 32
    assert info["shapes"]["face_embed"] == [512] and info["shapes"]["ref_pixels"] == [3, 112, 112]
    item = load_file(str(prepared.output_dir / index["file"][0]))
    # flipping the image changes its latents; the cached face embedding is curation's row, bit for bit
    assert not np.allclose(item["latents"].float().numpy(), item["latents_flip"].float().numpy())
    manifest = pd.read_parquet(curated / "manifest.parquet")
    row = manifest[manifest["sha256"] == index["sha256"][0]].iloc[0]
    emb = np.load(curated / "embeddings.npy")[row["embedding_row"]]
    np.testing.assert_array_equal(item["face_embed"].numpy(), emb)
    assert 0.0 <= float(item["face_mask"].min()) and float(item["face_mask"].max()) <= 1.0
    assert float(item["face_mask"].mean()) > 0.1  # the face ellipse covers a good part of the crop
    text = load_file(str(prepared.output_dir / info["text_file"]))
    n_caps = len(PrepareConfig().caption_templates)  # one class noun (the default "person")
    assert text["text_embeds"].shape == (n_caps, 77, 32) and text["input_ids"].shape == (n_caps, 77)
    assert [c["prompt"] for c in info["captions"]][0] == "a photo of a person"


def test_latents_match_a_direct_vae_encoding(prepared, curated, tiny_sd15_dir):
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image
    from safetensors.torch import load_file

    vae = AutoencoderKL.from_pretrained(tiny_sd15_dir, subfolder="vae")
    row = prepared.items.iloc[4]
    stem = row["source"].split("/")[-1][:-4]
    path = next(p for p in (curated / "crops").glob("*_512.png") if p.stem.startswith(stem))
    img = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    got = load_file(str(prepared.output_dir / row["file"]))["latents"].float()
    torch.testing.assert_close(got, want[0], atol=2e-3, rtol=2e-3)  # stored as float16


def test_second_run_is_a_noop(prepared, curated, tiny_sd15_dir, tiny_clip_dir):
    from idforge.train.prepare import prepare_dataset

    before = _mtimes(prepared.output_dir)
    again = prepare_dataset(curated, str(tiny_sd15_dir), prepared.output_dir, PrepareConfig(),
                            clip_model=str(tiny_clip_dir))
    assert again.noop and again.computed == 0 and again.reused == 9
    assert again.fingerprint == prepared.fingerprint
    assert _mtimes(prepared.output_dir) == before  # nothing rewritten


def test_changed_input_recomputes_only_that_item(curated, prepared, tiny_sd15_dir, tiny_clip_dir, tmp_path):
    import pandas as pd
    from PIL import Image

    from idforge.train.prepare import prepare_dataset

    ds = tmp_path / "ds"
    shutil.copytree(curated, ds)
    out = tmp_path / "p"
    shutil.copytree(prepared.output_dir, out)
    manifest = pd.read_parquet(ds / "manifest.parquet")
    crop = ds / manifest["aligned_ffhq"][0]
    arr = np.asarray(Image.open(crop)).copy()
    arr[:, :, 0] = 255 - arr[:, :, 0]
    Image.fromarray(arr).save(crop)
    changed = prepare_dataset(ds, str(tiny_sd15_dir), out, PrepareConfig(), clip_model=str(tiny_clip_dir))
    assert changed.computed == 1 and changed.reused == 8 and not changed.text_computed
    assert changed.pruned == 1  # the old version of that item is gone
    old_keys, new_keys = set(prepared.items["key"]), set(changed.items["key"])
    assert len(new_keys - old_keys) == 1 and len(old_keys - new_keys) == 1
    assert changed.fingerprint != prepared.fingerprint
    # new captions: only the text file is recomputed
    cfg = PrepareConfig(caption_templates=["a portrait of a {class_noun}"])
    captions = prepare_dataset(ds, str(tiny_sd15_dir), out, cfg, clip_model=str(tiny_clip_dir))
    assert captions.computed == 0 and captions.text_computed
    assert [c["prompt"] for c in captions.info["captions"]] == ["a portrait of a person"]
    assert len(list((out / "text").glob("*.safetensors"))) == 1


def test_prepare_sdxl_caches_both_encoders(curated, tiny_sdxl_dir, tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file

    from idforge.train.prepare import prepare_dataset

    idx = prepare_dataset(curated, str(tiny_sdxl_dir), tmp_path / "p", PrepareConfig(flip=False),
                          clip_model=str(tiny_clip_dir))
    text = load_file(str(idx.output_dir / idx.info["text_file"]))
    assert text["text_embeds"].shape[-1] == 64  # both encoders' penultimate states concatenated (32 + 32)
    assert text["pooled_text_embeds"].shape == (4, 32) and text["input_ids_2"].shape == (4, 77)
    assert "latents_flip" not in idx.info["shapes"]


def test_bad_inputs_raise_data_errors(curated, tiny_sd15_dir, tiny_clip_dir, tmp_path):
    import pandas as pd

    from idforge.train.dataset import PreparedDataset
    from idforge.train.prepare import prepare_dataset

    with pytest.raises(DataError, match="manifest.parquet does not exist"):
        prepare_dataset(tmp_path / "nothing", str(tiny_sd15_dir), tmp_path / "o", clip_model=str(tiny_clip_dir))
    ds = tmp_path / "ds"
    shutil.copytree(curated, ds)
    manifest = pd.read_parquet(ds / "manifest.parquet")
    os.remove(ds / manifest["aligned_ffhq"][1])
    with pytest.raises(DataError, match="aligned crop .* is missing"):
        prepare_dataset(ds, str(tiny_sd15_dir), tmp_path / "o", clip_model=str(tiny_clip_dir))
    manifest.loc[:, "status"] = "rejected"
    manifest.to_parquet(ds / "manifest.parquet")
    with pytest.raises(DataError, match="no accepted face"):
        prepare_dataset(ds, str(tiny_sd15_dir), tmp_path / "o", clip_model=str(tiny_clip_dir))
    assert not (tmp_path / "o" / "prepared.json").exists()  # nothing half-written
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedDataset(tmp_path / "o")
    with pytest.raises(ValueError, match="class_noun"):
        PrepareConfig(caption_templates=["a photo"])


# ----------------------------------------------------------------------------------------------------------------
# the dataset over the cache


def test_dataset_samples_identity_groups(prepared):
    import torch

    from idforge.train.dataset import PreparedDataset

    # Infinite-ID: one reference, a different photo of the same person
    ds = PreparedDataset(prepared.output_dir, refs_per_item=1, ref_includes_target=False, flip_prob=0.0)
    assert len(ds) == 9
    for i in range(len(ds)):
        row = int(ds.targets[i])
        refs = ds.reference_rows(row, np.random.default_rng(i))
        assert refs != [row]
        assert ds.all_items.at[refs[0], "identity"] == ds.all_items.at[row, "identity"]
        s = ds[(i, 3)]
        assert s["face_embeds"].shape == (1, 512) and s["clip_patch_tokens"].shape == (1, 17, 32)
        assert s["latents"].shape == (4, 8, 8) and s["face_mask"].shape == (1, 8, 8)
        torch.testing.assert_close(s["latents"], ds.item(row)["latents"])  # flip_prob 0
        target_embed = ds.item(row)["face_embed"]
        assert not torch.equal(s["face_embeds"][0], target_embed)
        assert float(s["face_embeds"][0] @ target_embed) > 0.6  # same identity: close embeddings
    # IDAdapter: N = 3 different images of one identity (each identity has exactly 3)
    ds3 = PreparedDataset(prepared.output_dir, refs_per_item=3, ref_includes_target=True, flip_prob=1.0)
    s = ds3[(0, 11)]
    assert s["face_embeds"].shape == (3, 512)
    assert len({tuple(e[:4].tolist()) for e in s["face_embeds"]}) == 3  # without replacement
    row = int(ds3.targets[0])
    torch.testing.assert_close(s["latents"], ds3.item(row)["latents_flip"])  # flip_prob 1
    from idforge.train.prepare import flip_kps

    torch.testing.assert_close(flip_kps(s["target_kps"], 64), ds3.item(row)["target_kps"])
    # deterministic per (index, position), varies with the position
    for k in s:
        torch.testing.assert_close(s[k], ds3[(0, 11)][k])
    assert any(not torch.equal(ds[(0, p)]["input_ids"], ds[(0, 0)]["input_ids"]) for p in range(1, 20))


def test_target_landmarks_sit_on_the_drawn_face(prepared):
    from idforge.faces.align import template_for
    from idforge.train.dataset import PreparedDataset

    ds = PreparedDataset(prepared.output_dir, flip_prob=0.0)
    kps = ds.item(0)["target_kps"].numpy()
    # the crop is FFHQ-aligned, so the landmarks are (nearly) the template scaled to 64 px
    want = (template_for(512) + 0.5) * 64 / 512 - 0.5
    assert np.abs(kps - want).max() < 2.0


def test_sampler_shards_ranks_and_resumes():
    import itertools

    from idforge.train.dataset import ShardedStreamSampler

    n = 7
    full = [k for k, _ in itertools.islice(iter(ShardedStreamSampler(n, 0, 1, seed=3)), 2 * n)]
    assert sorted(full[:n]) == list(range(n)) and sorted(full[n:]) == list(range(n))  # epochs are permutations
    r0 = list(itertools.islice(iter(ShardedStreamSampler(n, 0, 2, seed=3)), 7))
    r1 = list(itertools.islice(iter(ShardedStreamSampler(n, 1, 2, seed=3)), 7))
    merged = [x for pair in zip(r0, r1, strict=True) for x in pair]
    assert [k for k, _ in merged] == full  # ranks interleave the one global stream: disjoint shards
    assert [p for _, p in merged] == list(range(14))
    resumed = list(itertools.islice(iter(ShardedStreamSampler(n, 1, 2, seed=3, start=4)), 3))
    assert resumed == r1[4:7]
    with pytest.raises(ValueError):
        ShardedStreamSampler(n, 2, 2)


def test_loader_batches_match_trainbatch(prepared):
    from idforge.methods.types import TrainBatch
    from idforge.train.dataset import PreparedDataset, make_loader

    ds = PreparedDataset(prepared.output_dir, refs_per_item=2, ref_includes_target=True)
    batch = TrainBatch.from_dict(next(iter(make_loader(ds, batch_size=4))))
    assert batch.latents.shape == (4, 4, 8, 8) and batch.face_embeds.shape == (4, 2, 512)
    assert batch.text_embeds.shape == (4, 77, 32) and batch.identity.shape == (4,)
    refs = ds.identity_refs("id01", n=2)
    assert refs.num_refs == 2 and refs.face_crops.shape == (2, 3, 112, 112)


# ----------------------------------------------------------------------------------------------------------------
# prepare.target: photo


# the fixtures curated_photos / prepared_photos (tests/fixtures/dataset.py) use these settings
PHOTO_CFG = dict(target="photo", bucket_step=16)  # tiny model: 64 px native, buckets 48x80 / 64x64 / 80x48


def test_photo_target_encodes_each_bucket_at_its_size(prepared_photos, curated_photos, tiny_sd15_dir):
    import pandas as pd
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image
    from safetensors.torch import load_file

    from idforge.train.prepare import photo_frame, read_curated

    index, info = prepared_photos.items, prepared_photos.info
    assert info["target"] == "photo" and len(index) == 9
    buckets = {(int(h), int(w)) for h, w in zip(index["bucket_h"], index["bucket_w"], strict=True)}
    assert buckets == {(48, 80), (64, 64), (80, 48)}, buckets
    assert sum(info["buckets"].values()) == 9 and set(info["buckets"]) == {"48x80", "64x64", "80x48"}
    on_disk = pd.read_parquet(prepared_photos.output_dir / "index.parquet")
    assert on_disk["bucket_h"].tolist() == index["bucket_h"].tolist()
    vae = AutoencoderKL.from_pretrained(tiny_sd15_dir, subfolder="vae")
    cfg = PrepareConfig(**PHOTO_CFG)
    for rec in index.to_dict("records"):
        h, w = rec["bucket_h"], rec["bucket_w"]
        item = load_file(str(prepared_photos.output_dir / rec["file"]))
        assert item["latents"].shape == (4, h // 8, w // 8) and item["face_mask"].shape == (1, h // 8, w // 8)
        assert item["latents_flip"].shape == item["latents"].shape
        assert item["ref_pixels"].shape == (3, 112, 112)  # the references stay the aligned crops
        kps = item["target_kps"].numpy()
        assert (kps[:, 0] > 0).all() and (kps[:, 0] < w).all() and (kps[:, 1] > 0).all() and (kps[:, 1] < h).all()
        # the face mask (drawn in the aligned crop) covers the landmarks in the target frame
        mask = item["face_mask"].float()[0].numpy()
        lat = ((kps[[0, 1, 2]] + 0.5) / 8 - 0.5).round().astype(int)
        assert all(mask[y, x] > 0.5 for x, y in lat), (mask.round(1), lat)
    # the latents are the photo's crop around the face, not the aligned crop
    rec = index[index["bucket_w"] > index["bucket_h"]].iloc[0]
    row = next(r for r in read_curated(curated_photos, cfg) if r.sha256 == rec["sha256"])
    frame = photo_frame(row, cfg, 64)
    assert frame.bucket == (int(rec["bucket_h"]), int(rec["bucket_w"]))
    crop = Image.open(row.photo).convert("RGB").resize((frame.bucket[1], frame.bucket[0]), Image.BICUBIC,
                                                        box=frame.box)
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean[0] * vae.config.scaling_factor
    got = load_file(str(prepared_photos.output_dir / rec["file"]))["latents"].float()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_photo_target_keys_follow_its_settings(prepared_photos, curated_photos, tiny_sd15_dir, tiny_clip_dir,
                                               tmp_path):
    from idforge.train.prepare import prepare_dataset

    again = prepare_dataset(curated_photos, str(tiny_sd15_dir), prepared_photos.output_dir,
                            PrepareConfig(**PHOTO_CFG), clip_model=str(tiny_clip_dir))
    assert again.noop and again.items["bucket_w"].tolist() == prepared_photos.items["bucket_w"].tolist()
    # the aligned target and another context factor are other items; aligned items are all one square
    aligned = PrepareConfig().item_params()
    assert "target" not in aligned and "context_factor" not in aligned  # aligned keys as before the photo target
    wider = PrepareConfig(**PHOTO_CFG, context_factor=4.0).item_params()
    assert wider != PrepareConfig(**PHOTO_CFG).item_params()
    idx = prepare_dataset(curated_photos, str(tiny_sd15_dir), tmp_path / "a", PrepareConfig(flip=False),
                          clip_model=str(tiny_clip_dir))
    assert set(idx.items["key"]).isdisjoint(prepared_photos.items["key"])
    assert set(zip(idx.items["bucket_h"], idx.items["bucket_w"], strict=True)) == {(64, 64)}


def test_photo_target_refuses_datasets_without_photos(curated_photos, tiny_sd15_dir, tiny_clip_dir, tmp_path):
    import pandas as pd

    from idforge.train.prepare import prepare_dataset

    ds = tmp_path / "ds"
    shutil.copytree(curated_photos, ds)
    manifest = pd.read_parquet(ds / "manifest.parquet")
    manifest["photo"] = None  # a dataset curated before photos were kept
    manifest.to_parquet(ds / "manifest.parquet")
    with pytest.raises(DataError, match="needs each face's photo.*photo of photos/id00_0.png is missing"):
        prepare_dataset(ds, str(tiny_sd15_dir), tmp_path / "o", PrepareConfig(**PHOTO_CFG),
                        clip_model=str(tiny_clip_dir))
    with pytest.raises(ValueError, match="matted"):
        PrepareConfig(target="photo", image_source="matted")
    with pytest.raises(ValueError, match="engine 'local' only"):
        PrepareConfig(target="photo", engine="ray")
    with pytest.raises(DataError, match="bucket_step 12 is not a multiple"):
        prepare_dataset(curated_photos, str(tiny_sd15_dir), tmp_path / "o2",
                        PrepareConfig(target="photo", bucket_step=12, bucket_area_tolerance=0.3),
                        clip_model=str(tiny_clip_dir))
