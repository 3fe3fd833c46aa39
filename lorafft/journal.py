"""The scan journal: every finished row on disk at once, so a crashed or killed scan resumes where it stopped.

Format: JSON lines. The first line is the header ``{"lorafft_journal": 1, "inputs": ..., "options": ...,
"fingerprints": {file: digest}}``; each further line is one report row (``MatrixRow.to_dict()``), appended and
fsync'd as soon as its matrix is done; a scan that finished without writing a report (no ``out``) keeps its journal
and ends it with ``{"lorafft_journal_end": rows}``. A crash can leave at most a partial last line, which is ignored on
resume. A journal whose header names other inputs or options than the resuming scan is refused, and so is one whose
input files changed since (:func:`fingerprints`): its rows would not belong in the report. A finished journal of the
same scan is read again instead of recomputed (with a warning). One process at a time writes a journal
(:class:`lorafft.io.writer.FileLock`): a second one is told which process holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings

from lorafft.errors import InputError
from lorafft.io.jsonfile import JOURNAL_LINE_BYTES, parse_json
from lorafft.io.writer import DurableLog, FileLock
from lorafft.report import MatrixRow

FORMAT_VERSION = 1
END = "lorafft_journal_end"  # the last line of a finished journal: {"lorafft_journal_end": number of rows}
_HEAD_BYTES = 1 << 20  # a safetensors header, an adapter or model config: read whole
_SAMPLES, _SAMPLE_BYTES = 64, 4096  # and strided samples of the rest
_INPUT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")


def row_key(row: MatrixRow) -> tuple[str, int, str]:
    return row.name, row.checkpoint, row.side


def fingerprints(sources) -> dict[str, str]:
    """``{file: digest}`` of every file the inputs ``sources`` (paths or in-memory state dicts, which have none)
    are read from: a checkpoint file, or the weights, indexes and configs directly in a directory (or beside an
    index). The digest covers the size, the modification time, the first MiB (headers, configs) and 64 strided
    4 KiB samples of the rest, so an input edited in place is told from the one a journal was written for."""
    files = []
    for source in sources:
        if isinstance(source, dict):
            continue
        path = os.fspath(source)
        folder = path if os.path.isdir(path) else os.path.dirname(path) if path.endswith(".json") else None
        if folder is None:
            files.append(path)
        else:
            files.extend(os.path.join(folder, name) for name in sorted(os.listdir(folder))
                         if name.endswith(_INPUT_SUFFIXES) and os.path.isfile(os.path.join(folder, name)))
    return {file: _digest(file) for file in files}


def _digest(file: str) -> str:
    status = os.stat(file)
    digest = hashlib.blake2b(f"{status.st_size}|{status.st_mtime_ns}".encode(), digest_size=16)
    with open(file, "rb") as handle:
        digest.update(handle.read(_HEAD_BYTES))
        stride = max(_SAMPLE_BYTES, (status.st_size - _HEAD_BYTES) // _SAMPLES)
        for offset in range(_HEAD_BYTES, status.st_size, stride):
            handle.seek(offset)
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def read_header(path) -> dict:
    """The header of the journal at ``path`` (its first line: inputs, options, fingerprints); InputError when the
    file is not a lorafft journal, OSError when it cannot be read."""
    with open(path, "rb") as handle:
        return _header(handle.readline(JOURNAL_LINE_BYTES + 1).rstrip(b"\n"), os.fspath(path))


def _header(line: bytes, path: str) -> dict:
    try:
        header = parse_json(line, path, max_bytes=JOURNAL_LINE_BYTES, what="journal header")
    except InputError:
        raise InputError(path, "not a lorafft journal (unreadable header); remove it") from None
    if not isinstance(header, dict) or header.get("lorafft_journal") != FORMAT_VERSION:
        raise InputError(path, "not a lorafft journal (no lorafft_journal header); remove it")
    return header


class Journal:
    """An open journal at ``path`` for a scan described by ``header`` (its inputs and options), locked against other
    lorafft processes until :meth:`close`.

    ``resume=False`` starts a new journal (an existing one is an error: pass resume or remove it; except a finished
    journal of this very scan, whose rows are read back); ``resume=True`` reads the finished rows of an existing one
    into ``rows`` and keeps appending. ``finished``: the journal holds a whole scan (its end line was read).
    """

    def __init__(self, path, header: dict, *, resume: bool):
        self.path = os.fspath(path)
        self.header = json.loads(json.dumps({"lorafft_journal": FORMAT_VERSION, **header}))
        self.rows: dict[tuple[str, int, str], MatrixRow] = {}
        self.finished = False
        self._lock = FileLock(self.path, "journal").__enter__()
        self._log, created = None, False
        try:
            exists = os.path.isfile(self.path) and os.path.getsize(self.path) > 0
            if exists and not resume:
                resume = self._refuse_overwrite()
            if resume and not exists:
                raise InputError(self.path, "no journal to resume from")
            if resume:
                self._resume()
            created = not resume
            self._log = DurableLog(self.path, fresh=not resume)
            if not resume:
                self._write(self.header)
        except BaseException:
            if self._log is not None:
                self._log.close()
            if created:  # nothing of ours to keep: a journal this run began (perhaps empty on a full disk)
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            self._lock.__exit__()
            raise

    def _check_header(self, header: dict) -> None:
        """The journal must be this scan's: same inputs and options, and input files unchanged since."""
        if {**header, "fingerprints": None} != {**self.header, "fingerprints": None}:
            raise InputError(self.path, "this journal was written by a scan with other inputs or options; "
                                        "remove it or rerun that scan")
        recorded, current = header.get("fingerprints") or {}, self.header.get("fingerprints") or {}
        for file in sorted(recorded.keys() | current.keys()):
            if recorded.get(file) != current.get(file):
                raise InputError(file, f"changed since the scan of journal {self.path} (size, time or "
                                       "content): its rows would mix two versions; remove the journal to rescan")

    def _refuse_overwrite(self) -> bool:
        """An earlier scan's journal is here: True (read it back) when it is this scan's and finished, else an
        InputError saying how to go on; it is never overwritten."""
        with open(self.path, "rb") as handle:
            header = _header(handle.readline(JOURNAL_LINE_BYTES + 1).rstrip(b"\n"), self.path)
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 256))
            finished = handle.read().rstrip(b"\n").rsplit(b"\n", 1)[-1].startswith(b'{"' + END.encode() + b'"')
        same = {**header, "fingerprints": None} == {**self.header, "fingerprints": None}
        if same and finished:
            warnings.warn(f"{self.path}: the rows of the finished scan this journal holds are read back, not "
                          f"computed again (remove it to recompute)", stacklevel=4)
            return True
        if same:
            raise InputError(self.path, "an interrupted run of this scan left this journal: pass --resume to "
                                        "finish it, or remove the file to start over")
        raise InputError(self.path, f"{'a finished' if finished else 'an interrupted'} scan of other inputs or "
                                    f"options left this journal: remove it to start this scan, name another "
                                    f"(--journal)" + ("" if finished else ", or finish that scan with its own "
                                                                          "arguments and --resume"))

    def _resume(self) -> None:
        """Check the header, read the finished rows into ``rows``, and cut off what follows the last newline (a row
        a crash left partly written), so that the rows appended next start on a line of their own."""
        with open(self.path, "rb") as handle:
            data = handle.read()
        header, *lines = data.split(b"\n")
        self._check_header(_header(header, self.path))
        for number, line in enumerate(lines[:-1], start=2):
            if not line:
                continue
            try:
                record = parse_json(line, self.path, max_bytes=JOURNAL_LINE_BYTES)
                if isinstance(record, dict) and END in record:
                    self.finished = True
                    continue
                row = MatrixRow.from_dict(record)
            except (InputError, ValueError, TypeError, KeyError, AttributeError):
                raise InputError(self.path, f"line {number} is not a report row") from None
            self.rows[row_key(row)] = row
        with open(self.path, "rb+") as handle:
            if not lines:  # the header alone, its newline lost
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            elif lines[-1]:
                handle.truncate(len(data) - len(lines[-1]))
            os.fsync(handle.fileno())

    def _write(self, record: dict) -> None:
        self._log.append(json.dumps(record, allow_nan=False))

    def append(self, row: MatrixRow) -> None:
        """Record one finished row durably (written, flushed and fsync'd before returning)."""
        self._write(row.to_dict())
        self.rows[row_key(row)] = row

    def close(self, *, remove: bool, finished: bool = False) -> None:
        """Close and unlock; ``remove`` deletes the file (the scan finished and its report is written); ``finished``
        ends a kept journal with its end line (the scan finished without a report)."""
        if finished and not remove and not self.finished:
            self._write({END: len(self.rows)})
        self._log.close(remove=remove)
        self._lock.__exit__()
