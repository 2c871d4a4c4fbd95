"""A Markdown page as one self-contained HTML file: the same text rendered (CommonMark and GFM
tables, by markdown-it-py), with an inline stylesheet and nothing fetched from the network, so
that the folder holding it can be copied anywhere and opened in a browser. Links and images keep
the Markdown's (relative) targets; raw HTML in the Markdown is shown as text, not interpreted."""

from __future__ import annotations

import html

from markdown_it import MarkdownIt

STYLE = """\
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; line-height: 1.45;
       max-width: 80rem; margin: 2rem auto; padding: 0 1rem; color: #1b1b1b; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em;
       background: #f3f3f3; padding: .05em .3em; border-radius: 3px; }
.table { overflow-x: auto; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; vertical-align: top; }
th { background: #f3f3f3; } tbody tr:nth-child(even) { background: #fafafa; }
td[style*="right"] { font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; }
"""


def _parser() -> MarkdownIt:
    # "commonmark" with the GFM table rule. No emphasis: the pages use none, and a formula's
    # "*" or "_" (a*b*c, _k_) stays as written; no typographer (quotes and dashes unchanged) and
    # no linkify (no bare-URL guessing, no extra dependency).
    return MarkdownIt("commonmark", {"html": False}).enable("table").disable("emphasis")


def page(markdown: str, title: str | None = None) -> str:
    """The HTML document of `markdown`, titled `title` (default: its first "# " heading). Tables
    sit in a scrolling block, so a wide one does not widen the page."""
    if title is None:
        title = next((ln[2:].strip() for ln in markdown.splitlines() if ln.startswith("# ")), "")
    body = _parser().render(markdown)
    body = body.replace("<table>", '<div class="table"><table>').replace("</table>", "</table></div>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")
