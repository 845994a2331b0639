"""Dataset publish to S3 (a real ``weed mini``): the manifest is uploaded last as the commit point, an upload killed
half-way leaves the previous manifest valid (it never names a missing object), and the next complete upload removes
the earlier version's stale objects, after its commit."""

from __future__ import annotations

import io
import os

import pandas as pd
import pytest

from idforge.io.storage import COMMIT_LAST, commit_last, open_storage
from tests.fixtures.process import raising_on_call


def _dataset(root, crops: list[str], version: str):
    """A dataset folder: crops/<name>.png and a manifest.parquet naming them (plus the other tables)."""
    (root / "crops").mkdir(parents=True)
    for name in crops:
        (root / "crops" / f"{name}.png").write_bytes(f"{name}-pixels".encode())
    pd.DataFrame({"file": [f"crops/{n}.png" for n in crops], "version": version}).to_parquet(
        root / "manifest.parquet")
    (root / "report.json").write_text(f'{{"version": "{version}"}}')
    (root / "embeddings.npy").write_bytes(version.encode() * 8)
    return root


def _remote_manifest(storage, prefix) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(storage.read_bytes(f"{prefix}/manifest.parquet")))


def _assert_manifest_names_only_present_objects(storage, prefix) -> pd.DataFrame:
    manifest = _remote_manifest(storage, prefix)
    present = set(storage.list(prefix))
    missing = [f for f in manifest["file"] if f"{prefix}/{f}" not in present]
    assert not missing, f"the manifest names missing objects {missing}"
    return manifest


def test_commit_points_go_last_in_their_order():
    rels = ["manifest.parquet", "crops/a.png", "identities.parquet", "zz/late.bin", "embeddings.npy",
            "manifest.parquet/part-1.parquet", "report.json"]
    order = commit_last(rels, COMMIT_LAST)
    assert order[:2] == ["crops/a.png", "zz/late.bin"]  # data first (sorted), whatever its name
    assert order[-2:] == ["manifest.parquet", "manifest.parquet/part-1.parquet"]  # a file or a folder of parts
    assert order.index("embeddings.npy") < order.index("manifest.parquet")
    assert commit_last(["b", "a"], ()) == ["a", "b"]


def test_a_killed_upload_leaves_the_previous_manifest_valid_and_the_next_one_removes_stale_objects(
        s3_env, s3_prefix, tmp_path, monkeypatch):
    prefix = f"{s3_prefix}/ds"
    storage = open_storage(prefix)
    v1 = _dataset(tmp_path / "v1", ["a", "b"], "v1")
    first = storage.upload_dir(v1, prefix, prune=True)
    assert first.copied[-1] == "manifest.parquet"  # the commit point went last
    assert list(_assert_manifest_names_only_present_objects(storage, prefix)["version"].unique()) == ["v1"]

    # v2 drops crop a, adds c and d; the upload is killed at its 3rd object (after two new crops, before the tables)
    v2 = _dataset(tmp_path / "v2", ["b", "c", "d"], "v2")
    order: list[str] = []
    real_put = storage.put_file

    def recording_put(src, uri):
        order.append(uri.removeprefix(prefix + "/"))
        return real_put(src, uri)

    monkeypatch.setattr(storage, "put_file", raising_on_call(recording_put, 3, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        storage.upload_dir(v2, prefix, prune=True)
    monkeypatch.undo()
    assert order == ["crops/c.png", "crops/d.png"]  # new data first; the manifest was never reached
    manifest = _assert_manifest_names_only_present_objects(storage, prefix)
    assert list(manifest["version"].unique()) == ["v1"]  # readers still see the complete previous version
    assert storage.exists(f"{prefix}/crops/a.png")  # nothing of v1 was deleted before v2's commit

    # the rerun completes: the manifest last, then v1's stale crop removed; the prefix holds exactly v2
    order.clear()
    monkeypatch.setattr(storage, "put_file", recording_put)
    again = storage.upload_dir(v2, prefix, prune=True)
    assert order[-1] == "manifest.parquet" and order.index("report.json") < order.index("manifest.parquet")
    assert sorted(again.skipped) == ["crops/b.png", "crops/c.png", "crops/d.png"]  # done before the kill: kept
    assert again.deleted == ["crops/a.png"]
    manifest = _assert_manifest_names_only_present_objects(storage, prefix)
    assert list(manifest["version"].unique()) == ["v2"]
    assert sorted(storage.list(prefix)) == sorted(f"{prefix}/{r}" for r in
                                                  ["crops/b.png", "crops/c.png", "crops/d.png", "embeddings.npy",
                                                   "manifest.parquet", "report.json"])


def test_without_prune_nothing_at_the_destination_is_deleted(s3_env, s3_prefix, tmp_path):
    prefix = f"{s3_prefix}/keep"
    storage = open_storage(prefix)
    storage.write_text(f"{prefix}/ray/checkpoint_000001/state", "written by Ray straight to the bucket")
    result = storage.upload_dir(_dataset(tmp_path / "d", ["a"], "v1"), prefix)
    assert result.deleted == [] and storage.exists(f"{prefix}/ray/checkpoint_000001/state")


def test_an_s3_output_is_held_under_its_lease_while_the_stage_writes_it(s3_env, s3_prefix, tmp_path, monkeypatch):
    """``local_output`` (every CLI stage's s3:// output) holds the prefix's lease for download, stage and upload:
    a second run on the same output is refused before it touches the working copy."""
    from idforge.errors import DataError
    from idforge.io.locations import local_output

    monkeypatch.setenv("IDFORGE_CACHE", str(tmp_path / "cache"))  # the working copies
    prefix = f"{s3_prefix}/prepared"
    storage = open_storage(prefix)
    with local_output(prefix, what="prepare", prune=True) as work:
        assert storage.exists(f"{prefix}.lock")
        with pytest.raises(DataError, match=rf"{prefix} is being written by another prepare"):
            with local_output(prefix, what="prepare"):
                pass
        (work / "index.parquet").write_text("i")
        (work / "prepared.json").write_text("{}")
    assert not storage.exists(f"{prefix}.lock")
    assert storage.list(prefix) == [f"{prefix}/index.parquet", f"{prefix}/prepared.json"]
    # a stage that removed an item from the working copy: with prune the object goes too, after the upload
    with local_output(prefix, what="prepare", prune=True) as work:
        (work / "index.parquet").unlink()
    assert storage.list(prefix) == [f"{prefix}/prepared.json"]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_curate_to_s3_refuses_an_output_prefix_another_run_holds(s3_env, s3_prefix, tmp_path, engine):
    """curate's s3:// output, on either engine: the prefix's lease covers the local working copy and the upload
    (refused before Ray starts or any file is read)."""
    from idforge.curate.config import CurateConfig
    from idforge.curate.run import curate_dataset
    from idforge.errors import DataError
    from idforge.io.lock import output_lock

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not decoded: refused before any work")
    cfg = CurateConfig(work_dir=str(tmp_path / "work"), matte={"backend": "landmarks"}, engine=engine)
    out = f"{s3_prefix}/dataset-{engine}"
    with output_lock(out, "curate"):
        with pytest.raises(DataError, match=rf"{out} is being written by another curate .*pid {os.getpid()}"):
            curate_dataset(str(photos), out, cfg=cfg)
    assert open_storage(out).list(out) == []  # nothing uploaded
    assert not (tmp_path / "work" / "outputs").exists() or not any((tmp_path / "work" / "outputs").iterdir())
