"""Writing results: the full result as JSON and a human-readable Markdown table next to it."""

from __future__ import annotations

import json
import os
from pathlib import Path


def format_number(value, digits: int = 2) -> str:
    """A table cell: floats rounded to `digits`, None as an en dash, anything else as `str`."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list], digits: int = 2) -> str:
    """A GitHub Markdown table; numeric columns are right-aligned.

    >>> print(markdown_table(["task", "rougeL"], [["reverse", 12.345]]))
    | task | rougeL |
    |---|---:|
    | reverse | 12.35 |
    """
    numeric = [
        bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if is_numeric else "---" for is_numeric in numeric) + "|",
    ]
    for row in rows:
        cells = [format_number(cell, digits).replace("|", "\\|").replace("\n", " ") for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(output_dir: str | os.PathLike, name: str, result: dict, markdown: str) -> tuple[Path, Path]:
    """Write `result` to `<output_dir>/<name>.json` and `markdown` to `<output_dir>/<name>.md`; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{name}.json", output_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path
