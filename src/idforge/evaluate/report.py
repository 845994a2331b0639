"""The evaluation report: a small index page and one page per identity, thumbnails as files beside them.

Layout (in the evaluation's output directory)::

    report.html                 run information (with the MLflow run link), the summary metrics table,
                                per-category bars (inline SVG), the per-identity table linking each identity's page
    identities/<identity>.html  the identity's metrics, its reference faces and its image grid (rows = prompts,
                                columns = seeds): thumbnails, each linking to the full generated image file
    thumbs/<identity>/*.jpg     the thumbnails (``evaluate.report_thumb_px`` on the long side)

``report.html`` embeds no image, so it grows with the identity table's rows only, never with the image count; no
page runs a script or fetches anything. Elements carry stable ids/classes (``metrics-summary``,
``metrics-identity``, ``grid-<identity>``, ``ref``/``gen`` image classes) so tests and scripts can check the pages.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idforge.io.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px;background:#fff}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f0f0f0}
td.l,th.l{text-align:left}
.grid td{vertical-align:top;text-align:center}.grid td.prompt{text-align:left;max-width:260px;font-size:12px}
img.gen,img.ref{width:128px;height:128px;object-fit:contain;background:#eee;display:block;margin:2px}
figure{margin:2px;display:flex;flex-wrap:wrap;align-items:flex-start;gap:2px}figcaption{font-size:11px;color:#555;width:100%}
.scroll{overflow-x:auto;max-width:100%}
.refs{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}.bars{display:flex;flex-wrap:wrap;gap:24px}
.muted{color:#777;font-size:12px}code{background:#eee;padding:1px 4px}
"""

# metric columns in the order the tables show them, with a short description for the page's legend
METRIC_HELP = {
    "face_det_rate": "share of images with a detected face",
    "id_sim": "identity cosine to the reference (missing faces scored 0)",
    "id_sim_excl_missing": "identity cosine over images with a face",
    "clip_t": "CLIP image-prompt cosine",
    "clip_i": "CLIP image cosine, generated face vs reference face",
    "lpips": "LPIPS to the reference faces (lower = closer)",
    "lpips_shift_tolerant": "shift-tolerant LPIPS to the reference faces (lower = closer)",
    "div_lpips": "mean pairwise LPIPS within identity x prompt (higher = more varied)",
    "div_lpips_shift_tolerant": "mean pairwise shift-tolerant LPIPS within identity x prompt",
    "div_id": "mean pairwise identity-embedding distance (1 - cos) among an identity's images (pose/expression)",
}


PAGES_DIR = "identities"
THUMBS_DIR = "thumbs"


@dataclass
class ReportData:
    """Everything the pages show. ``images`` holds the per-image rows (identity, category, prompt, seed, the image
    path relative to ``images_root``, metric columns). ``references``: per identity, its reference faces as uint8
    RGB arrays or image files (thumbnails already under ``thumbs/<identity>/`` are used as they are)."""

    title: str
    summary: "pd.DataFrame"  # one row per method (index: method), metric columns
    per_category: "pd.DataFrame"  # index: category
    per_identity: "pd.DataFrame"  # index: identity
    images: "pd.DataFrame"
    images_root: Path
    references: Mapping[str, Sequence[np.ndarray | Path]]  # identity -> reference faces
    info: dict[str, Any] = field(default_factory=dict)  # shown as a key/value table
    mlflow_url: str | None = None
    bar_metrics: Sequence[str] = ()
    thumb_px: int = 128


def thumbnail_dir(report_dir: str | os.PathLike[str], identity: str) -> Path:
    """Where an identity's thumbnails go: ``<report_dir>/thumbs/<identity>/``."""
    return Path(report_dir) / THUMBS_DIR / _slug(identity)


def save_thumbnail(img: np.ndarray | Any, path: str | os.PathLike[str], max_px: int = 128) -> Path:
    """Write a JPEG thumbnail (``max_px`` on the long side) of an RGB array, PIL image or image file, atomically."""
    from PIL import Image

    if isinstance(img, (str, os.PathLike)):
        with Image.open(img) as im:
            return save_thumbnail(im.convert("RGB"), path, max_px)
    im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
    im = im.convert("RGB")
    if max(im.size) > max_px:
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    with atomic_path(path) as tmp:
        im.save(tmp, format="JPEG", quality=88)
    return Path(path)


def data_uri(img: np.ndarray | Any, max_px: int = 256, fmt: str = "PNG") -> str:
    """``data:image/...;base64,...`` of an RGB uint8 array or PIL image, downscaled to ``max_px`` on its long side."""
    from PIL import Image

    im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
    im = im.convert("RGB")
    if max(im.size) > max_px:
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        im.save(buf, format="JPEG", quality=88)
        mime = "image/jpeg"
    else:
        im.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "–"
        return str(int(f)) if f.is_integer() and abs(f) >= 1 else f"{f:.4f}"
    return html.escape(str(v))


