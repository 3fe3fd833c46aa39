"""Opening checkpoints: a directory, weights file, shard index or state dict as a :class:`Checkpoint` of tensors.

A Checkpoint hands out one tensor at a time, viewed the way the analysis needs it (:mod:`lorafft.io.views`).

Directory layouts are those of Hugging Face: ``model.safetensors.index.json``, ``model.safetensors``,
``pytorch_model.bin.index.json`` or ``pytorch_model.bin``, the first found used. A shard index's ``weight_map``
must name files beside it (no ``../``, no directories), each existing; every tensor it lists must be in its shard.
A path that does not resolve is named as what it is (missing, or a symlink loop).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping

import torch

from lorafft.errors import InputError
from lorafft.io.fused import CONFIG, FusedConfig
from lorafft.io.jsonfile import CONFIG_BYTES, INDEX_BYTES, read_json_object
from lorafft.io.shard import Shard, StoredTensors, missing_from_shard, open_shard
from lorafft.io.safetensors import SafetensorsShard
from lorafft.io.torch_bin import STATE_DICT, TensorsShard, check_tensors
from lorafft.io.views import ExpertLayout, View, find_views

LAYOUT = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
_FINITE_CHECK_CHUNK = 1 << 24  # elements per torch.isfinite call, bounding its temporary bool tensor


class Checkpoint:
    """Named tensors of one checkpoint, read one at a time on the CPU.

    Built by :func:`open_checkpoint`. Holds a map tensor name -> shard; a shard's data is mapped when one of its
    tensors is first touched and stays mapped until :meth:`release` or :meth:`close`.

    With ``views`` (what :func:`open_checkpoint` does), float8 weights with a scale read as fp32 and stacked expert
    tensors as one matrix per expert, and with a ``fused_config`` fused projections as their parts
    (:mod:`lorafft.io.views`); ``names()`` lists what the analysis should see and ``stored_names()`` what the files
    hold. ``get`` accepts both kinds of names.
    """

    def __init__(self, path: str, shard_of: dict[str, Shard], index: str | None = None, *, views: bool = False,
                 expert_layout: ExpertLayout = "auto", fused_config: FusedConfig | None = None):
        if expert_layout not in ("auto", "out_in", "in_out"):
            raise ValueError(f"expert_layout must be 'auto', 'out_in' or 'in_out', got {expert_layout!r}")
        if fused_config is not None and not views:
            raise ValueError("splitting fused projections is a view: it needs views=True")
        self.path = path  # what messages name: the directory or file given, or "<state dict>"
        self._stored = StoredTensors(path, shard_of, index)
        self._use_views = views
        self._expert_layout = expert_layout
        self._fused_config = fused_config
        self._views_found: tuple[dict[str, View], set[str]] | None = None

    def names(self) -> list[str]:
        """All tensor names the analysis sees, sorted: stored names, less FP8 scales, stacked expert tensors and
        split fused weights, plus one ``<stacked>.<e>`` per expert and one ``<fused>.<part>.weight`` per part."""
        views, hidden = self._views()
        return sorted((self._stored.shard_of.keys() | views.keys()) - hidden)

    def stored_names(self) -> list[str]:
        """All tensor names as stored in the files, sorted."""
        return sorted(self._stored.shard_of)

    def is_view(self, name: str) -> bool:
        """True when ``get(name)`` is not a stored tensor as stored: a dequantized FP8 weight, one expert of a
        stacked tensor or one part of a fused weight (code that rewrites files must not write such a tensor back
        under ``name``)."""
        return name in self._views()[0]

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name`` (for messages); touches no data."""
        return self._view(name).file(self._stored)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (as ``get`` returns it), without reading its data."""
        return self._view(name).shape(self._stored)

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of tensor ``name`` as ``get`` returns it (the stored one; fp32 for a dequantized FP8 weight or a
        part of one), without reading its data."""
        return self._view(name).dtype(self._stored)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``: CPU, stored dtype (fp32 for a dequantized FP8 weight; one expert's ``[out, in]``
        matrix for ``<stacked>.<e>``; a copy of the part's rows for ``<fused>.<part>.weight``). InputError if a
        floating-point result holds NaN or Inf."""
        view = self._view(name)
        tensor = view.read(self._stored)
        if not all_finite(tensor):
            raise InputError(view.file(self._stored), f"tensor '{name}' contains NaN or Inf")
        return tensor

    def get_stored(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tensor ``name`` as its file stores it and its dequantisation scale: ``(float8 weight [out, in], fp32
        scale)`` for an FP8 weight with a scale (``[]`` per tensor, ``[out]`` per channel, ``[ceil(out/128),
        ceil(in/128)]`` per 128×128 block; the matrix is ``weight · scale``), else ``(get(name), None)``. For the
        kernels, which read FP8 natively. InputError if the weight or the scale holds NaN or Inf."""
        view = self._view(name)
        tensor, scale = view.read_stored(self._stored)
        for value in (tensor, scale):
            if value is not None and not all_finite(value):
                raise InputError(view.file(self._stored), f"tensor '{name}' (or its scale) contains NaN or Inf")
        return tensor, scale

    def release(self, file: str) -> None:
        """Unmap one shard's data (it is mapped again if one of its tensors is touched later)."""
        self._stored.shards[file].release()

    def close(self) -> None:
        """Unmap every shard."""
        for shard in self._stored.shards.values():
            shard.release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _view(self, name: str) -> View:
        return self._views()[0].get(name) or View(name)

    def _views(self) -> tuple[dict[str, View], set[str]]:
        """``({name: view}, hidden stored names)``, found on first use (:func:`lorafft.io.views.find_views`)."""
        if self._views_found is None:
            self._views_found = (find_views(self._stored, self._expert_layout, self._fused_config)
                                 if self._use_views else ({}, set()))
        return self._views_found


def all_finite(t: torch.Tensor) -> bool:
    """False if a floating-point tensor holds NaN or Inf. A finite sum proves it finite (any NaN or Inf would make
    the sum NaN or Inf) with one reduction and no temporary; only a non-finite sum (a bad value, or an overflow of
    the sum itself) is checked element by element, in chunks to bound temporary memory."""
    if not t.is_floating_point():
        return True
    if t.element_size() > 1 and bool(torch.isfinite(t.sum())):
        return True
    for chunk in t.reshape(-1).split(_FINITE_CHECK_CHUNK):
        if chunk.element_size() == 1:  # fp8 has no isfinite kernel; both formats fit fp16 exactly
            chunk = chunk.to(torch.float16)
        if not torch.isfinite(chunk).all():
            return False
    return True


def open_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor], *, views: bool = True,
                    expert_layout: ExpertLayout = "auto", split_fused: bool = False) -> Checkpoint:
    """Open a checkpoint directory, a single weights file, a shard index ``.json``, or a ``{name: tensor}`` dict.

    Args:
        source: the checkpoint (module docstring for directory layouts).
        views: dequantize FP8 weights and split stacked expert tensors (:mod:`lorafft.io.views`).
        expert_layout: how stacked experts are stored (``"auto"``, ``"out_in"`` for ``[E, out, in]``, ``"in_out"``
            for ``[E, in, out]``).
        split_fused: show fused ``qkv_proj`` / ``gate_up_proj`` / ``query_key_value`` weights as their parts, as the
            directory's ``config.json`` says (:mod:`lorafft.io.fused`); only a directory has one, so a file or a
            state dict is an InputError, and so is a directory without it. Whether the config fits is checked when
            the names are first listed.

    Returns:
        The :class:`Checkpoint`; InputError for anything unreadable.
    """
    if split_fused and not views:
        raise ValueError("split_fused is a view: it needs views=True")
    options = {"views": views, "expert_layout": expert_layout}
    if isinstance(source, Mapping):
        if split_fused:
            raise InputError(STATE_DICT, f"--split-fused needs the checkpoint's {CONFIG} to know how fused "
                                         f"projections split, and an in-memory state dict has none: give the "
                                         f"checkpoint directory")
        tensors = check_tensors(STATE_DICT, source)
        shard = TensorsShard(STATE_DICT, lambda: tensors)
        return Checkpoint(STATE_DICT, dict.fromkeys(tensors, shard), **options)
    path = existing_path(source)
    if not os.path.isdir(path):
        if split_fused:
            raise InputError(path, f"--split-fused needs the checkpoint's {CONFIG} to know how fused projections "
                                   f"split, and a single file has none: give the checkpoint directory that holds "
                                   f"this file and {CONFIG}")
        return open_file(path, path, **options)
    if split_fused:
        config = os.path.join(path, CONFIG)
        if not os.path.isfile(config):
            raise InputError(config, f"no such file: --split-fused reads the model_type and head counts of "
                                     f"the checkpoint {path} from it")
        options["fused_config"] = FusedConfig(config, read_json_object(config, max_bytes=CONFIG_BYTES))
    file = first_file(path, LAYOUT)
    if file is None:
        raise InputError(path, "no checkpoint found "
                               "(looked for model.safetensors[.index.json], pytorch_model.bin[.index.json])")
    return open_file(path, file, **options)


