"""An append-only JSON Lines file that survives being killed at any instant.

Each row is encoded whole and handed to the OS in one unbuffered write, so after a `kill -9` the file holds
complete rows plus at most one torn last row with no newline. Opening the file again cuts that torn tail off
before anything is appended, so it can never be glued to the next row or counted as done.
"""

from __future__ import annotations

import json
import logging
import os
import threading


logger = logging.getLogger(__name__)


def id_key(row_id) -> str:
    """A hashable key that tells `1` from `"1"`."""
    return json.dumps(row_id)


class ResumableJsonl:
    """Append rows to `path`, knowing which ids it already holds.

    Attributes:
        done: `id_key(id)` of every complete row already in the file.
        discarded_bytes: length of the torn last line cut off on opening (0 if none).
    """

    def __init__(self, path: str, id_field: str = "id"):
        self.path = path
        self.id_field = id_field
        self.done: set[str] = set()
        self.discarded_bytes = self._recover()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._file = open(path, "ab", buffering=0)
        self._lock = threading.Lock()

    def _recover(self) -> int:
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn row
        discarded = len(data) - keep
        if discarded:
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            logger.warning(
                "%s: discarded a torn last line (%d bytes) left by an interrupted run", self.path, discarded
            )
        for number, line in enumerate(data[:keep].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{self.path}:{number}: not valid JSON ({err.msg}). This line was not written by tuna-trl's "
                    "writer (its rows are always complete); fix or delete it, then run again."
                ) from None
            if not isinstance(row, dict) or self.id_field not in row:
                raise ValueError(f"{self.path}:{number}: a row without an '{self.id_field}' field; fix or delete it.")
            self.done.add(id_key(row[self.id_field]))
        return discarded

    def write(self, row: dict) -> None:
        """Append `row` as one line and hand it to the OS before returning."""
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(data)
            while view:  # a raw write may be partial
                written = self._file.write(view)
                view = view[written:]
            self.done.add(id_key(row[self.id_field]))

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
