"""Identity chunks of the KFP fan-out: chunking, a pod's dataset subset (only its rows, files and embeddings, read
the same as from the full dataset), from a local directory and from a real S3 server, and the gathered index."""

from __future__ import annotations

import json

import pytest


def test_chunks_cover_every_identity_once_in_order():
    from idforge.train.identity_chunks import chunk_identities

    ids = [f"id{i:02d}" for i in range(7)]
    chunks = chunk_identities(ids, 3)
    assert chunks == [["id00", "id01", "id02"], ["id03", "id04", "id05"], ["id06"]]
    assert chunk_identities(ids, 100) == [ids] and chunk_identities([], 2) == []
    with pytest.raises(ValueError, match="identities_per_task=0"):
        chunk_identities(ids, 0)


def test_plan_applies_the_range_then_chunks(curated_tiny_dataset):
    from idforge.train.identity_chunks import plan_chunks

    assert plan_chunks(str(curated_tiny_dataset), 2) == [["id00", "id01"], ["id02"]]
    assert plan_chunks(str(curated_tiny_dataset), 1, first=1, max_identities=1) == [["id01"]]
    with pytest.raises(ValueError, match="first=-1"):
        plan_chunks(str(curated_tiny_dataset), 1, first=-1)


def _check_subset(full, subset):
    import torch

    from idforge.train.per_identity import list_identities, load_identity_data

    assert list_identities(subset) == ["id02"]
    files = sorted(p.relative_to(subset).as_posix() for p in subset.rglob("*.png"))
    assert files and all("id02" in f for f in files)  # no other identity's image left storage
    a, b = load_identity_data(full, "id02", 64), load_identity_data(subset, "id02", 64)
    for name in ("images", "masks", "crops112", "face_embeds"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert b.wplus is not None and torch.equal(a.wplus, b.wplus)


def test_subset_holds_only_its_identities_and_reads_the_same(curated_tiny_dataset, tmp_path):
    from idforge.errors import DataError
    from idforge.train.identity_chunks import localize_subset

    subset = localize_subset(str(curated_tiny_dataset), ["id02"], tmp_path / "sub")
    _check_subset(curated_tiny_dataset, subset)
    with pytest.raises(DataError, match=r"identities \['zz'\] have no accepted rows"):
        localize_subset(str(curated_tiny_dataset), ["id02", "zz"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(DataError, match="not a curated dataset"):
        localize_subset(str(tmp_path), ["id02"], tmp_path / "bad")


@pytest.mark.slow
def test_subset_from_s3_fetches_only_the_chunks_files(curated_tiny_dataset, s3_env, s3_prefix, tmp_path,
                                                      monkeypatch):
    from idforge.io.storage import S3Storage, open_storage
    from idforge.train.identity_chunks import localize_subset

    uri = f"{s3_prefix}/ds"
    open_storage(uri).upload_dir(curated_tiny_dataset, uri)
    fetched = []
    original = S3Storage.get_file

    def counting(self, key_uri, local):
        fetched.append(key_uri)
        return original(self, key_uri, local)

    monkeypatch.setattr(S3Storage, "get_file", counting)
    subset = localize_subset(uri, ["id02"], tmp_path / "sub")
    _check_subset(curated_tiny_dataset, subset)
    images = [u for u in fetched if u.endswith(".png")]
    assert images and all("id02" in u for u in images), fetched  # the other identities' images stayed in S3


def test_index_merges_chunks_and_materializes_the_per_identity_layout(tmp_path):
    from idforge.errors import DataError
    from idforge.train.identity_chunks import materialize_index, merge_indexes, read_index, write_index

    for chunk, ids in (("c0", ["a", "b"]), ("c1", ["c"])):
        for i in ids:
            art = tmp_path / chunk / i
            art.mkdir(parents=True)
            (art / "artifact.json").write_text(json.dumps({"file": "method.safetensors"}))
            (art / "DONE").write_text("")
    parts = [{"a": str(tmp_path / "c0" / "a"), "b": str(tmp_path / "c0" / "b")}, {"c": str(tmp_path / "c1" / "c")}]
    write_index(merge_indexes(parts), tmp_path / "model", "textual-inversion")
    assert sorted(read_index(tmp_path / "model")) == ["a", "b", "c"]
    assert read_index(tmp_path) is None
    local = materialize_index(tmp_path / "model", tmp_path / "local", identities=["a", "c"])
    assert sorted(p.name for p in local.iterdir()) == ["a", "c"] and (local / "c" / "DONE").is_file()
    with pytest.raises(DataError, match="trained by two chunks"):
        merge_indexes([{"a": "s3://x/1/a"}, {"a": "s3://x/2/a"}])
    with pytest.raises(DataError, match="has no identities"):
        materialize_index(tmp_path / "model", tmp_path / "local", identities=["zz"])
