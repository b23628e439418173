"""The API reference site: ``mkdocs build --strict`` (warnings, broken internal links and anchors
are errors) into a temporary folder, then pages opened in a real headless browser (Debian's
Chromium, ``--dump-dom``: the DOM after the page's scripts ran) to check that they render."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed: `make test` installs it "
    "(apt-get install -y chromium), or install it yourself to run the browser checks")

FAMILIES = ["normface", "crystal", "cosface", "arcface", "combined", "sphereface",
            "curricularface", "adaface", "magface", "elasticface", "subcenter", "npt",
            "uncertainty"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail("mkdocs is not installed: pip install -r docs/requirements.txt (make docs "
                    "and make test do it)")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return out


class Page(HTMLParser):
    """Title, the text of every <pre>, every link and image source, and element ids."""

    def __init__(self, html: str):
        super().__init__()
        self.title, self.pre, self.links, self.images, self.ids = "", [], [], [], set()
        self._in_title = self._in_pre = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "title":
            self._in_title = 1
        elif tag == "pre":
            self._in_pre += 1
            self.pre.append("")
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        elif tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = 0
        elif tag == "pre":
            self._in_pre -= 1

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._in_pre:
            self.pre[-1] += data


def render(path: Path, tmp_path: Path) -> Page:
    """The page's DOM after Chromium loaded it from disk (no network is needed or used)."""
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "<body" in run.stdout, run.stderr[-2000:]
    return Page(run.stdout)


def local_target(page: Path, href: str) -> Path:
    return (page.parent / href.split("#")[0]).resolve()


def test_site_builds_strict_with_every_page(site):
    for slug in FAMILIES:
        assert (site / "families" / f"{slug}.html").is_file(), slug
    for name in ("insightface", "pml", "adaface", "pytorch"):
        assert (site / "migration" / f"{name}.html").is_file(), name
    assert sorted(p.name for p in (site / "benchmarks").glob("*/*.png"))


@needs_chromium
@pytest.mark.parametrize("slug,title,formula,cls", [
    ("arcface", "ArcFace", "z_iy = s · cos(θ_iy + m)", "ArcFaceLoss"),
    ("cosface", "CosFace", "z_iy = s · (cos θ_iy − m)", "CosFaceLoss"),
    ("adaface", "AdaFace", "g_add = m + m · ẑ", "AdaFaceLoss"),
])
def test_family_page_renders_in_a_browser(site, tmp_path, slug, title, formula, cls):
    path = site / "families" / f"{slug}.html"
    page = render(path, tmp_path)
    assert page.title.startswith(title), page.title
    assert any(formula in block for block in page.pre), page.pre          # the formula block
    assert f"marginops.modules.{cls}" in page.ids                          # the docstring (API)
    # A working link: "all families" leads to a page that renders with its own title.
    href = next(h for h in page.links if h == "index.html")
    target = local_target(path, href)
    assert target.is_file()
    assert render(target, tmp_path).title.startswith("The loss families")


@needs_chromium
def test_benchmark_page_shows_the_plots(site, tmp_path):
    path = site / "benchmarks.html"
    page = render(path, tmp_path)
    plots = [src for src in page.images if src.endswith(".png")]
    assert len(plots) >= 4, page.images
    assert all(local_target(path, src).is_file() for src in plots)