def existing_path(source: str | os.PathLike) -> str:
    """``source`` as a string if it resolves to a regular file or a directory; else InputError saying why (no such
    file, a symlink loop, a FIFO or device, which reading would block on or never finish)."""
    path = os.fspath(source)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        reason = {errno.ENOENT: "no such file or directory",
                  errno.ELOOP: "symbolic link loop (the link resolves to itself)"}.get(e.errno, e.strerror or str(e))
        raise InputError(path, reason) from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(path, "is not a regular file or a directory (a FIFO, device or socket): lorafft reads "
                               "checkpoints from files")
    return path


def first_file(directory: str, candidates: tuple[str, ...]) -> str | None:
    """The first of ``candidates`` in ``directory`` that is a file; a candidate that exists as a link that does not
    resolve (broken, or a loop) is an InputError rather than passed over."""
    for candidate in candidates:
        file = os.path.join(directory, candidate)
        if os.path.lexists(file):
            existing_path(file)
            if os.path.isfile(file):
                return file
    return None


def open_file(path: str, file: str, **options) -> Checkpoint:
    """A Checkpoint (named ``path``) from one weights file or a shard index ``.json``; ``options`` go to it."""
    if file.endswith(".json"):
        return _open_index(path, file, **options)
    shard = open_shard(file)
    return Checkpoint(path, dict.fromkeys(shard.names(), shard), **options)


