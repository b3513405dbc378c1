"""The self-contained HTML builder."""

import pytest

from sdmoe.report.html import HtmlReport, Raw, badge_html, table_html
from sdmoe.report.plots import bars_vs_baseline


def test_report_structure_and_embedding(tmp_path):
    png = bars_vs_baseline({"a": 0.5, "b": 0.2}, 0.1, "t")
    doc = HtmlReport("Title <x>", subtitle="sub")
    sec = doc.section("Section one", intro="intro & more")
    sec.badge("ok", "pass").badge("odd", "nonsense")
    sec.table([{"name": "a<b", "v": 0.123456, "n": None}, {"name": "c", "v": float("nan"), "extra": 3}], floatfmt="{:.2f}")
    sec.image(png, "a plot")
    sec.keyvalues({"k": 1.5})
    sec.subsection("Inner").paragraph("p")
    path = doc.write(tmp_path / "sub" / "r.html")
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http" not in html.split("<body>")[1]
    assert "Title &lt;x&gt;" in html and "intro &amp; more" in html and "a&lt;b" in html
    assert "data:image/png;base64," in html and "<h3>Inner</h3>" in html
    assert 'class="badge pass"' in html and 'class="badge info">odd' in html
    assert "0.12" in html and "<th" in html and ">extra<" in html
    assert not list((tmp_path / "sub").glob(".*"))  # no temp file left behind


def test_headline_is_the_first_line_of_the_page():
    html = HtmlReport("Title", subtitle="sub", headline="It found <this>.").render()
    body = html.split("<body>", 1)[1]
    assert body.startswith('<p class="headline">It found &lt;this&gt;.</p><h1>Title</h1>')
    assert '<p class="headline">' not in HtmlReport("Title").render()


def test_table_raw_cells_and_empty():
    assert "(no rows)" in table_html([])
    html = table_html([{"verdict": Raw(badge_html("x", "fail"))}])
    assert '<span class="badge fail">x</span>' in html


@pytest.mark.parametrize("verdict", ["pass", "fail", "warn", "info"])
def test_badges(verdict):
    assert f'class="badge {verdict}"' in badge_html("l", verdict)
