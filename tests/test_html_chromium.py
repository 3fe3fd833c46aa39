"""The HTML pages as a browser shows them: one report, a comparison of two, and a tracked training run, opened in
headless Chromium. Every image must decode (``naturalWidth > 0``) and no page may be wider than the window (wide
tables scroll inside their own box). Screenshots are kept as test artifacts: in pytest's temporary directory, or in
``$LORAFFT_SCREENSHOTS`` when it is set (never in the repository).

Runs where ``/usr/bin/chromium`` exists (Debian: ``apt-get install -y chromium``), skipped elsewhere.
"""

import html
import json
import os
import pathlib
import re
import subprocess

import pytest
import torch

import lorafft
from lorafft import synthetic
from lorafft.plots.html import write_comparison_html, write_html
from lorafft.tracking import Tracker

CHROMIUM = "/usr/bin/chromium"
WINDOW = (1000, 900)  # narrower than the page's 75em: the layout must fit a laptop window

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")

CHECK = """<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const scrolled = (e) => e.closest(".scroll") !== null;
  const wide = Array.from(document.querySelectorAll("body *"))
    .filter((e) => !scrolled(e) && e.getBoundingClientRect().right > width + 0.5)
    .map((e) => e.tagName.toLowerCase() + (e.className ? "." + e.className : ""));
  const pre = document.createElement("pre");
  pre.id = "lorafft-check";
  pre.textContent = JSON.stringify({
    width, scrollWidth: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight, wide,
    images: Array.from(document.images).map((i) => [i.complete, i.naturalWidth, i.alt.slice(0, 60)]),
  });
  document.body.appendChild(pre);
});
</script>"""


def _chromium(*arguments, profile, height: int = WINDOW[1]) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{height}", *arguments],
                          capture_output=True, text=True, timeout=120)


def _open(page: pathlib.Path, screenshot: pathlib.Path, profile) -> dict:
    """What the loaded ``page`` shows in a window of WINDOW (images, widths), and a screenshot of the whole page at
    that width saved as ``screenshot``."""
    probed = page.with_name(page.stem + "-probed.html")
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8")
    dom = _chromium("--virtual-time-budget=20000", "--dump-dom", probed.as_uri(), profile=profile).stdout
    found = re.search(r'<pre id="lorafft-check">(.*?)</pre>', dom, re.S)
    assert found, f"no result from Chromium for {page.name}"
    shown = json.loads(html.unescape(found.group(1)))
    _chromium(f"--screenshot={screenshot}", page.as_uri(), profile=profile, height=min(shown["height"], 16000))
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, screenshot
    return shown


def _tracked_report():
    """A tracked run of a plain model: three steps of a growing rank-1 update."""
    generator = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(96, 64, bias=False)
    update = torch.randn(64, 1, generator=generator) @ torch.randn(1, 96, generator=generator) / 10
    with torch.no_grad():
        layer.weight.copy_(synthetic.random_weight(64, 96, generator=generator))
        tracker = Tracker(layer, k=8, eps=(0.5, 0.7))
        for step in (100, 200, 300):
            layer.weight.add_(update)
            tracker.step(step)
    return tracker.report()


@pytest.fixture(scope="module")
def pages(trio, tmp_path_factory):
    pytest.importorskip("matplotlib")
    directory = tmp_path_factory.mktemp("pages")
    include = [r"layers\.0\."]
    lora = lorafft.scan(trio.base, trio.lora, eps=(0.5, 0.7), include=include)
    full = lorafft.scan(trio.base, trio.full, eps=(0.5, 0.7), include=include)
    write_html(lora, directory / "report.html", spectra=1)
    write_comparison_html({"lora": lora, "full": full}, directory / "comparison.html")
    write_html(_tracked_report(), directory / "tracked.html", spectra=1)
    return directory


@pytest.mark.parametrize("name, images", [("report", 6), ("comparison", 2), ("tracked", 7)])
def test_page_shows_every_image_and_fits_the_window(pages, tmp_path, name, images):
    shots = pathlib.Path(os.environ.get("LORAFFT_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shown = _open(pages / f"{name}.html", shots / f"{name}.png", tmp_path / "profile")
    assert len(shown["images"]) == images, shown["images"]
    assert all(complete and width > 0 for complete, width, _ in shown["images"]), shown["images"]
    assert shown["scrollWidth"] <= shown["width"] and not shown["wide"], shown
    assert shown["width"] <= WINDOW[0]
