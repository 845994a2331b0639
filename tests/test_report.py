"""Report pieces: the small index page, the identity pages with thumbnail files linking the full images, and the
headless-Chromium check that catches a broken image (so the e2e check can fail)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from idforge.evaluate import report as R


def _data(tmp_path, n_ids=2, seeds=(0, 1)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for ident in [f"id{i}" for i in range(n_ids)]:
        for cat, prompt in (("clothing", "a photo of a person wearing a hat"), ("view", "a side view of a person")):
            for s in seeds:
                rel = f"images/{ident}/{cat}/p00_s{s}.png"
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / rel)
                rows.append({"identity": ident, "category": cat, "prompt_index": 0, "prompt": prompt, "seed": s,
                             "image": rel, "id_sim": rng.uniform(-1, 1), "clip_t": rng.uniform(0, 0.3)})
    images = pd.DataFrame(rows)
    summary = pd.DataFrame({"id_sim": [0.1], "clip_t": [0.2]}, index=pd.Index(["m"], name="method"))
    per_cat = images.groupby("category")[["id_sim", "clip_t"]].mean()
    per_id = images.groupby("identity")[["id_sim", "clip_t"]].mean()
    refs = {i: [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)] for i in images["identity"].unique()}
    return R.ReportData("t", summary, per_cat, per_id, images, tmp_path, refs, {"k": "v"},
                        "http://127.0.0.1:5000/#/experiments/1/runs/abc", ["id_sim", "clip_t"], 64)


def test_data_uri_roundtrip_and_downscale():
    img = np.zeros((300, 150, 3), np.uint8)
    img[:, :75] = 255
    uri = R.data_uri(img, max_px=100)
    assert uri.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert back.size == (50, 100)
    assert R.data_uri(img, fmt="JPEG").startswith("data:image/jpeg;base64,")


def test_bars_svg_scales_and_marks_missing():
    svg = R.bars_svg({"a": 0.5, "b": -0.25, "c": float("nan")}, "clip_t", width=360)
    widths = [float(w) for w in re.findall(r'class="bar" x="[\d.]+" y="\d+" width="([\d.]+)"', svg)]
    assert len(widths) == 2 and widths[0] == pytest.approx(2 * widths[1], rel=1e-2)
    assert "–" in svg and svg.startswith("<svg") and svg.endswith("</svg>")


def test_report_pages_link_thumbnails_to_full_images(tmp_path):
    import html.parser

    data = _data(tmp_path)
    path = R.write_report(tmp_path / "report.html", data)
    text = path.read_text()
    assert path.read_text() == R.render_report(data)
    assert 'id="metrics-summary"' in text and 'id="mlflow-link"' in text and "<img" not in text
    assert "base64" not in text and "<script" not in text  # nothing embedded, nothing to execute or fetch
    for ident in ("id0", "id1"):
        assert f'href="identities/{ident}.html"' in text

    class Page(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.links, self._href = [], {}, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "a":
                self._href = a["href"]
            if tag == "img":
                self.imgs.append(a)
                if self._href:
                    self.links[a["src"]] = self._href

        def handle_endtag(self, tag):
            if tag == "a":
                self._href = None

    seen = []
    for ident in ("id0", "id1"):
        page = Page()
        page.feed((tmp_path / "identities" / f"{ident}.html").read_text())
        gen = [i for i in page.imgs if i["class"] == "gen"]
        assert len([i for i in page.imgs if i["class"] == "ref"]) == 1 and len(gen) == 4
        for img in gen:  # a thumbnail file (long side thumb_px) linking to the full image file
            thumb = tmp_path / "identities" / img["src"]
            assert thumb.is_file() and max(Image.open(thumb).size) <= 64 and thumb.suffix == ".jpg"
            full = (tmp_path / "identities" / page.links[img["src"]]).resolve()
            assert full == (tmp_path / img["alt"]).resolve() and full.is_file()
            seen.append(img["alt"])
    assert sorted(seen) == sorted(data.images["image"])


def test_standalone_copy_inlines_every_page_and_thumbnail_up_to_its_cap(tmp_path):
    """KFP's HTML viewer shows one file: the standalone copy holds every identity page as a section, every thumbnail
    as a data URI (the thumbnail's own bytes), in-page links instead of page links, and a cap with a note."""
    import base64
    import re

    data = _data(tmp_path)
    path = R.write_report(tmp_path / "report.html", data)
    one = R.standalone_report(path)
    assert "identities/" not in one and 'href="#page-id0"' in one and '<section id="page-id1">' in one
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', one)
    thumbs = sorted((tmp_path / "thumbs").rglob("*.jpg"))
    assert len(uris) == len(thumbs) == 10  # 2 identities x (1 reference + 4 images)
    assert sorted(base64.b64decode(u) for u in uris) == sorted(t.read_bytes() for t in thumbs)
    capped = R.standalone_report(path, max_images=3)
    assert capped.count("data:image") == 3 and "7 thumbnails left out" in capped


def test_index_page_does_not_grow_with_the_image_count(tmp_path):
    """8 vs 48 images of the same identities: report.html stays the same size up to the numbers in its tables;
    2 vs 6 identities: it grows by about one table row per identity."""
    small = R.write_report(tmp_path / "a" / "report.html", _data(tmp_path / "a", seeds=(0, 1))).stat().st_size
    big = R.write_report(tmp_path / "b" / "report.html", _data(tmp_path / "b", seeds=tuple(range(12)))).stat().st_size
    assert abs(big - small) < 64, (small, big)
    more = R.write_report(tmp_path / "c" / "report.html", _data(tmp_path / "c", n_ids=6)).stat().st_size
    assert 0 < more - small < 4 * 400, (small, more)
    assert len(list((tmp_path / "b" / "thumbs").rglob("*.jpg"))) == 2 * 2 * 12 + 2  # every image + the references


def test_chromium_check_catches_a_broken_image(tmp_path):
    """The control for the e2e Chromium test: a missing thumbnail must be reported as broken."""
    from idforge.evaluate.browser import check_images

    R.write_report(tmp_path / "report.html", _data(tmp_path, n_ids=1, seeds=(0,)))
    page = tmp_path / "identities" / "id0.html"
    ok = check_images(page)
    assert (ok.total, ok.broken) == (3, [])
    next((tmp_path / "thumbs" / "id0").glob("images-*.jpg")).write_bytes(b"not a jpeg")
    check = check_images(page)
    assert check.total == 3 and len(check.broken) == 1