def _open_index(path: str, index: str, **options) -> Checkpoint:
    """A Checkpoint from a shard index (``{"weight_map": {tensor name: shard file name}}``, shards beside it)."""
    weight_map = read_json_object(index, max_bytes=INDEX_BYTES).get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(index, "not a shard index (no 'weight_map' object): give the checkpoint's directory, a "
                                "weights file or its *.index.json")
    shards: dict[str, Shard] = {}
    for name, shard_name in weight_map.items():
        if not _is_file_name(shard_name):
            raise InputError(index, f"weight_map entry for '{name}' is not a file name: {shard_name!r}")
        if shard_name not in shards:
            file = first_file(os.path.dirname(index), (shard_name,))
            if file is None:
                raise InputError(index, f"shard '{shard_name}' named in the index does not exist")
            shards[shard_name] = open_shard(file)
    for name, shard_name in weight_map.items():  # safetensors headers are already read: check them now
        shard = shards[shard_name]
        if isinstance(shard, SafetensorsShard) and name not in shard.names():
            raise missing_from_shard(shard, name, index)
    return Checkpoint(path, {name: shards[shard_name] for name, shard_name in weight_map.items()}, index=index,
                      **options)


def _is_file_name(name) -> bool:
    """True for a plain file name: no directory part (so no ``../``), not ``.`` or ``..``."""
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
