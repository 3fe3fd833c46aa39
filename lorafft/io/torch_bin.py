"""PyTorch checkpoints (``.bin``, ``.pt``, ``.pth``) and in-memory state dicts as lazily loaded shards.

Files are unpickled only with ``torch.load(..., weights_only=True)``, which refuses any pickle that would build an
object other than tensors and plain containers (a hostile file is an error, never code that runs), and checked to
map names to tensors.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Collection, Mapping

import torch

from lorafft.arrays import as_tensor
from lorafft.errors import InputError
from lorafft.io.safetensors import Meta

SUFFIXES = (".bin", ".pt", ".pth")
STATE_DICT = "<state dict>"  # the path named in messages about an in-memory state dict


def load_torch(path: str) -> dict[str, torch.Tensor]:
    """Load a ``torch.save`` file (zip format memory-mapped, legacy format read whole) as ``{name: tensor}``; a
    ``{"state_dict": {...}}`` wrapper is unwrapped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # corrupt or hostile files make torch raise many different types
        raise InputError(path, f"cannot read PyTorch checkpoint: {_short_reason(e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return check_tensors(path, obj)


def _short_reason(e: Exception) -> str:
    """The first sentence of torch's (often multi-paragraph) error message."""
    text, prefix = str(e), ""
    if "WeightsUnpickler error:" in text:
        text, prefix = text.split("WeightsUnpickler error:", 1)[1], "refused by the weights_only unpickler: "
    first = re.split(r"\.\s|\n", text.strip(), maxsplit=1)[0]
    return prefix + (first or type(e).__name__)[:200]


def check_tensors(path: str, obj) -> dict[str, torch.Tensor]:
    """``obj`` as a dict of tensors if it maps strings to tensors (or to DLPack arrays such as CuPy's, wrapped
    without a copy: :func:`lorafft.arrays.as_tensor`) whose storage holds every element of their shape, else
    InputError naming ``path`` (a 1.5 KB file can hold ``zeros(1).expand(10**5, 10**5)``: 40 GB once read)."""
    if not isinstance(obj, Mapping):
        raise InputError(path, f"expected a dict of tensors, got {type(obj).__name__}")
    tensors = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise InputError(path, f"tensor name {name!r} is not a string")
        try:
            tensor = as_tensor(value)
        except TypeError:
            raise InputError(path, f"'{name}' is not a tensor (got {type(value).__name__})") from None
        if tensor.layout != torch.strided or tensor.is_meta:
            raise InputError(path, f"'{name}' is not a dense tensor with data ({tensor.layout}, {tensor.device})")
        needed = tensor.numel() * tensor.element_size()
        if needed > tensor.untyped_storage().nbytes():
            raise InputError(path, f"'{name}' has shape {list(tensor.shape)} ({needed} bytes) but its storage holds "
                                   f"{tensor.untyped_storage().nbytes()}: an expanded or overlapping view, which "
                                   f"reading would blow up in memory; save it with .contiguous()")
        tensors[name] = tensor
    return tensors


class TensorsShard:
    """A ``torch.save`` file or an in-memory state dict (a :class:`lorafft.io.shard.Shard`): ``load()`` gives
    ``{name: tensor}``, called on first use and again after :meth:`release`."""

    def __init__(self, path: str, load: Callable[[], dict[str, torch.Tensor]]):
        self.path = path
        self._load = load
        self._tensors: dict[str, torch.Tensor] | None = None

    def _loaded(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self._load()
        return self._tensors

    def names(self) -> Collection[str]:
        return self._loaded().keys()

    def meta(self, name: str) -> Meta:
        t = self._loaded()[name]
        return t.dtype, tuple(t.shape)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, CPU, stored dtype."""
        return self._loaded()[name].detach().cpu()

    def part(self, name: str, index: int | slice) -> torch.Tensor:
        """``tensor(name)[index]`` (one expert, or a range of rows)."""
        return self._loaded()[name][index].detach().cpu()

    def release(self) -> None:
        self._tensors = None
