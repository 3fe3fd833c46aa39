"""Writing files: the one writer of everything lorafft writes, each file or directory appearing whole or not at all.

- single files (:func:`atomic_path`, :func:`write_atomic`, :func:`write_json`, :func:`write_safetensors`): written
  to a temporary name beside the target, fsync'd, renamed over it;
- a directory (:func:`new_directory`): built in a temporary directory beside it, renamed into place;
- an append-only log (:class:`DurableLog`, the scan journal): each line written, flushed and fsync'd at once;
- locks (:class:`FileLock`): one writer at a time for a journal or a base cache's index;
- checkpoints: a state dict in the Hugging Face layout (:func:`write_checkpoint`: one file, or shards with an
  index), or an existing safetensors checkpoint copied with some tensors replaced (:func:`copy_checkpoint`: same
  shard names, tensor order, metadata and other files).

Temporaries are named ``.lorafft-<host>-<pid>-<random>.tmp``: removed on every exit the process survives (errors,
Ctrl-C, SIGTERM through the CLI), and those of processes that died (``kill -9``, a power cut) are removed by the next
write into the same directory (:func:`remove_stale_temporaries`). An OSError while writing names the file written
(not its temporary), so the CLI can say it in one line ("no space left on device").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorafft.errors import InputError
from lorafft.io.checkpoint import Checkpoint
from lorafft.options import LOCK_PREFIX

INDEX = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|\.index\.json$")
_HOST = hashlib.blake2b(socket.gethostname().encode(errors="surrogateescape"), digest_size=4).hexdigest()
_TEMPORARY = re.compile(r"^\.lorafft-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one that exists but is not ours counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str) -> None:
    """Remove the temporaries (files or directories) that lorafft processes of this host left in ``directory`` when
    they died, and lock files no process holds. Temporaries of live processes and of other hosts are left alone."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            path = os.path.join(directory, entry)
            found = _TEMPORARY.match(entry)
            if found and found["host"] == _HOST and not _alive(int(found["pid"])):
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
            elif entry.startswith(LOCK_PREFIX):
                FileLock.remove_if_free(path)


