"""Self-contained HTML pages: images inline as data: URIs, CSS inline, no script, every text escaped. A page
opens from disk in any browser, offline, and can be mailed or attached as one file."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

from library.report.samples import thumbnail_jpeg

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; }
p.sub { color: #555; margin-top: 0; }
img.figure { max-width: 100%; height: auto; display: block; margin: 8px 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.grid td { padding: 2px; text-align: center; } table.grid img { width: 160px; height: auto; display: block; }
table.grid th.row { max-width: 220px; font-weight: normal; }
ul.notes { color: #8a5a00; } .missing { color: #999; font-style: italic; }
"""


GRID_MAX_WIDTH, GRID_MIN_WIDTH = 160, 64
GRID_SPACE = 900
"""Pixels of the page's width (1200 less the row labels) the images of a sample grid's row share."""


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def jpeg_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def figure(png: bytes, alt: str) -> str:
    return f'<img class="figure" alt="{escape(alt)}" src="{png_uri(png)}">'


def table(header: Sequence[object], rows: Iterable[Sequence[object]], numeric: Sequence[int] = ()) -> str:
    """A table; columns whose index is in `numeric` are right-aligned. Cells are escaped text."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{escape(cell)}</td>" for i, cell in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_grid(rows: Sequence[tuple[str, Sequence[Path | None]]], columns: Sequence[str]) -> str:
    """Sample images as a table: a header row of `columns`, then one row per (label, paths). Each image is an
    inline thumbnail linked to its file (the link works while the file is where it was), shown narrower when there
    are many columns so the grid fits the page's width."""
    head = "<th></th>" + "".join(f"<th>{escape(c)}</th>" for c in columns)
    width = max(GRID_MIN_WIDTH, min(GRID_MAX_WIDTH, GRID_SPACE // max(1, len(columns))))
    body = []
    for label, paths in rows:
        cells = "".join(
            f'<td><a href="{escape(path.resolve().as_uri())}"><img alt="{escape(label)}, {escape(column)}" '
            f'style="width:{width}px" src="{jpeg_uri(thumbnail_jpeg(path))}"></a></td>'
            if path
            else '<td class="missing">no sample</td>'
            for path, column in zip(paths, columns)
        )
        body.append(f'<tr><th class="row">{escape(label)}</th>{cells}</tr>')
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def notes(lines: Sequence[str]) -> str:
    return '<ul class="notes">' + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>" if lines else ""


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str]]) -> str:
    """The whole document: `sections` are (heading, HTML body); a section with an empty body is left out."""
    parts = [f"<h2>{escape(heading)}</h2>\n{body}" for heading, body in sections if body]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f'<h1>{escape(title)}</h1>\n<p class="sub">{escape(subtitle)}</p>\n' + "\n".join(parts) + "\n</body></html>\n"
    )


def paragraph(text: str) -> str:
    return f"<p>{escape(text)}</p>"
