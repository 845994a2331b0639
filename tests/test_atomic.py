from __future__ import annotations

import pytest

from idforge.io.atomic import atomic_path, atomic_write_text, replace_dir


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
