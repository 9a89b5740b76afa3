"""The one table writer: rows of dicts → Markdown (for people) and CSV (for scripts)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from nikl_ray.artifacts import write_json, write_text


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4f}" if abs(v) < 1.5 else f"{v:.1f}"
    return str(v)


def _escaped(text: str) -> str:
    """A Markdown table cell: a `|` would end the cell, a newline the row."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def _columns(rows: list[dict]) -> list[str]:
    """Every column that some row fills (empty columns are not printed)."""
    cols: list[str] = []
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)
    return [c for c in cols if any(_cell(r.get(c)) != "" for r in rows)]


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = _columns(rows)
    lines = ["| " + " | ".join(map(_escaped, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_escaped(_cell(r.get(c))) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(path: str | Path, rows: list[dict]) -> Path:
    """`path` as CSV (every column) and `path` with .md (filled columns). Returns the CSV path."""
    path = Path(path)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
    write_text(path.with_suffix(".md"), markdown(rows))
    return path


def write_result(path: str | Path, record: dict, text: str) -> Path:
    """A benchmark's result: `record` as JSON at `path`, `text` (its Markdown) beside it and on stdout."""
    path = write_json(path, record)
    write_text(path.with_suffix(".md"), text)
    print(text)
    return path