def temporary_path(directory: str) -> str:
    """A fresh temporary name in ``directory`` (not created), after removing the stale ones there."""
    remove_stale_temporaries(directory)
    return os.path.join(directory, f".lorafft-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def naming(error: OSError, path) -> OSError:
    """``error`` as an OSError that names ``path`` (the file the user asked for, not a temporary)."""
    named = OSError(error.errno, error.strerror or str(error), os.fspath(path))
    named.__cause__ = error
    return named


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """A fresh temporary path beside ``path`` for the caller to write; when the block ends without an error it is
    fsync'd and renamed over ``path``, else removed: readers see the old file or the new one, never a partial one.
    An OSError (no space left, the directory removed) is raised naming ``path``."""
    path = os.fspath(path)
    temporary = None
    try:
        temporary = temporary_path(os.path.dirname(os.path.abspath(path)))
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the mode a plain open() gives
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        if isinstance(error, OSError):
            raise naming(error, path) from error
        raise


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`), UTF-8."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


class DurableLog:
    """A text file appended one line at a time, each on disk (fsync'd) before :meth:`append` returns, so a crash
    or ``kill -9`` loses at most a partly written last line (the reader cuts it off before appending:
    :class:`lorafft.journal.Journal`). ``fresh`` truncates the file first. OSErrors name the file."""

    def __init__(self, path, *, fresh: bool):
        self.path = os.fspath(path)
        try:
            self._handle = open(self.path, "w" if fresh else "a", encoding="utf-8")
        except OSError as error:
            raise naming(error, self.path) from error

    def append(self, line: str) -> None:
        try:
            self._handle.write(line + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            raise naming(error, self.path) from error

    def close(self, *, remove: bool = False) -> None:
        """Close; ``remove`` deletes the file. A write the full disk refused is dropped, not raised again."""
        with contextlib.suppress(OSError):
            self._handle.close()
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class FileLock:
    """One lorafft process at a time writing ``path`` (a journal, a base cache's index): an exclusive ``flock`` on
    the hidden file ``.lorafft-lock-<name>`` beside it, which records the holder's pid for the message a second
    process gets. The lock goes with the process (the kernel drops it on any exit, ``kill -9`` included); the file
    is removed on release, or later by :func:`remove_stale_temporaries` when nobody holds it.

    ``wait``: block until the holder is done (a short critical section); else InputError at once, naming the
    holder (``what`` says what is being written: "journal").
    """

    def __init__(self, path, what: str, *, wait: bool = False):
        path = os.fspath(path)
        self.path, self.what, self.wait = path, what, wait
        self.lock_path = os.path.join(os.path.dirname(os.path.abspath(path)), LOCK_PREFIX + os.path.basename(path))
        self._handle = None

    def __enter__(self) -> FileLock:
        while True:
            handle = open(self.lock_path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read(64).split()
                handle.close()
                pid = f" (pid {holder[0]})" if holder and holder[0].isdigit() else ""
                raise InputError(self.path, f"another lorafft{pid} is writing this {self.what}: wait for it to "
                                            f"finish, or name another file") from None
            with contextlib.suppress(OSError):  # the file we locked is still the one at the path: the lock holds
                if os.fstat(handle.fileno()).st_ino == os.stat(self.lock_path).st_ino:
                    break
            handle.close()  # removed by its last holder between our open and our lock: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {_HOST}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            self._handle.close()
            self._handle = None

    @staticmethod
    def remove_if_free(lock_path: str) -> None:
        """Remove a lock file that no process holds (its holder died, or released it without removing it)."""
        try:
            handle = open(lock_path, "a+", encoding="utf-8")
        except OSError:
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return
            with contextlib.suppress(OSError):
                os.unlink(lock_path)


def write_json(path, value, *, indent: int = 2) -> None:
    """Write ``value`` as JSON (``indent``, a final newline, no NaN or Infinity) to ``path`` atomically."""
    write_atomic(path, json.dumps(value, indent=indent, allow_nan=False) + "\n")


def write_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Write ``tensors`` (made contiguous, in their order) as one safetensors file with ``metadata``, atomically."""
    with atomic_path(path) as temporary:
        save_file({name: t.contiguous() for name, t in tensors.items()}, temporary, metadata=metadata)


def safetensors_metadata(file: str) -> dict[str, str] | None:
    """A safetensors file's ``__metadata__`` (``{"format": "pt"}`` for other formats, as transformers writes it)."""
    if not file.endswith(".safetensors"):
        return {"format": "pt"}
    with safe_open(file, framework="pt") as f:
        return f.metadata()


def write_checkpoint(state_dict: dict[str, torch.Tensor], directory, *, max_shard_bytes: int | None = None,
                     config: dict | None = None) -> Path:
    """Write ``state_dict`` in the Hugging Face layout and return the directory (created if needed).

    One ``model.safetensors``, or, when the tensors exceed ``max_shard_bytes``, shards
    ``model-0000i-of-0000N.safetensors`` filled greedily in ``state_dict`` order (a tensor larger than the limit
    gets a shard of its own) plus ``model.safetensors.index.json`` with ``metadata.total_size`` (bytes of all
    tensors) and ``weight_map`` (tensor name -> shard file). ``config`` is written as ``config.json``. Every file
    carries the metadata ``{"format": "pt"}``. A checkpoint written into ``directory`` before is replaced.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (*directory.glob("model-*-of-*.safetensors"), directory / "model.safetensors", directory / INDEX):
        stale.unlink(missing_ok=True)  # a checkpoint written here before must not outlive this one
    sizes = {name: t.numel() * t.element_size() for name, t in state_dict.items()}
    total = sum(sizes.values())
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in state_dict.items():
        if max_shard_bytes is not None and shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = tensor
        used += sizes[name]
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", state_dict, {"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / filename, shard, {"format": "pt"})
            weight_map.update(dict.fromkeys(shard, filename))
        write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    if config is not None:
        write_json(directory / "config.json", config)
    return directory


@contextlib.contextmanager
def new_directory(out_dir: str) -> Iterator[str]:
    """A temporary directory beside ``out_dir`` for the caller to fill; when the block ends without an error it is
    renamed to ``out_dir`` (which may exist only as an empty directory), else removed with what it holds."""
    parent = os.path.dirname(out_dir)
    temporary = None
    try:
        os.makedirs(parent, exist_ok=True)
        temporary = temporary_path(parent)
        os.mkdir(temporary)
        yield temporary
        try:
            os.rename(temporary, out_dir)
        except OSError as e:
            raise InputError(out_dir, f"cannot create the output directory: {e.strerror or e} "
                                      f"(nothing written)") from e
    except BaseException as error:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise naming(error, out_dir) from error
        raise


@dataclass
class CheckpointFiles:
    """A safetensors checkpoint's files: ``shards`` (path -> tensor names), the ``index`` path or None, and the
    ``directory`` whose other files are copied (None when the input was a single file or an index)."""

    shards: dict[str, list[str]]
    index: str | None
    directory: str | None


def checkpoint_files(checkpoint: Checkpoint, source: str) -> CheckpointFiles:
    """The files of ``checkpoint``, opened from ``source``; InputError if any is not safetensors (rewriting a .bin
    checkpoint would change its format and file names)."""
    shards: dict[str, list[str]] = {}
    for name in checkpoint.stored_names():
        shards.setdefault(checkpoint.file_of(name), []).append(name)
    other = sorted(file for file in shards if not file.endswith(".safetensors"))
    if other:
        raise InputError(other[0], "intervene rewrites only safetensors checkpoints (a .bin one would change "
                                   "format and file names); convert it to safetensors first")
    if os.path.isdir(source):
        index = os.path.join(source, INDEX)
        return CheckpointFiles(shards, index if os.path.isfile(index) else None, source)
    return CheckpointFiles(shards, source if source.endswith(".json") else None, None)


def copy_checkpoint(checkpoint: Checkpoint, files: CheckpointFiles, directory: str,
                    replace: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], leave_out=()) -> list[str]:
    """Copy a checkpoint's files into ``directory`` with the stored tensors named in ``replace`` replaced by
    ``replace[name](stored)``; return the file names written.

    A shard without a replaced tensor is copied byte for byte; the others are rewritten with the same tensor
    order and metadata. The index and the directory's other files are copied (:func:`copy_other_files`, which
    leaves out ``leave_out`` too).
    """
    written = []
    for shard, names in files.shards.items():
        target = os.path.join(directory, os.path.basename(shard))
        changed = [name for name in names if name in replace]
        if not changed:
            shutil.copyfile(shard, target)
        else:
            checkpoint.release(shard)
            tensors = load_file(shard)
            for name in changed:
                tensors[name] = replace[name](tensors[name])
            write_safetensors(target, tensors, safetensors_metadata(shard))
            del tensors
        written.append(os.path.basename(shard))
    if files.index is not None:
        shutil.copyfile(files.index, os.path.join(directory, os.path.basename(files.index)))
        written.append(os.path.basename(files.index))
    if files.directory is not None:
        written += copy_other_files(files.directory, directory, set(written) | set(leave_out))
    return written


def copy_other_files(source: str, directory: str, skip: set[str]) -> list[str]:
    """Copy the regular files of ``source`` not in ``skip`` into ``directory``; other weight files and
    subdirectories are left out with one warning (they would carry the unmodified weights)."""
    copied, left_out = [], []
    for entry in sorted(os.listdir(source)):
        path = os.path.join(source, entry)
        if entry in skip:
            continue
        if not os.path.isfile(path) or _WEIGHT_FILE.search(entry):
            left_out.append(entry)
            continue
        shutil.copyfile(path, os.path.join(directory, entry))
        copied.append(entry)
    if left_out:
        warnings.warn(f"{source}: not copied to the output (other weights or subdirectories): "
                      f"{', '.join(left_out[:5])}" + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""),
                      stacklevel=3)
    return copied
