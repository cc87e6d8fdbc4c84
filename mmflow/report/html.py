"""The report's `index.html`: a table of cells and every figure, self-contained (no scripts, no CDN)."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 560px; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #8a5a00; }
"""
COLUMNS = (
    "model",
    "task",
    "analysis",
    "window",
    "correct/total",
    "scored",
    "min (%)",
    "at layer",
    "noise floor (%)",
    "cell",
)
NUMERIC = {"window", "correct/total", "scored", "min (%)", "at layer", "noise floor (%)"}


@dataclass
class FigureEntry:
    """One figure in the page: caption and paths relative to `index.html`."""

    caption: str
    png: str
    pdf: str


def _row(row: dict[str, object]) -> str:
    cells = []
    for column in COLUMNS:
        value = row.get(column, "")
        css = ' class="num"' if column in NUMERIC else ""
        if column == "cell" and row.get("cell_href"):
            text = f'<a href="{escape(str(row["cell_href"]))}"><code>{escape(str(value))}</code></a>'
        else:
            text = escape(str(value))
        cells.append(f"<td{css}>{text}</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def _table(rows: list[dict[str, object]]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    body = "\n".join(_row(r) for r in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _figures(entries: list[FigureEntry]) -> str:
    if not entries:
        return "<p>None.</p>"
    return "\n".join(
        f'<figure><a href="{escape(e.png)}"><img src="{escape(e.png)}" alt="{escape(e.caption)}"></a>'
        f'<figcaption>{escape(e.caption)} — <a href="{escape(e.pdf)}">PDF</a></figcaption></figure>'
        for e in entries
    )


def _header(header: dict[str, str]) -> str:
    if not header:
        return ""
    items = " · ".join(f"{escape(k)}: <code>{escape(v)}</code>" for k, v in header.items())
    return f'<p class="provenance">{items}</p>'


def render_index(
    source: str,
    rows: list[dict[str, object]],
    sections: list[tuple[str, list[FigureEntry]]],
    notes: list[str],
    *,
    header: dict[str, str] | None = None,
    failed: list[dict[str, str]] | None = None,
) -> str:
    """The whole page: header (command, date, version, commit), cells table, failed cells with their
    error, one section per figure kind, notes."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>mmflow report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>mmflow report: attention knockout across modalities</h1>",
        f"<p>Results from <code>{escape(source)}</code>: {len(rows)} done cell(s). Relative change (%) = "
        "(p_new − p_base) / p_base · 100 of the answer's first token at the last position; "
        "bands are 95% intervals of the mean over samples (Student's t, n − 1 degrees of freedom; "
        "none where n &lt; 2), n is written beside each curve; a grey band around 0 is the cell's "
        "measured numerical noise floor (docs/statistics.md).</p>",
        _header(header or {}),
        "<h2>Cells</h2>",
        _table(rows),
    ]
    if failed:
        items = [
            f"<li><code>{escape(f['cell'])}</code> {escape(f['name'])}: {escape(f['error'])}</li>"
            for f in failed
        ]
        parts += [f"<h2>Failed cells ({len(failed)})</h2>", "<ul>", *items, "</ul>"]
    for title, entries in sections:
        parts += [f"<h2>{escape(title)}</h2>", _figures(entries)]
    if notes:
        items = [f'<li class="note">{escape(n)}</li>' for n in notes]
        parts += ["<h2>Notes</h2>", "<ul>", *items, "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
