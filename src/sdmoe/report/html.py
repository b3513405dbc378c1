"""A small self-contained HTML builder: one file, no external CSS/JS, images inline.

    doc = HtmlReport("SD-MoE analysis", subtitle="model: ...")
    sec = doc.section("Finding 1: parameter overlap", intro="...")
    sec.badge("shared subspace", "pass")           # pass | fail | warn | info
    sec.table([{"layer": 0, "overlap": 0.41}, ...], floatfmt="{:.3f}")
    sec.image(png_bytes, caption="...")
    doc.write("report.html")                       # atomic (temp file + os.replace)

Generic on purpose: any report (analysis, compare) is sections of
paragraphs, key-value lists, tables of dicts, badges and PNG images.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from sdmoe.files import write_text_atomic

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d1d1f;line-height:1.45;padding:0 1rem}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2.2rem}h3{font-size:1.05rem}.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}th,td{border:1px solid #ddd;padding:.25rem .55rem;
text-align:right}th{background:#f5f5f7}td.t,th.t{text-align:left}
figure{margin:1rem 0;display:inline-block;vertical-align:top}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.82rem;color:#555}.badge{display:inline-block;border-radius:.8rem;padding:.1rem .65rem;
font-size:.82rem;font-weight:600;margin:.15rem .3rem .15rem 0}.pass{background:#d7f5dd;color:#11602a}
.fail{background:#fde0de;color:#8a1c12}.warn{background:#fff1cc;color:#7a5300}.info{background:#e3ecfb;color:#1e3f7a}
.headline{font-size:1.08rem;font-weight:600;background:#f5f5f7;border-left:4px solid #1e3f7a;padding:.5rem .8rem}
dl{display:grid;grid-template-columns:max-content auto;gap:.1rem 1rem;font-size:.9rem}dt{font-weight:600}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}pre{background:#f5f5f7;padding:.6rem;
overflow-x:auto}
"""

VERDICTS = ("pass", "fail", "warn", "info")


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt_value(v, floatfmt: str = "{:.4g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if math.isnan(v) else floatfmt.format(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x, floatfmt) for x in v)
    return str(v)


def badge_html(label: str, verdict: str = "info") -> str:
    """An inline coloured verdict badge (pass / fail / warn / info)."""
    if verdict not in VERDICTS:
        verdict = "info"
    return f'<span class="badge {verdict}">{esc(label)}</span>'


def image_html(png: bytes, caption: str = "", width: int | None = None) -> str:
    data = base64.b64encode(png).decode("ascii")
    w = f' width="{int(width)}"' if width else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}"{w}>{cap}</figure>'


def table_html(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.4g}") -> str:
    """A table from a list of dicts (columns: the union of keys in first-seen order, or as given)."""
    if not rows:
        return "<p><em>(no rows)</em></p>"
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(c for c in r if c not in columns)
    text_cols = {c for c in columns if all(isinstance(r.get(c), str) or r.get(c) is None for r in rows)}
    head = "".join(f'<th class="{"t" if c in text_cols else ""}">{esc(c)}</th>' for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cls = ' class="t"' if c in text_cols else ""
            # a value wrapped as Raw(...) is inserted unescaped (e.g. a badge)
            cells.append(f"<td{cls}>{v.html if isinstance(v, Raw) else esc(fmt_value(v, floatfmt))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


@dataclass
class Raw:
    """Trusted HTML to insert as is (in a table cell or a section)."""

    html: str


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)
    level: int = 2

    def paragraph(self, text: str) -> "Section":
        self.parts.append(f"<p>{esc(text)}</p>")
        return self

    def html(self, fragment: str) -> "Section":
        self.parts.append(fragment)
        return self

    def badge(self, label: str, verdict: str = "info") -> "Section":
        self.parts.append(badge_html(label, verdict))
        return self

    def table(self, rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.4g}") -> "Section":
        self.parts.append(table_html(rows, columns, floatfmt))
        return self

    def keyvalues(self, items: dict, floatfmt: str = "{:.4g}") -> "Section":
        inner = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt_value(v, floatfmt))}</dd>" for k, v in items.items())
        self.parts.append(f"<dl>{inner}</dl>")
        return self

    def image(self, png: bytes, caption: str = "", width: int | None = None) -> "Section":
        self.parts.append(image_html(png, caption, width))
        return self

    def code(self, text: str) -> "Section":
        self.parts.append(f"<pre>{esc(text)}</pre>")
        return self

    def subsection(self, title: str) -> "Section":
        sub = Section(title, level=min(self.level + 1, 6))
        self.parts.append(sub)  # rendered in place
        return sub

    def render(self) -> str:
        inner = "".join(p.render() if isinstance(p, Section) else p for p in self.parts)
        return f"<section><h{self.level}>{esc(self.title)}</h{self.level}>{inner}</section>"


@dataclass
class HtmlReport:
    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)
    headline: str = ""  # one sentence of what the report found: the first line of the page, above the title

    def section(self, title: str, intro: str = "") -> Section:
        sec = Section(title)
        if intro:
            sec.paragraph(intro)
        self.sections.append(sec)
        return sec

    def render(self) -> str:
        sub = f'<p class="sub">{esc(self.subtitle)}</p>' if self.subtitle else ""
        lead = f'<p class="headline">{esc(self.headline)}</p>' if self.headline else ""
        body = "".join(s.render() for s in self.sections)
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{esc(self.title)}</title>'
            f"<style>{_CSS}</style></head><body>{lead}<h1>{esc(self.title)}</h1>{sub}{body}</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.render())
