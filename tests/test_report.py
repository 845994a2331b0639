"""report.html pieces, and the headless-Chromium check that catches a broken image (so the e2e check can fail)."""

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


def test_report_has_every_image_and_table(tmp_path):
    data = _data(tmp_path)
    text = R.render_report(data)
    assert text.count('class="gen"') == len(data.images) == 8
    assert text.count('class="ref"') == 2
    assert 'id="metrics-summary"' in text and 'id="grid-id0"' in text and 'id="grid-id1"' in text
    assert 'id="mlflow-link"' in text
    assert "<script" not in text  # nothing to execute, nothing fetched
    path = R.write_report(tmp_path / "report.html", data)
    assert path.read_text() == text


def test_chromium_check_catches_a_broken_image(tmp_path):
    """The control for the e2e Chromium test: a corrupt data URI must be reported as broken."""
    from idforge.evaluate.browser import check_images

    path = R.write_report(tmp_path / "report.html", _data(tmp_path, n_ids=1, seeds=(0,)))
    ok = check_images(path)
    assert (ok.total, ok.broken) == (3, [])
    text = path.read_text()
    bad = tmp_path / "bad.html"
    bad.write_text(text.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1))
    check = check_images(bad)
    assert check.total == 3 and len(check.broken) == 1
