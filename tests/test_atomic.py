from __future__ import annotations

import os
import time
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


def _swap_while_polling(tmp_path, swaps: int) -> tuple[int, int]:
    """``swaps`` replace_dir calls onto ``dst`` while a thread polls ``dst/manifest.parquet``; (misses, polls)."""
    import threading

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "manifest.parquet").write_text("v0")
    stop = threading.Event()
    seen = {"misses": 0, "polls": 0}

    def reader() -> None:
        while not stop.is_set():
            seen["polls"] += 1
            if not (dst / "manifest.parquet").is_file():
                seen["misses"] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(swaps):
            src = tmp_path / f".dst.partial-{i}"
            src.mkdir()
            (src / "manifest.parquet").write_text(f"v{i + 1}")
            replace_dir(src, dst)
    finally:
        stop.set()
        t.join()
    assert (dst / "manifest.parquet").read_text() == f"v{swaps}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # every old version removed, no .old-* left
    return seen["misses"], seen["polls"]


def _slow_renames(monkeypatch):
    """Every os.replace inside atomic.py takes 3 ms more: a gap between two renames becomes visible."""
    import idforge.io.atomic as atomic

    real = os.replace

    def slow(a, b):
        real(a, b)
        time.sleep(0.003)

    monkeypatch.setattr(atomic.os, "replace", slow)


def test_replace_dir_never_leaves_readers_without_the_dataset(tmp_path, monkeypatch):
    """A reader polling dst/manifest.parquet through 200 swaps never finds it missing (renameat2 exchange)."""
    _slow_renames(monkeypatch)
    misses, polls = _swap_while_polling(tmp_path, 200)
    assert polls > 200 and misses == 0


def test_the_two_rename_fallback_has_the_gap_the_exchange_closes(tmp_path, monkeypatch):
    """The guard above can fail: with the exchange unavailable (another OS, NFS) the same drill sees the gap,
    and the fallback still replaces the directory whole."""
    import idforge.io.atomic as atomic

    _slow_renames(monkeypatch)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    misses, polls = _swap_while_polling(tmp_path, 50)
    assert misses > 0


def test_a_kill_after_the_exchange_leaves_an_old_dir_the_next_run_finds(tmp_path, monkeypatch):
    import idforge.io.atomic as atomic
    from idforge.io.atomic import stale_old_dirs

    dst, src = tmp_path / "ds", tmp_path / ".ds.partial"
    for d, v in ((dst, "old"), (src, "new")):
        d.mkdir()
        (d / "manifest.parquet").write_text(v)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed between the swap and the removal of the old version
        replace_dir(src, dst)
    monkeypatch.undo()
    assert (dst / "manifest.parquet").read_text() == "new"  # the new dataset is in place
    assert stale_old_dirs(dst) == [tmp_path / f".ds.old-{os.getpid()}"]
    assert (stale_old_dirs(dst)[0] / "manifest.parquet").read_text() == "old"
