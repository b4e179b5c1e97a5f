"""The demo's report in a real browser (headless Chromium over the DevTools protocol, ``tests/cdp.py``).

A small run of the demo recipe's shape (every stage of ``recipes/demo.yaml``: ingest, length and CLIP
scores, perceptual hashes, dedup, clusters, select, export) writes ``report.html``; Chromium opens it from
disk with the network unused and we check what a curator would notice: no console error, every image and
plot loaded with a natural size, every section of the report present, a screenshot that is not blank.
Skips with its reason where Chromium (Debian's ``chromium``, installed by ``.ci/run`` as root) is absent.
"""

import glob
import io
import os

import pytest
import yaml

from libcurate.demo import build
from libcurate.pipeline import load_recipe
from libcurate.runner import run_recipe

from . import cdp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The sections every report has (the contract between the report and this test).
SECTIONS = ("funnel", "scores", "embedding-map", "near-duplicates", "drop-reasons", "judges", "cost")

pytestmark = pytest.mark.skipif(cdp.missing_reason() is not None, reason=str(cdp.missing_reason()))


def demo_recipe(src: str, prefix: str) -> dict:
    """``recipes/demo.yaml`` pointed at ``src`` and ``prefix``, at a size for a test."""
    with open(os.path.join(ROOT, "recipes", "demo.yaml")) as f:
        r = yaml.safe_load(f)
    r["storage"] = {"prefix": prefix}
    r["workers"] = 1
    for st in r["stages"]:
        w = st.setdefault("with", {}) or {}
        st["with"] = w
        if st["stage"] == "ingest":
            w.update(annotations=os.path.join(src, "data.json"), images=src, shard_size=16)
        elif st["stage"] == "cluster":
            w["n_clusters"] = 4
        elif st["stage"] == "select":
            w["budget"] = 20
    return r


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Path of the report.html a small demo run's export wrote."""
    root = tmp_path_factory.mktemp("demo")
    build(str(root / "source"), copies=2)
    recipe = load_recipe(demo_recipe(str(root / "source"), str(root / "run")))
    run_recipe(recipe, progress=False)
    found = glob.glob(str(root / "run" / "export" / "*" / "*" / "report.html"))
    assert len(found) == 1, found
    return found[0]


# Run in the page: show what a reader can open (lazy images, collapsed <details>), wait for every image
# to decode, then measure images, plots and sections.
MEASURE = """(async () => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  return {
    sections: [...document.querySelectorAll('section[id]')].map(s => s.id),
    images: imgs.map(i => ({src: (i.getAttribute('src') || '').slice(0, 48), w: i.naturalWidth, h: i.naturalHeight})),
    svgs: [...document.querySelectorAll('svg')].filter(s => !s.parentElement.closest('svg'))
             .map(s => ({id: s.id || (s.closest('section') || {}).id || '', box: box(s),
                         marks: s.querySelectorAll('path, rect, circle, line, polyline, polygon, use, text').length})),
    external: [...document.querySelectorAll('[src], link[href]')]
             .map(e => e.getAttribute('src') || e.getAttribute('href'))
             .filter(u => u && !/^(data:|#|blob:)/.test(u)),
    title: document.title,
    text: document.body.innerText.length,
  };
})()"""


def png_colours(png: bytes) -> tuple[int, float]:
    """(distinct colours, fraction of pixels that are not near-white) of a PNG."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    flat = a.reshape(-1, 3)
    distinct = len(np.unique(flat[:, 0].astype(np.uint32) << 16 | flat[:, 1].astype(np.uint32) << 8 | flat[:, 2]))
    return distinct, float((flat.min(axis=1) < 235).mean())


def test_demo_report_in_chromium(report):
    with cdp.Browser() as browser:
        page = browser.open("file://" + report, width=1280, height=900)
        m = page.evaluate(MEASURE)
        png = page.screenshot()
        errors = page.console_errors()
        requests = page.requests()
    assert errors == [], errors
    # self-contained: the page itself is the only request that is not inline data
    assert [u for u in requests if not u.startswith("data:")] == ["file://" + report], requests
    assert m["external"] == [], m["external"]
    missing = [s for s in SECTIONS if s not in m["sections"]]
    assert not missing, f"sections missing from the report: {missing} (found {m['sections']})"
    assert m["images"], "the demo's report shows no image"
    broken = [i for i in m["images"] if i["w"] <= 0 or i["h"] <= 0]
    assert not broken, f"{len(broken)} of {len(m['images'])} images did not load: {broken[:5]}"
    blank_plots = [s for s in m["svgs"] if s["box"][0] <= 0 or s["box"][1] <= 0 or s["marks"] == 0]
    assert not blank_plots, f"plots with no size or no marks: {blank_plots[:5]}"
    distinct, inked = png_colours(png)
    assert distinct > 64 and inked > 0.02, f"the screenshot looks blank: {distinct} colours, {inked:.1%} inked"


def test_driver_reports_console_errors_and_failed_loads(tmp_path):
    """The checks above can fail: a page with a console error, an exception and a missing image."""
    page_path = tmp_path / "bad.html"
    page_path.write_text("<html><body><section id='funnel'>x</section><img src='missing.png'>"
                         "<script>console.error('boom'); null.x;</script></body></html>")
    with cdp.Browser() as browser:
        page = browser.open("file://" + str(page_path), width=400, height=300)
        m = page.evaluate(MEASURE)
        errors = page.console_errors()
        blank = page.screenshot()
    assert any("boom" in e for e in errors) and any("uncaught" in e for e in errors), errors
    assert any("missing.png" in e for e in errors), errors
    assert m["sections"] == ["funnel"] and m["images"][0]["w"] == 0 and m["external"] == ["missing.png"]
    distinct, inked = png_colours(blank)
    assert distinct <= 64 or inked <= 0.02
