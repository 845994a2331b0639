"""Render ``report.html`` in headless Chromium: a screenshot, and a count of images that failed to load.

Used by the tests and runnable as a script (``python -m idforge.evaluate.browser REPORT.html SHOT.png``), so a
report can be checked the way a person sees it, offline. Needs Debian's ``chromium`` (``apt-get install -y
chromium``); every run uses a fresh profile and no network features.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from idforge.errors import IdforgeError

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)

# Appended to a COPY of the page: after the load event (all images decoded or failed), write what loaded into the
# DOM, which --dump-dom then prints. The report itself carries no script.
_PROBE = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt || i.src.slice(0, 60); });
  var pre = document.createElement('pre');
  pre.id = 'idforge-image-probe';
  pre.textContent = JSON.stringify({total: imgs.length, broken: broken});
  document.body.appendChild(pre);
});
</script>
"""


class ChromiumNotFound(IdforgeError):
    """No Chromium binary on this machine."""


@dataclass
class ImageCheck:
    total: int
    broken: list[str]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise ChromiumNotFound("chromium is not installed; install Debian's package: apt-get install -y chromium")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="idforge-chromium-") as profile:
        cmd = [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        env = {**os.environ, "HOME": profile}  # no writes into the caller's home
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def check_images(html_path: str | os.PathLike[str], timeout: float = 60.0) -> ImageCheck:
    """Load the page and report how many ``<img>`` it has and which ones did not decode."""
    src = Path(html_path).resolve()
    text = src.read_text(encoding="utf-8")
    probe = src.with_name(f".{src.stem}.probe.html")  # beside the original, so relative links resolve the same
    probe.write_text(text.replace("</body>", _PROBE + "</body>") if "</body>" in text else text + _PROBE,
                     encoding="utf-8")
    try:
        res = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], timeout)
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r'<pre id="idforge-image-probe">(.*?)</pre>', res.stdout, re.S)
    if not m:
        raise RuntimeError(f"chromium did not render {src} (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    data = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    return ImageCheck(int(data["total"]), list(data["broken"]))


def screenshot(html_path: str | os.PathLike[str], png_path: str | os.PathLike[str],
               width: int = 1400, height: int = 2400, timeout: float = 60.0) -> Path:
    """Save a PNG screenshot of the page as headless Chromium renders it."""
    out = Path(png_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    res = _run([f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={out}",
                Path(html_path).resolve().as_uri()], timeout)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m idforge.evaluate.browser REPORT.html [SCREENSHOT.png]", file=sys.stderr)
        return 2
    check = check_images(args[0])
    if len(args) == 2:
        screenshot(args[0], args[1])
    print(f"{check.total} images, {len(check.broken)} broken" + (f": {check.broken}" if check.broken else ""))
    return 1 if check.broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
