from __future__ import annotations

from idforge.evaluate.generate import artifact_identities, resolve_artifact


def test_per_identity_directory_lists_only_identities_with_a_checkpoint(tmp_path):
    for ident in ("b", "a"):
        (tmp_path / ident).mkdir()
        (tmp_path / ident / "method.safetensors").write_bytes(b"x")
    (tmp_path / "c").mkdir()  # failed identity: no checkpoint
    (tmp_path / "_status").mkdir()
    (tmp_path / "_status" / "method.safetensors").write_bytes(b"x")
    assert artifact_identities(tmp_path) == ["a", "b"]
    assert resolve_artifact(tmp_path, "a") == tmp_path / "a" / "method.safetensors"


def test_single_checkpoint_serves_every_identity(tmp_path):
    ckpt = tmp_path / "method.safetensors"
    ckpt.write_bytes(b"x")
    assert artifact_identities(ckpt) is None
    assert artifact_identities(tmp_path) is None  # a run directory holding one checkpoint
    assert artifact_identities(None) is None
