"""Curation on Ray Data (``curate.engine=ray``) on a local two-worker Ray: from a local folder and from the local
S3 server, the manifest (sorted), embeddings, identities and every crop equal the local engine's on the same
input; the staging parts are gone afterwards."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest

from idforge.curate.config import CurateConfig
from idforge.curate.manifest import read_manifest
from idforge.curate.run import curate_dataset

PICK = ("obama/1.jpg", "obama/4.jpg", "ardern/1.jpg", "ardern/2.jpg", "macron/1.jpg", "macron/2.jpg")
# one sidecar caption and one from captions.csv (curate.captions): both engines carry them into the manifest
CAPTIONS = {"obama/1.jpg": "a man at a lectern", "ardern/2.jpg": "a woman smiling outdoors"}


@pytest.fixture(scope="module")
def photos(face_photos, tmp_path_factory) -> Path:
    """Six photos of three people (downscaled: fast), in person folders, plus a file that is not an image, and
    two captions (a sidecar ``.txt`` and a ``captions.csv`` row)."""
    root = face_photos.downscaled(PICK, tmp_path_factory.mktemp("ray-in") / "in", 400)
    (root / "notes.txt").write_text("not a photo")
    (root / "obama" / "1.txt").write_text(CAPTIONS["obama/1.jpg"] + "\n")
    (root / "captions.csv").write_text(f"source,caption\nardern/2.jpg,{CAPTIONS['ardern/2.jpg']}\n")
    return root


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """A local two-CPU Ray for this module; its workers get the S3 server's credentials (they start before any
    test's environment is patched)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": s3_server.env})
    yield
    ray.shutdown()


def _cfg(tmp: Path, engine: str) -> CurateConfig:
    return CurateConfig(engine=engine, workers=2, ray_batch_files=2, progress=False, matte={"backend": "landmarks"},
                        work_dir=str(tmp / "work"))


def _sorted_manifest(ds: Path):
    return read_manifest(ds).sort_values(["rel", "face_index"]).reset_index(drop=True)


def _same_dataset(a: Path, b: Path) -> None:
    ma, mb = _sorted_manifest(a), _sorted_manifest(b)
    assert ma.to_json() == mb.to_json()
    captioned = mb[mb["caption"] != ""]
    assert dict(zip(captioned["rel"], captioned["caption"], strict=True)) == CAPTIONS
    assert (a / "embeddings.npy").read_bytes() == (b / "embeddings.npy").read_bytes()
    assert (a / "identities.parquet").read_bytes() == (b / "identities.parquet").read_bytes()
    for col in ("aligned", "aligned_ffhq", "mask", "person_mask", "matted", "photo"):
        for rel in ma.loc[ma["status"] == "accepted", col]:
            assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    _photos_kept(b)


def _photos_kept(ds: Path) -> None:
    """Each accepted face's upright photo is in the dataset (prepare's photo target), at the source's aspect, and
    its face box lies inside it."""
    from PIL import Image

    acc = read_manifest(ds, accepted_only=True)
    assert len(acc) and (acc["photo"] != "").all()
    for rec in acc.to_dict("records"):
        with Image.open(ds / rec["photo"]) as im:
            pw, ph = im.size
        assert abs(pw / ph - rec["width"] / rec["height"]) < 0.01, rec["photo"]
        scale = rec["width"] / pw
        x0, y0, x1, y1 = (v / scale for v in rec["bbox"])
        assert -2 <= x0 < x1 <= pw + 2 and -2 <= y0 < y1 <= ph + 2


def test_ray_engine_gives_the_local_engines_dataset(photos, local_ray, tmp_path):
    local = tmp_path / "local"
    rep_local = curate_dataset(str(photos), str(local), cfg=_cfg(tmp_path, "local"))
    on_ray = tmp_path / "ray"
    rep_ray = curate_dataset(str(photos), str(on_ray), cfg=_cfg(tmp_path, "ray"))
    assert rep_ray.identities == rep_local.identities == 3
    assert rep_ray.reasons == rep_local.reasons == {"not_an_image": 1}
    _same_dataset(local, on_ray)
    assert not (on_ray / "_staging").exists() and not list(tmp_path.glob(".ray.*"))


@pytest.mark.s3
@pytest.mark.slow
def test_ray_engine_from_s3_to_s3(photos, local_ray, s3_env, s3_prefix, tmp_path):
    from idforge.io.storage import open_storage

    storage = open_storage(s3_prefix)
    storage.upload_dir(photos, f"{s3_prefix}/raw")
    local = tmp_path / "local"
    curate_dataset(f"{s3_prefix}/raw", str(local), cfg=_cfg(tmp_path, "local"))
    report = curate_dataset(f"{s3_prefix}/raw", f"{s3_prefix}/dataset", cfg=_cfg(tmp_path, "ray"))
    assert report.identities == 3 and report.files == len(PICK) + 1
    assert not storage.list(f"{s3_prefix}/dataset/_staging")
    down = tmp_path / "down"
    storage.download_dir(f"{s3_prefix}/dataset", down)
    _same_dataset(local, down)
    assert sorted(read_manifest(down)["source"])[0].startswith(f"{s3_prefix}/raw/")
    assert np.load(down / "embeddings.npy").shape == (len(PICK), 512)
