"""Free-space checks before the long part (``idforge.io.space``): the error names the path, the free space and the
estimate; prepare and generate check it before writing anything; each per-item estimate bounds what the stage then
really writes (a bound that can fail: it is compared with the files on disk)."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from idforge.errors import DataError
from idforge.io.space import check_free_space, count_files, curated_file_bytes, png_bytes, prepared_item_bytes

REPO = Path(__file__).resolve().parents[1]
_Usage = namedtuple("_Usage", "total used free")


def _free(monkeypatch, free_bytes: int) -> None:
    import idforge.io.space as space

    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: _Usage(10**12, 10**12 - free_bytes, free_bytes))


def test_the_error_names_the_path_the_free_space_and_the_estimate(tmp_path, monkeypatch):
    target = tmp_path / "not" / "yet" / "there"  # measured on the nearest existing ancestor
    check_free_space(target, 10, 1000, "prepare", unit="items")
    check_free_space(target, 0, 10**18)  # nothing to write: nothing to check
    _free(monkeypatch, 5 * 10**6)
    with pytest.raises(DataError, match=rf"prepare output {target} has 5 MB free, the run needs about 12 MB "
                                        r"\(3 items x 4000 kB\); free space there or choose another output"):
        check_free_space(target, 3, 4 * 10**6, "prepare", unit="items")
    check_free_space(target, 1, 4 * 10**6)  # 4 MB fits in 5 MB
    with pytest.raises(ValueError, match="must be >= 0"):
        check_free_space(target, -1, 10)


def test_estimates_grow_with_what_the_stage_writes():
    assert curated_file_bytes(1024) > curated_file_bytes(512) > 4 * 512 ** 2
    base = prepared_item_bytes(512)
    assert prepared_item_bytes(1024) > base  # the model's latent size
    assert prepared_item_bytes(512, flip=True) - base == 4 * 64 * 64 * 4  # a second latent
    assert prepared_item_bytes(512, dtype_bytes=2) < base
    assert prepared_item_bytes(512, latent_channels=16) > base
    assert prepared_item_bytes(512, clip_tokens=256, clip_dim=1024) - base == 257 * 1024 * 4
    assert png_bytes(1024, 1024) > 3 * 1024 * 1024 > png_bytes(512, 512)


def test_count_files_counts_what_a_resumed_run_has(tmp_path):
    assert count_files(tmp_path / "missing", "*.png") == 0
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ("a/1.png", "a/b/2.png", "a/b/2.json"):
        (tmp_path / p).write_bytes(b"x")
    assert count_files(tmp_path, "*.png") == 2


def test_prepare_checks_free_space_before_encoding_and_its_estimate_bounds_the_items(
        tiny_sd15_dir, tiny_clip_dir, tmp_path, monkeypatch):
    import idforge.train.prepare as prepare
    from idforge.train.config import PrepareConfig
    from idforge.train.testdata import write_curated_synthetic

    ds = write_curated_synthetic(tmp_path / "ds", identities=2, images_per_identity=2)
    out = tmp_path / "prepared"
    with monkeypatch.context() as mp:
        _free(mp, 1000)
        with pytest.raises(DataError, match=rf"prepare output {out} has 0 MB free, the run needs about .* MB "
                                            r"\(4 items x \d+ kB\)"):
            prepare.prepare_dataset(ds, str(tiny_sd15_dir), out, PrepareConfig(), clip_model=str(tiny_clip_dir))
    assert not (out / "items").exists()  # refused before the first item
    seen = []
    real = prepare.check_free_space
    monkeypatch.setattr(prepare, "check_free_space", lambda *a, **k: (seen.append(a), real(*a, **k))[1])
    prepare.prepare_dataset(ds, str(tiny_sd15_dir), out, PrepareConfig(), clip_model=str(tiny_clip_dir))
    (_, items, per_item, _what), = seen
    sizes = [p.stat().st_size for p in (out / "items").rglob("*.safetensors")]
    assert items == len(sizes) == 4
    assert max(sizes) <= per_item < 4 * max(sizes)  # a bound, and not a wild one


def test_generate_checks_free_space_before_generating_and_its_estimate_bounds_the_images(
        tiny_sd15_dir, tiny_clip_dir, samples_dir, tmp_path, monkeypatch):
    import idforge.evaluate.generate as generate
    from idforge.config import IdforgeConfig
    from idforge.diffusion.loading import load_pipeline
    from idforge.methods.checkpoint import save_method
    from tests.test_generate_plain_method import PlainNoIdentity

    data = yaml.safe_load((REPO / "configs/protocols/smoke.yaml").read_text())
    data.update(prompt_set=str(REPO / "data/prompts/smoke.yaml"), categories=["plain"])
    protocol = tmp_path / "one.yaml"
    protocol.write_text(yaml.safe_dump(data))
    cfg = IdforgeConfig.model_validate({"model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
                                        "generate": {"protocol": str(protocol)}})
    pipe = load_pipeline(tiny_sd15_dir)
    method = PlainNoIdentity()
    method.attach(pipe)
    artifact = save_method(method, tmp_path / "method.safetensors")
    method.detach(pipe)
    out = tmp_path / "gen"
    with monkeypatch.context() as mp:
        _free(mp, 1000)
        with pytest.raises(DataError, match=rf"generate output {out} has 0 MB free, the run needs about .* MB "
                                            r"\(2 images x \d+ kB\)"):
            generate.generate_images(None, artifact, samples_dir, None, [0, 1], None, out, cfg,
                                     identities=["obama"], pipe=pipe)
    assert count_files(out, "*.png") == count_files(out / "images", "*") == 0  # no image written
    seen = []
    real = generate.check_free_space
    monkeypatch.setattr(generate, "check_free_space", lambda *a, **k: (seen.append(a), real(*a, **k))[1])
    generate.generate_images(None, artifact, samples_dir, None, [0, 1], None, out, cfg, identities=["obama"],
                             pipe=pipe)
    generate.generate_images(None, artifact, samples_dir, None, [0, 1], None, out, cfg, identities=["obama"],
                             pipe=pipe)  # resumed with everything there: nothing left to estimate
    pngs = list((out / "images").rglob("*.png"))
    assert len(pngs) == 2 and [a[1] for a in seen] == [2, 0]
    assert max(p.stat().st_size + p.with_suffix(".json").stat().st_size for p in pngs) <= seen[0][2]
    shutil.rmtree(out)


PREPARE_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write gets EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))
from idforge.errors import IdforgeError
from idforge.train.prepare import prepare_dataset
try:
    print(prepare_dataset(sys.argv[1], sys.argv[2], sys.argv[3], clip_model=sys.argv[5]).summary())
except IdforgeError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def test_prepare_into_a_size_limited_target_fails_clearly_and_leaves_no_partial_item(
        tiny_sd15_dir, tiny_clip_dir, tmp_path):
    """RLIMIT_FSIZE (4 kB, below one item's size) in a child process: the run stops with the clear error, no temp
    file or half item is left, and the rerun without the limit completes."""
    import subprocess
    import sys

    from idforge.train.dataset import read_prepared
    from idforge.train.testdata import write_curated_synthetic

    ds = write_curated_synthetic(tmp_path / "ds", identities=2, images_per_identity=2)
    out = tmp_path / "prepared"
    args = [sys.executable, "-c", PREPARE_CHILD, str(ds), str(tiny_sd15_dir), str(out)]
    res = subprocess.run([*args, "4096", str(tiny_clip_dir)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "prepare: writing" in res.stderr and "(File too large)" in res.stderr and "free space there" in res.stderr
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not left, f"partial output left behind: {left}"  # no temp file, no truncated item, no index
    from idforge.train.prepare import prepare_dataset  # the rerun without the limit: here (imports are warm)

    prepare_dataset(ds, str(tiny_sd15_dir), out, clip_model=str(tiny_clip_dir))
    index, _ = read_prepared(out)
    assert len(index) == 4 and all((out / f).stat().st_size > 4096 for f in index["file"])
