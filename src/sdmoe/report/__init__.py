"""Plots and self-contained HTML from figure records (plain dicts); imports no model code."""

from sdmoe.report.html import (
    HtmlReport,
    Raw,
    Section,
    badge_html,
    image_html,
    table_html,
)

__all__ = ["HtmlReport", "Raw", "Section", "badge_html", "image_html", "table_html"]
