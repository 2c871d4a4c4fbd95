"""The report page as HTML (report/index.html): rendered from index.md, self-contained in its
folder, and checked in a real headless browser (Debian's `chromium`; the test skips without it,
and fails in CI, which installs it).

The report is `report paper` run on the small stage outputs of test_report.py, then moved to
another folder (as when it is copied off a cluster), so a link back to where it was written
would fail. The browser loads a copy of the page with a probe script beside it (the product's
page holds no script): the probe writes, once the page has loaded, every image's natural width
and every link as the browser resolved it into the DOM, which `--dump-dom` prints. A screenshot
of the page is kept under the test's tmp folder, and copied to $SPECMATCH_TEST_ARTIFACTS when
that is set."""

from __future__ import annotations

import html as html_mod
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pytest

from specmatch.render import html
from specmatch.report import paper

from conftest import unavailable
import test_report
from test_report import _report

stage_outputs = test_report.stage_outputs  # its module fixture: the stage outputs of a small grid

BROWSERS = ("chromium", "chromium-browser")
PROBE = """<script>
window.addEventListener("load", () => {
  const r = {
    title: document.title,
    tables: document.querySelectorAll("table").length,
    images: [...document.images].map(i => ({src: i.getAttribute("src"), url: i.src, width: i.naturalWidth})),
    links: [...document.querySelectorAll("a[href]")].map(a => ({href: a.getAttribute("href"), url: a.href})),
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>
"""


@pytest.fixture(scope="module")
def browser() -> str:
    """chromium's path; asked for before `site`, so a machine without it skips at once."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    unavailable("no headless browser: `chromium` is not on PATH (Debian: apt-get install chromium)")


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless chromium with its own profile, no GPU, and every host name unresolvable (the
    page must need no network)."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def site(stage_outputs, tmp_path_factory):
    """The report, written and then moved elsewhere: (its folder, the tables report paper returned)."""
    root = tmp_path_factory.mktemp("html")
    t = _report(stage_outputs, root / "written")
    moved = root / "copied" / "report"
    moved.parent.mkdir()
    shutil.move(root / "written", moved)
    return moved, t


def _md_tables(text: str) -> int:
    """Markdown tables in `text`: their delimiter rows."""
    return len(re.findall(r"^\|(?: *:?-+:? *\|)+ *$", text, re.M))


def test_html_page_is_the_markdown_page_self_contained(site):
    out, _ = site
    md, page = (out / paper.INDEX).read_text(), (out / paper.HTML).read_text()
    assert page == html.page(md)  # rendered from the same text, nothing else
    assert "<title>Spectrum Matching: the paper&#x27;s experiments (test)</title>" in page
    # Every table of the Markdown page is an HTML table, a "|" in a name included.
    assert page.count("<table>") == _md_tables(md) >= 6
    assert "<th style=\"text-align:right\">KL(target||latent)</th>" in page
    evidence = pd.read_csv(out / "tables" / "claims.csv")["evidence"]
    assert any("||" in e for e in evidence)
    for e in evidence:  # each in one cell, not split at its "|"
        assert f">{html_mod.escape(e, quote=False)}</td>" in page, e
    # Self-contained: inline style only, no script, nothing fetched; every target relative.
    assert "<style>" in page and not re.search(r"<(script|link|iframe)\b", page)
    targets = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert targets and all(not urlparse(u).scheme and not u.startswith("/") for u in targets), targets
    # The same links as index.md: every table's CSV and Markdown, every figure.
    for f in sorted((out / "tables").iterdir()):
        assert f'href="tables/{f.name}"' in page, f.name
    for f in sorted((out / "figures").iterdir()):
        assert f'src="figures/{f.name}"' in page, f.name
    assert set(re.findall(r'"(tables/[^"]+)"', page)) == set(re.findall(r"\]\((tables/[^)]+)\)", md))


def test_html_page_in_a_headless_browser(browser, site, tmp_path):
    out, _ = site
    page = (out / paper.HTML).read_text()
    probe = out / "_probe.html"  # beside the page, so its relative links resolve the same way
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    try:
        dom = _chromium(browser, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                        probe.as_uri()).stdout
    finally:
        probe.unlink()
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, f"the probe wrote nothing; the DOM ends with:\n{dom[-2000:]}"
    r = json.loads(html_mod.unescape(m.group(1)))
    assert r["title"] == "Spectrum Matching: the paper's experiments (test)"
    assert r["tables"] == page.count("<table>")
    figures = sorted(f.name for f in (out / "figures").iterdir())
    assert sorted({Path(i["src"]).name for i in r["images"]}) == figures
    broken = [i["src"] for i in r["images"] if i["width"] <= 0]
    assert not broken, f"images the browser did not load: {broken}"
    # Every relative link, as the browser resolves it, is a file in the (moved) report folder.
    local = [a for a in r["links"] if not urlparse(a["href"]).scheme]
    assert {a["href"] for a in local} >= {f"tables/{f.name}" for f in (out / "tables").iterdir()}
    for a in local:
        target = Path(unquote(urlparse(a["url"]).path))
        assert target.is_file() and target.resolve().is_relative_to(out.resolve()), a
    # Every image came from a file of the folder (Resource Timing lists no file: URLs).
    assert all(i["url"].startswith(out.resolve().as_uri() + "/") for i in r["images"]), r["images"]

    shot = tmp_path / "report-index.png"
    _chromium(browser, tmp_path / "profile", "--window-size=1280,2000", f"--screenshot={shot}",
              (out / paper.HTML).as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    keep = os.environ.get("SPECMATCH_TEST_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(keep) / shot.name)


def test_html_renders_tables_and_leaves_text_as_written():
    md = ("# A <b>title</b>\n\nLP_k(x) and Dec(LP_k(mu)), a*b*c, _k_, t in [0, 0.7], KL(target || latent) "
          "<script>alert(1)</script>\n\n| name | KL(a\\|\\|b) |\n|:-----|------:|\n| x | 1.5 |\n\n"
          "![fig](figures/a_b.png) [CSV](tables/e1.csv)\n")
    page = html.page(md)
    assert "<title>A &lt;b&gt;title&lt;/b&gt;</title>" in page
    assert "LP_k(x) and Dec(LP_k(mu)), a*b*c, _k_, t in [0, 0.7], KL(target || latent)" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert '<th style="text-align:right">KL(a||b)</th>' in page and '<td style="text-align:right">1.5</td>' in page
    assert '<img src="figures/a_b.png" alt="fig" />' in page and '<a href="tables/e1.csv">CSV</a>' in page
