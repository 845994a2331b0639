from __future__ import annotations

from pathlib import Path

import pytest

from idforge.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text, replace_dir


def test_file_write_is_all_or_nothing(tmp_path):
    target = tmp_path / "a" / "f.txt"
    atomic_write_text(target, "one")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "one"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]  # no temp file left behind


def test_directory_output_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "out"
    (target / "old").mkdir(parents=True)
    (target / "old" / "x").write_text("stale")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("fresh")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_onto_missing_and_existing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "1").write_text("1")
    replace_dir(a, b)
    assert (b / "1").read_text() == "1" and not a.exists()
    c = tmp_path / "c"
    c.mkdir()
    (c / "2").write_text("2")
    replace_dir(c, b)
    assert sorted(p.name for p in b.iterdir()) == ["2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("write", ["bytes", "text"])
def test_atomic_writes_rename_a_complete_sibling_onto_the_target(tmp_path, monkeypatch, write):
    """Readers see the old file until the new one is whole and on disk: the bytes go to a sibling, are fsynced,
    and only then renamed onto the target."""
    import os

    target = tmp_path / "d" / "f.txt"
    atomic_write_text(target, "old")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        assert target.read_text() == "old", "the target changed before the rename"
        assert Path(src).parent == target.parent and Path(src).read_text() == "new"
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = atomic_write_bytes(target, b"new") if write == "bytes" else atomic_write_text(target, "new")
    assert out == target and target.read_text() == "new"
    assert [e[0] for e in events] == ["fsync", "replace"] and events[0][1] == events[1][1] != str(target)
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("write", ["bytes", "text"])
def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, write):
    import os

    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)  # after the bytes are written, before the rename
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new") if write == "bytes" else atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