def table_html(df: "pd.DataFrame", table_id: str, index_name: str | None = None,
               links: Mapping[str, str] | None = None) -> str:
    """A metrics table; ``links`` maps an index value to the page its first cell links to."""
    cols = list(df.columns)
    head = f'<th class="l">{html.escape(index_name or str(df.index.name or ""))}</th>' + "".join(
        f'<th title="{html.escape(METRIC_HELP.get(_base_metric(c), ""))}">{html.escape(str(c))}</th>' for c in cols
    )
    rows = []
    for idx, row in df.iterrows():
        cells = "".join(f"<td>{_fmt(row[c])}</td>" for c in cols)
        label = html.escape(str(idx))
        if links and str(idx) in links:
            label = f'<a href="{html.escape(links[str(idx)])}">{label}</a>'
        rows.append(f'<tr><td class="l">{label}</td>{cells}</tr>')
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _base_metric(col: str) -> str:
    for suffix in ("_opencv", "_insightface"):
        col = col.replace(suffix, "")
    return col


def bars_svg(values: Mapping[str, float], title: str, width: int = 360, bar_h: int = 16) -> str:
    """Horizontal bar chart as inline SVG; NaN values draw no bar and print "–"."""
    items = list(values.items())
    label_w, pad = 110, 6
    finite = [v for _, v in items if v is not None and not math.isnan(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    span = (hi - lo) or 1.0
    plot_w = width - label_w - 60
    height = 22 + len(items) * (bar_h + pad)
    zero_x = label_w + (0 - lo) / span * plot_w
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="bar-chart" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>',
    ]
    for i, (name, v) in enumerate(items):
        y = 22 + i * (bar_h + pad)
        parts.append(f'<text x="0" y="{y + bar_h - 4}" font-size="11">{html.escape(str(name))}</text>')
        if v is None or math.isnan(v):
            parts.append(f'<text x="{label_w}" y="{y + bar_h - 4}" font-size="11">–</text>')
            continue
        x0 = label_w + (min(v, 0) - lo) / span * plot_w
        w = abs(v) / span * plot_w
        parts.append(
            f'<rect class="bar" x="{x0:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar_h}" fill="#4a7bd0">'
            f"<title>{html.escape(str(name))}: {v:.4f}</title></rect>"
        )
        parts.append(f'<text x="{label_w + plot_w + 4}" y="{y + bar_h - 4}" font-size="11">{v:.3f}</text>')
    parts.append(f'<line x1="{zero_x:.1f}" y1="20" x2="{zero_x:.1f}" y2="{height}" stroke="#999"/>')
    parts.append("</svg>")
    return "".join(parts)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in str(s))


def _href(path: str | os.PathLike[str], start: str | os.PathLike[str]) -> str:
    """A relative link from a page in ``start`` to ``path`` (URL-quoted)."""
    return urllib.parse.quote(Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix())


def page_name(identity: str) -> str:
    return f"{PAGES_DIR}/{_slug(identity)}.html"


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>
<body>
{body}
</body></html>
"""


def render_report(data: ReportData) -> str:
    """The index page (``report.html``) as one HTML string: no images, one link per identity."""
    info_rows = "".join(
        f'<tr><td class="l">{html.escape(str(k))}</td><td class="l">{html.escape(str(v))}</td></tr>'
        for k, v in data.info.items()
    )
    url = html.escape(data.mlflow_url or "")
    link = (
        f'<p>MLflow run: <a id="mlflow-link" href="{url}">{url}</a></p>'
        if data.mlflow_url
        else '<p class="muted">not logged to MLflow</p>'
    )
    legend = "".join(
        f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>"
        for k, v in METRIC_HELP.items()
        if any(_base_metric(c) == k for c in data.summary.columns)
    )
    bars = "".join(
        bars_svg({str(k): float(v) for k, v in data.per_category[m].items()}, m)
        for m in data.bar_metrics
        if m in data.per_category.columns
    )
    links = {str(i): page_name(str(i)) for i in data.per_identity.index}
    return _page(data.title, f"""<h1>{html.escape(data.title)}</h1>
{link}
<table id="run-info"><tbody>{info_rows}</tbody></table>
<h2>Metrics</h2>
{table_html(data.summary.T.rename_axis("metric"), "metrics-summary", "metric")}
<ul class="muted">{legend}</ul>
<h2>Per prompt category</h2>
<div class="bars">{bars}</div>
{table_html(data.per_category, "metrics-category", "category")}
<h2>Per identity</h2>
<p class="muted">each identity's page shows its reference faces and every generated image</p>
{table_html(data.per_identity, "metrics-identity", "identity", links)}""")


def render_identity_page(data: ReportData, identity: str, grp: "pd.DataFrame", report_dir: Path) -> str:
    """One identity's page; writes its thumbnails under ``report_dir/thumbs/<identity>/`` (one image decoded at a
    time) and links each to the full image file."""
    pages = report_dir / PAGES_DIR
    thumbs = thumbnail_dir(report_dir, identity)
    figs = []
    for k, src in enumerate(data.references.get(identity, ())):
        if isinstance(src, Path) and src.parent.resolve() == thumbs.resolve():
            thumb = src
        else:
            thumb = save_thumbnail(src, thumbs / f"ref{k}.jpg", data.thumb_px)
        figs.append(f'<img class="ref" alt="reference {html.escape(identity)} #{k}" src="{_href(thumb, pages)}">')
    refs_html = (f'<figure id="refs-{_slug(identity)}"><figcaption>{html.escape(identity)}</figcaption>'
                 f'{"".join(figs)}</figure>')

    seeds = sorted(grp["seed"].unique().tolist())
    head = '<th class="l">prompt</th>' + "".join(f"<th>seed {s}</th>" for s in seeds)
    rows = []
    for (_, _, prompt), pgrp in grp.groupby(["category", "prompt_index", "prompt"], sort=True):
        cat = pgrp["category"].iloc[0]
        cells = []
        for s in seeds:
            hit = pgrp[pgrp["seed"] == s]
            if hit.empty:
                cells.append("<td></td>")
                continue
            r = hit.iloc[0]
            full = data.images_root / r["image"]
            thumb = save_thumbnail(full, thumbs / (_slug(Path(str(r["image"])).with_suffix("").as_posix()) + ".jpg"),
                                   data.thumb_px)
            tip = "; ".join(
                f"{c}={_fmt(r[c])}" for c in r.index if c.startswith(("id_sim", "clip_", "lpips")) and c in r
            )
            cells.append(
                f'<td><a href="{_href(full, pages)}"><img class="gen" alt="{html.escape(str(r["image"]))}" '
                f'title="{html.escape(tip)}" src="{_href(thumb, pages)}"></a></td>'
            )
        rows.append(
            f'<tr><td class="prompt"><b>{html.escape(str(cat))}</b><br>{html.escape(str(prompt))}</td>'
            f"{''.join(cells)}</tr>"
        )
    metrics = (table_html(data.per_identity.loc[[identity]], "metrics-identity", "identity")
               if identity in data.per_identity.index else "")
    return _page(f"{data.title}: {identity}", f"""<p><a id="back" href="../report.html">&larr; report</a></p>
