"""The scan journal: every finished row on disk at once, so a crashed or killed scan resumes where it stopped.

Format: JSON lines. The first line is the header ``{"lorafft_journal": 1, "inputs": ..., "options": ...}``; each
further line is one report row (``MatrixRow.to_dict()``), appended and fsync'd as soon as its matrix is done. A
crash can leave at most a partial last line, which is ignored on resume. A journal whose header names other inputs
or options than the resuming scan is refused: its rows would not belong in the report.
"""

from __future__ import annotations

import json
import os

from lorafft.errors import InputError
from lorafft.report import MatrixRow

FORMAT_VERSION = 1


def row_key(row: MatrixRow) -> tuple[str, int, str]:
    return row.name, row.checkpoint, row.side


class Journal:
    """An open journal at ``path`` for a scan described by ``header`` (its inputs and options).

    ``resume=False`` starts a new journal (an existing non-empty one is an error: pass resume or remove it);
    ``resume=True`` reads the finished rows of an existing one into ``rows`` and keeps appending.
    """

    def __init__(self, path, header: dict, *, resume: bool):
        self.path = os.fspath(path)
        self.header = {"lorafft_journal": FORMAT_VERSION, **header}
        self.rows: dict[tuple[str, int, str], MatrixRow] = {}
        exists = os.path.isfile(self.path) and os.path.getsize(self.path) > 0
        if resume:
            if not exists:
                raise InputError(self.path, "no journal to resume from")
            self._read()
        elif exists:
            raise InputError(self.path, "a journal from an earlier scan is here: pass --resume to finish that scan, "
                                        "or remove the file")
        self._handle = open(self.path, "a" if resume else "w", encoding="utf-8")
        if not resume:
            self._write(self.header)

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        try:
            header = json.loads(lines[0])
        except ValueError:
            raise InputError(self.path, "not a lorafft journal (unreadable header)") from None
        if header != json.loads(json.dumps(self.header)):
            raise InputError(self.path, "this journal was written by a scan with other inputs or options; "
                                        "remove it or rerun that scan")
        for number, line in enumerate(lines[1:], start=2):
            if not line:
                continue
            try:
                row = MatrixRow.from_dict(json.loads(line))
            except (ValueError, TypeError, KeyError):
                if number == len(lines):
                    break  # after the last newline: a write cut short by the crash
                raise InputError(self.path, f"line {number} is not a report row") from None
            self.rows[row_key(row)] = row

    def _write(self, record: dict) -> None:
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def append(self, row: MatrixRow) -> None:
        """Record one finished row durably (written, flushed and fsync'd before returning)."""
        self._write(row.to_dict())
        self.rows[row_key(row)] = row

    def close(self, *, remove: bool) -> None:
        """Close; ``remove`` deletes the file (the scan finished and its report is written)."""
        self._handle.close()
        if remove:
            os.unlink(self.path)
