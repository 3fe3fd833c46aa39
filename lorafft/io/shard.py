"""The reader interface: a :class:`Shard` (one file's tensors) and :class:`StoredTensors` (name -> shard).

:class:`StoredTensors` maps every tensor name of a checkpoint to the shard that holds it, as the files store them.

Two readers implement :class:`Shard`: :class:`~lorafft.io.safetensors.SafetensorsShard` and
:class:`~lorafft.io.torch_bin.TensorsShard`. Opening one is cheap (a safetensors header, or nothing); its data is
mapped or loaded on the first read and dropped by ``release()``.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Protocol

import torch

from lorafft.errors import InputError
from lorafft.io.safetensors import Meta, SafetensorsShard
from lorafft.io.torch_bin import SUFFIXES, TensorsShard, load_torch


class Shard(Protocol):
    """One file's tensors (``path`` is the file, named in messages)."""

    path: str

    def names(self) -> Collection[str]:
        """The tensor names the file holds (a .bin file is loaded to list them)."""

    def meta(self, name: str) -> Meta:
        """``(stored dtype, shape)`` of ``name``; for safetensors without reading data."""

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, CPU, stored dtype."""

    def part(self, name: str, index: int | slice) -> torch.Tensor:
        """``tensor(name)[index]``, reading only that part where the format allows."""

    def release(self) -> None:
        """Drop the mapped or loaded data (read again on the next use)."""


def open_shard(file: str) -> Shard:
    """The reader for ``file`` by its suffix; InputError for an unknown one."""
    if file.endswith(".safetensors"):
        return SafetensorsShard(file)
    if file.endswith(SUFFIXES):
        return TensorsShard(file, lambda: load_torch(file))
    raise InputError(file, "unsupported file type (expected .safetensors, .bin, .pt, .pth or an index .json)")


class StoredTensors:
    """A checkpoint's tensors as stored: name -> shard, and the ``index`` file that map came from (if any);
    ``path`` (the checkpoint as given) is named in messages."""

    def __init__(self, path: str, shard_of: dict[str, Shard], index: str | None = None):
        self.path = path
        self.shard_of = shard_of
        self.shards = {shard.path: shard for shard in shard_of.values()}
        self.index = index

    def shard(self, name: str, check: bool = True) -> Shard:
        """The shard holding ``name`` (KeyError if none); with ``check``, InputError if an index listed it in a
        shard that lacks it (.bin shards are only loaded, and so checked, when first read)."""
        try:
            shard = self.shard_of[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{name}'") from None
        if check and name not in shard.names():
            raise missing_from_shard(shard, name, self.index)
        return shard

    def meta(self, name: str) -> Meta:
        """``(stored dtype, shape)`` of the stored tensor ``name``."""
        return self.shard(name).meta(name)


def missing_from_shard(shard: Shard, name: str, index: str) -> InputError:
    """The error for an index entry naming a tensor its shard does not hold."""
    return InputError(shard.path, f"tensor '{name}' listed in {os.path.basename(index)} is not in this shard")