<h1>{html.escape(identity)}</h1>
{metrics}
<h2>Reference faces</h2>
<div class="refs">{refs_html}</div>
<h2>Generated images (prompt x seed)</h2>
<table class="grid" id="grid-{_slug(identity)}"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>""")


def write_report(path: str | os.PathLike[str], data: ReportData) -> Path:
    """Write the identity pages (with their thumbnails), then the index page, each atomically; returns the index
    page's path. Identities are written one at a time, so memory does not grow with the number of images."""
    index = Path(path)
    report_dir = index.parent
    for ident, grp in data.images.groupby(data.images["identity"].astype(str), sort=True):
        atomic_write_text(report_dir / page_name(ident), render_identity_page(data, ident, grp, report_dir))
    return atomic_write_text(index, render_report(data))


def standalone_report(index: str | os.PathLike[str], max_images: int = 400) -> str:
    """``report.html`` and every identity page it links, as ONE self-contained HTML string: each page becomes a
    section of the index, each thumbnail a ``data:`` URI (JPEG, ``report_thumb_px``). For viewers that show a single
    file (KFP's HTML artifact); the paged report beside it stays the one to browse. Past ``max_images`` thumbnails
    the rest are left out with a note, so the single file stays bounded; links to full images are dropped (they
    are files the single-file viewer cannot open).
    """
    import re

    root = Path(index).parent
    text = Path(index).read_text(encoding="utf-8")
    embedded = 0
    left_out = 0
    sections = []

    def inline(match: re.Match[str], page_dir: Path) -> str:
        nonlocal embedded, left_out
        path = (page_dir / urllib.parse.unquote(match.group(1))).resolve()
        if embedded >= max_images or not path.is_file():
            left_out += 1
            return 'src=""'
        embedded += 1
        return f'src="data:image/jpeg;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    for rel in dict.fromkeys(re.findall(r'href="(identities/[^"#]+\.html)"', text)):
        page = root / urllib.parse.unquote(rel)
        if not page.is_file():
            continue
        body = page.read_text(encoding="utf-8").split("<body>", 1)[-1].rsplit("</body>", 1)[0]
        body = re.sub(r'<p><a id="back"[^<]*</a></p>', "", body)
        body = re.sub(r'<a href="[^"]*">(<img [^>]*>)</a>', r"\1", body)  # the full images are not in this file
        body = re.sub(r'src="([^"]+)"', lambda m, d=page.parent: inline(m, d), body)
        anchor = "page-" + _slug(Path(rel).stem)
        text = text.replace(f'href="{rel}"', f'href="#{anchor}"')
        sections.append(f'<section id="{anchor}">{body}</section>')
    note = (f'<p class="muted" id="left-out">{left_out} thumbnails left out of this single-file copy; the paged '
            "report beside the evaluation's outputs has them all</p>" if left_out else "")
    return text.replace("\n</body>", "\n" + "\n".join(sections) + note + "\n</body>", 1)
