"""The run report and the comparison page in a real browser: headless Chromium (Debian's `chromium`; `.ci/run`
installs it when absent) opens each page from disk, with no network, and
- from the DOM: every <img> decoded (naturalWidth > 0). The pages have no script; the test opens a copy with a
  few lines added that write the count of decoded images into the DOM once the page has loaded, then dumps it;
- from a screenshot: the page is not blank (pixel spread and a share of non-background pixels).
Set REPORT_SCREENSHOTS=DIR to keep the screenshots for a look."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from library.report.compare import compare_runs, write_comparison
from library.report.run_page import write_run_report
from tests.report_runs import make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed: `apt-get install -y chromium` (.ci/run installs it when absent)",
)

_COUNT_IMAGES = """<script>
addEventListener("load", () => {
  const images = [...document.images];
  document.body.setAttribute("data-images", images.length + "/" +
    images.filter(i => i.complete && i.naturalWidth > 0).length);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def decoded_images(page: Path, tmp: Path) -> tuple[int, int]:
    """(images on the page, images the browser decoded), from the DOM of a copy of `page` with the counting
    script added."""
    probe = tmp / f"probe_{page.name}"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _COUNT_IMAGES + "</body>"), encoding="utf-8")
    result = _chromium(tmp, "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-images="(\d+)/(\d+)"', result.stdout)
    assert found, f"no image count in the DOM (chromium exit {result.returncode}): {result.stderr[-2000:]}"
    return int(found[1]), int(found[2])


def assert_images_decode_fully(page: Path) -> None:
    """Every inline image decodes to its last row in Pillow (a browser shows a truncated image in part, with a
    naturalWidth, so the DOM count alone would pass it)."""
    import base64
    import io

    for index, payload in enumerate(re.findall(r'src="data:image/(?:png|jpeg);base64,([^"]*)"', page.read_text())):
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            try:
                image.load()
            except OSError as error:
                raise AssertionError(f"image {index} of {page.name} does not decode: {error}") from None


def screenshot(page: Path, tmp: Path, height: int = 3000) -> Image.Image:
    target = tmp / f"{page.stem}.png"
    result = _chromium(tmp, f"--screenshot={target}", f"--window-size=1280,{height}", page.as_uri())
    assert target.is_file(), f"no screenshot (chromium exit {result.returncode}): {result.stderr[-2000:]}"
    keep = os.environ.get("REPORT_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(target, Path(keep) / target.name)
    with Image.open(target) as image:
        return image.convert("RGB")


def assert_not_blank(image: Image.Image) -> None:
    grey = image.convert("L")
    spread = ImageStat.Stat(grey).stddev[0]
    inked = sum(count for level, count in enumerate(grey.histogram()) if level < 200) / (grey.width * grey.height)
    assert spread > 20 and inked > 0.02, f"the page looks blank: pixel spread {spread:.1f}, inked share {inked:.3f}"


def test_run_report_renders_with_every_figure_and_sample(tmp_path):
    make_run(tmp_path / "run", "lora", ratio=16.0)
    page = write_run_report(tmp_path / "run", "lora")
    expected = page.read_text().count("<img ")
    assert expected == 3 + 2 * 4  # loss, lr, diagnostics; 2 prompts x 4 sampling points
    assert_images_decode_fully(page)
    assert decoded_images(page, tmp_path) == (expected, expected)
    assert_not_blank(screenshot(page, tmp_path))


def test_comparison_page_renders_with_every_figure_and_sample(tmp_path):
    runs = [make_run(tmp_path / f"ratio{r}", "lora", ratio=float(r), seed=r) for r in (1, 4, 16)]
    runs.append(make_run(tmp_path / "old", "old", ratio=1.0, history=False, sample_every=None))  # lacks parts
    page = write_comparison(compare_runs(runs, sort="loraplus_lr_ratio"), tmp_path / "compare")
    expected = page.read_text().count("<img ")
    assert expected == 3 + 2 * 3 * 4  # loss, lr, diagnostics; 2 prompts x 3 runs with samples x 4 points
    assert_images_decode_fully(page)
    assert decoded_images(page, tmp_path) == (expected, expected)
    assert_not_blank(screenshot(page, tmp_path, height=4000))


def test_the_check_sees_an_image_that_does_not_decode_and_a_blank_page(tmp_path):
    """The two checks above can fail: a damaged image is counted as not decoded, a blank page as blank."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="data:image/png;base64,iVBORw0KGgoAAAA">'
        '<img src="data:image/png;base64,' + _tiny_png() + '"></body></html>'
    )
    assert decoded_images(page, tmp_path) == (2, 1)
    with pytest.raises(AssertionError, match="looks blank"):
        assert_not_blank(screenshot(page, tmp_path, height=600))


def _tiny_png() -> str:
    import base64
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
