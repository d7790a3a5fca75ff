"""JSON Lines in and out for evaluation: reading with file:line errors, and an append-only, resumable writer.

Thin on purpose: when `tuna_trl.generation` ships its resumable JSONL writer (issue 4), `ResumableJsonl` should
become a re-export of it. Until then this is the same contract: one whole row per line, flushed and fsynced as soon
as it is finished; a torn last line (a process killed mid-write) is detected and dropped on the next open, never
duplicated or half-read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a `.jsonl` file (or a `.json` file holding a list of rows); blank lines are skipped.

    Raises:
        ValueError: a line that is not a JSON object, or a row without one of the `required` fields, naming the
            file and line (the row number for `.json`).
    """
    path = Path(path)
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err}); expected a list of objects or JSON Lines.") from err
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}.")
        numbered = list(enumerate(data, 1))
        where = "row"
    else:
        numbered = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
        where = "line"
    rows = []
    for number, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}, {where} {number}: expected a JSON object, got {type(row).__name__}.")
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(
                f"{path}, {where} {number}: missing field {missing[0]!r} (the row has {sorted(row)}); "
                f"each row needs {list(required)}."
            )
        rows.append(row)
    return rows


def _complete_rows(path: Path) -> Iterator[dict]:
    """Whole rows of a file being appended to; stops at the first torn (unterminated or unparsable) line."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                return
            if isinstance(row, dict):
                yield row


class ResumableJsonl:
    """An append-only JSONL file of finished rows, keyed by `key`, that survives being killed at any instant.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "rows.jsonl")
    >>> with ResumableJsonl(path, key="question_id") as out:
    ...     out.write({"question_id": 1, "verdict": "win"})
    >>> with ResumableJsonl(path, key="question_id") as out:
    ...     sorted(out.done), out.rows[0]["verdict"]
    ([1], 'win')

    Attributes:
        done: the keys already written (by earlier runs and this one).
        rows: every row written so far, in file order.
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path)
        self.key = key
        self.rows: list[dict] = []
        if self.path.exists():
            self.rows = list(_complete_rows(self.path))
            self._truncate_to_rows()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = {row.get(key) for row in self.rows}
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate_to_rows(self) -> None:
        # rewrite only when the file holds something past the last whole row, so a clean file is never touched
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows)
        if self.path.stat().st_size != len(text.encode("utf-8")):
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        """Append `row` as one line and make it durable before returning."""
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows.append(row)
        self.done.add(row.get(self.key))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResumableJsonl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
