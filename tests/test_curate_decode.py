"""Stage 1 on a generated corpus of awkward files, and the whole run's manifest reasons for each of them."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idforge.curate.config import DecodeConfig
from idforge.curate.decode import Rejected, decode_image


def _small(path: Path, width: int = 480) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        return im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, a tiny IDAT and IEND: no real pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def build_corpus(photos_root: Path, out: Path) -> dict[str, tuple[str, str]]:
    """Write the corpus; returns file name -> (expected status of its first row, expected reason)."""
    out.mkdir(parents=True, exist_ok=True)
    expect: dict[str, tuple[str, str]] = {}

    def put(name: str, data: bytes, status: str, reason: str) -> None:
        (out / name).write_bytes(data)
        expect[name] = (status, reason)

    jpeg = _bytes(_small(photos_root / "obama/3.jpg"), "JPEG", quality=90)
    put("truncated.jpg", jpeg[: len(jpeg) // 2], "rejected", "decode_error")
    put("zero.jpg", b"", "rejected", "empty_file")
    put("text.jpg", b"these are not the pixels you are looking for\n" * 20, "rejected", "not_an_image")
    put("cmyk.jpg", _bytes(_small(photos_root / "ardern/1.jpg").convert("CMYK"), "JPEG", quality=92),
        "accepted", "")
    grey16 = np.asarray(_small(photos_root / "macron/2.jpg").convert("L"), dtype=np.uint16) * 257
    im16 = Image.fromarray(grey16)
    assert im16.mode == "I;16"
    put("grey16.png", _bytes(im16, "PNG"), "accepted", "")
    rgba = _small(photos_root / "sunak/1.jpg").convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, : rgba.width // 8] = 0  # a transparent strip: composited, not dropped
    rgba.putalpha(Image.fromarray(alpha))
    put("alpha.png", _bytes(rgba, "PNG"), "accepted", "")
    # EXIF orientation 6 = "rotate 90 degrees clockwise to display": store the pixels turned the other way.
    upright = _small(photos_root / "obama/1.jpg")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated.jpg", _bytes(stored, "JPEG", quality=92, exif=exif), "accepted", "")
    put("one_pixel.png", _bytes(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "rejected", "image_too_small")
    put("bomb.png", _png_header_only(20000, 20000), "rejected", "too_large")
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("animated.gif", buf.getvalue(), "rejected", "unsupported_format")
    put("grey_flat.png", _bytes(Image.new("L", (320, 240), 128), "PNG"), "rejected", "no_face")
    put("grey_photo.jpg", _bytes(_small(photos_root / "biden/1.jpg").convert("L"), "JPEG", quality=90),
        "accepted", "")
    put("collins.webp", _bytes(_small(photos_root / "collins/1.png"), "WEBP", quality=90), "accepted", "")
    put("bitmap.bmp", _bytes(Image.new("RGB", (64, 64)), "BMP"), "rejected", "unsupported_format")
    blurry = _small(photos_root / "obama/4.jpg").filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(7))
    put("blurry.jpg", _bytes(blurry, "JPEG", quality=90), "rejected", "blurry")
    tiny = _small(photos_root / "ardern/2.jpg", width=110)
    put("tiny_face.png", _bytes(tiny, "PNG"), "rejected", "face_too_small")
    return expect


@pytest.fixture(scope="module")
def corpus(face_photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "in"
    expect = build_corpus(face_photos.root, root)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: skipped, but counted in the report
    return root, expect


def _decode(root: Path, name: str):
    return decode_image((root / name).read_bytes(), DecodeConfig())


@pytest.mark.parametrize(
    "name,reason",
    [("truncated.jpg", "decode_error"), ("zero.jpg", "empty_file"), ("text.jpg", "not_an_image"),
     ("one_pixel.png", "image_too_small"), ("bomb.png", "too_large"), ("animated.gif", "unsupported_format"),
     ("bitmap.bmp", "unsupported_format")],
)
def test_bad_files_are_rejected_with_their_reason(corpus, name, reason):
    root, _ = corpus
    with pytest.raises(Rejected) as info:
        _decode(root, name)
    assert info.value.reason == reason


def test_bomb_header_is_rejected_without_decoding(corpus):
    root, _ = corpus
    data = (root / "bomb.png").read_bytes()
    assert len(data) < 200  # nothing to decode: the 20000x20000 claim alone must trigger the guard
    t = time.perf_counter()
    with pytest.raises(Rejected, match="too_large"):
        decode_image(data, DecodeConfig(max_pixels=10**9 // 4))  # below 4e8 px but above PIL's own bomb limit
    with pytest.raises(Rejected, match="too_large"):
        decode_image(data, DecodeConfig())
    assert time.perf_counter() - t < 0.5


def test_modes_become_8bit_rgb(corpus, face_photos):
    root, _ = corpus
    for name in ("cmyk.jpg", "grey16.png", "alpha.png", "grey_photo.jpg", "collins.webp"):
        dec = _decode(root, name)
        assert dec.rgb.dtype == np.uint8 and dec.rgb.ndim == 3 and dec.rgb.shape[2] == 3, name
    g16 = _decode(root, "grey16.png")
    ref = np.asarray(_small(face_photos.root / "macron/2.jpg").convert("L"), dtype=np.int32)
    # 16-bit values scaled to 8 bits, not clipped at 255 (PIL's convert would make it almost all white).
    assert np.abs(g16.rgb[..., 0].astype(np.int32) - ref).max() <= 1
    a = _decode(root, "alpha.png")
    assert np.all(a.rgb[:, :5] == 128)  # transparent pixels land on neutral grey
    cmyk = _decode(root, "cmyk.jpg")
    ref = np.asarray(_small(face_photos.root / "ardern/1.jpg"), dtype=np.float64)
    assert np.abs(cmyk.rgb.astype(np.float64) - ref).mean() < 12  # colours survive the CMYK round trip


def test_exif_orientation_is_applied(corpus):
    root, _ = corpus
    with Image.open(root / "exif_rotated.jpg") as im:
        stored = im.size
    dec = _decode(root, "exif_rotated.jpg")
    assert dec.source_size == stored[::-1] and dec.rgb.shape[:2] == (stored[0], stored[1])


def test_large_jpeg_is_decoded_reduced_with_coordinates_scale(face_photos):
    data = (face_photos.root / "obama/3.jpg").read_bytes()  # 1434 wide x 2333 high
    dec = decode_image(data, DecodeConfig(max_side=600))
    assert max(dec.rgb.shape[:2]) <= 600
    assert dec.source_size == (1434, 2333)
    assert dec.scale == pytest.approx(1434 / dec.rgb.shape[1], rel=1e-2)


@pytest.fixture(scope="module")
def corpus_dataset(corpus, tmp_path_factory):
    from idforge.curate.config import CurateConfig
    from idforge.curate.manifest import read_manifest
    from idforge.curate.run import curate_dataset

    root, _ = corpus
    out = tmp_path_factory.mktemp("corpus_out") / "ds"
    cfg = CurateConfig(min_images_per_identity=1, progress=False, matte={"backend": "landmarks"},
                       work_dir=str(tmp_path_factory.mktemp("work")))
    report = curate_dataset(str(root), str(out), cfg=cfg)
    return out, read_manifest(out), report


def test_every_corpus_file_lands_in_the_manifest_with_the_right_reason(corpus, corpus_dataset):
    root, expect = corpus
    _, manifest, report = corpus_dataset
    assert sorted(manifest["rel"].unique()) == sorted(expect)
    for name, (status, reason) in expect.items():
        first = manifest[manifest["rel"] == name].sort_values("face_index").iloc[0]
        assert (first["status"], first["reason"]) == (status, reason), name
        assert first["source"] == str(root / name)
    assert report.files == len(expect)
    assert report.hidden_files_skipped == 1 and "hidden files/folders skipped: 1" in report.summary()
    assert sum(report.reasons.values()) == report.counts["rejected"]


def test_exif_rotated_face_is_found_upright(corpus_dataset):
    _, manifest, _ = corpus_dataset
    row = manifest[manifest["rel"] == "exif_rotated.jpg"].iloc[0]
    assert row["status"] == "accepted"
    assert (row["width"], row["height"]) == (480, round(480 * 1137 / 910))  # upright portrait size
    kps = np.array([list(p) for p in row["landmarks5"]])
    assert kps[:2, 1].max() < kps[2, 1] < kps[3:, 1].min()  # eyes above nose above mouth: really upright
    x0, y0, x1, y1 = row["bbox"]
    assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]


def test_accepted_rows_point_at_real_files(corpus_dataset):
    out, manifest, _ = corpus_dataset
    acc = manifest[manifest["status"] == "accepted"]
    assert len(acc) == 6
    emb = np.load(out / "embeddings.npy")
    for _, row in acc.iterrows():
        for col, size in (("aligned", 112), ("aligned_ffhq", 512), ("mask", 512), ("person_mask", 512),
                          ("matted", 512)):
            with Image.open(out / row[col]) as im:
                assert im.size == (size, size), col
        assert 0 <= row["embedding_row"] < emb.shape[0]
