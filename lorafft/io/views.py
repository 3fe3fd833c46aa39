"""Views: what a checkpoint's stored tensors look like to the analysis, one small protocol for every kind.

A :class:`View` says, for one name the analysis sees, its shape and dtype (from headers: no data read), which
file holds its data, and how to read it. :func:`find_views` finds them from names, dtypes and shapes:

- **FP8 weights** (:class:`Fp8View`): a float8 ``<m>.weight`` stored with ``<m>.weight_scale`` or
  ``<m>.weight_scale_inv`` (:mod:`lorafft.io.fp8`) reads as the fp32 product; the scale is hidden. A float8
  weight without a scale is returned as stored.
- **Stacked expert tensors** (:class:`ExpertView`): a 3-D floating tensor ``<...>.experts.<param>``, ``[E, ·, ·]``,
  reads as E matrices ``<...>.experts.<param>.<e>`` in the torch ``[out, in]`` orientation; the stacked name is
  hidden. Two layouts exist: ``[E, out, in]`` (vLLM's fused MoE, transformers' fused ``*Experts`` modules:
  ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) and ``[E, in, out]`` (GPT-OSS and Llama 4 checkpoints:
  ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, applied as ``x @ W[e]``). Shapes alone tell them apart only
  for a fused ``gate_up_proj`` beside its ``down_proj`` (``gate_up`` has twice the intermediate size I on its
  output side): ``expert_layout="auto"`` uses that test and assumes ``[E, out, in]`` otherwise; ``"out_in"`` or
  ``"in_out"`` says it outright. Per-expert 2-D tensors (``experts.3.w1.weight``) need nothing: they are ordinary.
- **Fused projections**, only with a :class:`~lorafft.io.fused.FusedConfig` (:class:`SplitView`): a 2-D
  ``<m>.qkv_proj.weight`` / ``<m>.query_key_value.weight`` reads as ``<m>.qkv_proj.q.weight``, ``.k.weight``,
  ``.v.weight``, a 2-D ``<m>.gate_up_proj.weight`` as ``.gate.weight`` and ``.up.weight``: each the rows that
  projection applies (:mod:`lorafft.io.fused`), from the FP8 product if the fused weight is FP8. The fused name is
  hidden; fused biases are left as stored (biases are never analysed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from lorafft.errors import InputError
from lorafft.io.fp8 import FP8_DTYPES, SCALE_SUFFIXES, Fp8Scheme, dequantize, fp8_scheme, scale_mismatch
from lorafft.io.fused import FUSED_WEIGHT, FusedConfig, RowRanges, split_name
from lorafft.io.shard import StoredTensors

ExpertLayout = Literal["auto", "out_in", "in_out"]
_STACKED_EXPERTS = re.compile(r"(^|\.)\w*experts\.[^.]+$")  # <...>.experts.<param>: a module's direct parameter


@dataclass(frozen=True)
class View:
    """A stored tensor as stored: the base of every view; ``stored`` is the tensor whose file holds the data."""

    stored: str

    def file(self, store: StoredTensors) -> str:
        """The file holding the data (for messages); touches no data."""
        return store.shard(self.stored, check=False).path

    def shape(self, store: StoredTensors) -> tuple[int, ...]:
        return store.meta(self.stored)[1]

    def dtype(self, store: StoredTensors) -> torch.dtype:
        return store.meta(self.stored)[0]

    def read(self, store: StoredTensors) -> torch.Tensor:
        return store.shard(self.stored).tensor(self.stored)

    def read_stored(self, store: StoredTensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tensor, scale)``: the data as the file stores it and its dequantisation scale (None: :meth:`read`'s
        tensor is the matrix itself)."""
        return self.read(store), None

    def read_rows(self, store: StoredTensors, rows: RowRanges) -> torch.Tensor:
        """The rows ``rows`` of :meth:`read`'s matrix, as a new tensor; one range reads only its bytes."""
        if len(rows) == 1:
            return store.shard(self.stored).part(self.stored, slice(*rows[0]))
        return _rows(self.read(store), rows)


@dataclass(frozen=True)
class Fp8View(View):
    """A float8 weight (``stored``) times its ``scale`` tensor, read as fp32."""

    scale: str
    scheme: Fp8Scheme

    def dtype(self, store: StoredTensors) -> torch.dtype:
        return torch.float32

    def read(self, store: StoredTensors) -> torch.Tensor:
        weight = store.shard(self.stored).tensor(self.stored)
        return dequantize(weight, store.shard(self.scale).tensor(self.scale), self.scheme)

    def read_stored(self, store: StoredTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """``(float8 weight [out, in] as stored, fp32 scale)``, the scale in the layout of
        :func:`lorafft.kernels.sketch.sketch` for one matrix: ``[]`` per tensor, ``[out]`` per output channel (the
        stored ``[out, 1]`` reshaped), ``[ceil(out/128), ceil(in/128)]`` per block (``_scale_inv`` too: it is
        multiplied, like the others)."""
        weight = store.shard(self.stored).tensor(self.stored)
        scale = store.shard(self.scale).tensor(self.scale).to(torch.float32)
        layout = {"tensor": (), "channel": (-1,)}.get(self.scheme, scale.shape)
        return weight, scale.reshape(layout).contiguous()

    def read_rows(self, store: StoredTensors, rows: RowRanges) -> torch.Tensor:
        return _rows(self.read(store), rows)  # block scales may straddle the parts: dequantize the whole


@dataclass(frozen=True)
class ExpertView(View):
    """Expert ``index`` of a stacked ``[E, ·, ·]`` tensor (``stored``), ``transposed`` when it is stored
    ``[E, in, out]``."""

    index: int
    transposed: bool

    def shape(self, store: StoredTensors) -> tuple[int, ...]:
        rows, cols = store.meta(self.stored)[1][1:]
        return (cols, rows) if self.transposed else (rows, cols)

    def read(self, store: StoredTensors) -> torch.Tensor:
        tensor = store.shard(self.stored).part(self.stored, self.index)
        return tensor.T.contiguous() if self.transposed else tensor


@dataclass(frozen=True)
class SplitView(View):
    """Part ``part`` of a fused 2-D weight (``stored``, read through ``source``: as stored or FP8): its rows
    ``rows``, in order (one range for ``[q; k; v]`` blocks, one per head or group for interleaved layouts)."""

    part: str
    rows: RowRanges
    source: View

    def shape(self, store: StoredTensors) -> tuple[int, ...]:
        return sum(end - begin for begin, end in self.rows), self.source.shape(store)[1]

    def dtype(self, store: StoredTensors) -> torch.dtype:
        return self.source.dtype(store)

    def read(self, store: StoredTensors) -> torch.Tensor:
        return self.source.read_rows(store, self.rows)


def _rows(tensor: torch.Tensor, rows: RowRanges) -> torch.Tensor:
    """``tensor``'s rows ``rows`` as a new tensor (a copy: it does not keep ``tensor`` alive)."""
    return torch.cat([tensor[begin:end] for begin, end in rows]) if len(rows) > 1 else tensor[slice(*rows[0])].clone()


def find_views(store: StoredTensors, expert_layout: ExpertLayout,
               fused: FusedConfig | None) -> tuple[dict[str, View], set[str]]:
    """``({name: view}, stored names hidden from the analysis)``, from names, dtypes and shapes (headers only for
    safetensors) and the fused config. InputError for a float8 weight whose scale does not fit it, or a fused
    weight the config cannot split."""
    views: dict[str, View] = {}
    hidden: set[str] = set()
    _find_fp8(store, views, hidden)
    _find_experts(store, views, hidden, expert_layout)
    if fused is not None:
        _find_fused(store, views, hidden, fused)
    return views, hidden


def _find_fp8(store: StoredTensors, views: dict[str, View], hidden: set[str]) -> None:
    for weight in store.shard_of:
        scales = [(weight + suffix, suffix) for suffix in SCALE_SUFFIXES if weight + suffix in store.shard_of]
        if not scales or store.meta(weight)[0] not in FP8_DTYPES:
            continue  # a float8 tensor without a scale is returned as stored; other dtypes are never scaled
        if len(scales) > 1:
            raise InputError(store.shard(weight).path, f"float8 tensor '{weight}' has both a '_scale' and a "
                                                       f"'_scale_inv' tensor: which one applies is ambiguous")
        (scale, suffix), = scales
        shape, (scale_dtype, scale_shape) = store.meta(weight)[1], store.meta(scale)
        scheme = fp8_scheme(shape, scale_shape, suffix)
        if scheme is None or not scale_dtype.is_floating_point:
            raise InputError(store.shard(scale).path,
                             scale_mismatch(scale, scale_dtype, scale_shape, weight, shape, suffix, scheme))
        views[weight] = Fp8View(weight, scale, scheme)
        hidden.add(scale)


def _find_experts(store: StoredTensors, views: dict[str, View], hidden: set[str], layout: ExpertLayout) -> None:
    stacked = {}
    for name in store.shard_of:
        if _STACKED_EXPERTS.search(name) and name not in views:
            dtype, shape = store.meta(name)
            if len(shape) == 3 and dtype.is_floating_point:
                stacked[name] = shape
    for name, transposed in _stacked_transposed(stacked, layout).items():
        hidden.add(name)
        for index in range(stacked[name][0]):
            views[f"{name}.{index}"] = ExpertView(name, index, transposed)


def _stacked_transposed(shapes: dict[str, tuple[int, ...]], layout: ExpertLayout) -> dict[str, bool]:
    """For each stacked expert tensor (name -> shape ``[E, a, b]``): True when stored ``[E, in, out]``.

    ``auto``: a ``gate_up_proj`` and its sibling ``down_proj`` decide for both: ``[E, 2I, H]`` with ``[E, H, I]``
    is ``[E, out, in]``; ``[E, H, 2I]`` with ``[E, I, H]`` is ``[E, in, out]`` (the two cannot both hold for
    nonzero sizes). Anything else is taken as ``[E, out, in]``, torch's ``Linear`` convention.
    """
    if layout != "auto":
        return dict.fromkeys(shapes, layout == "in_out")
    transposed = dict.fromkeys(shapes, False)
    for name, gate_up in shapes.items():
        if not name.endswith(".gate_up_proj"):
            continue
        sibling = name.removesuffix("gate_up_proj") + "down_proj"
        down = shapes.get(sibling)
        if down is None or down[0] != gate_up[0]:
            continue
        if gate_up[2] == 2 * down[1] and gate_up[1] == down[2]:
            transposed[name] = transposed[sibling] = True
    return transposed


def _find_fused(store: StoredTensors, views: dict[str, View], hidden: set[str], fused: FusedConfig) -> None:
    layouts: dict[str, dict[str, RowRanges]] = {}  # kind -> layout, one per checkpoint
    for name in sorted(store.shard_of):
        match = FUSED_WEIGHT.search(name)
        if match is None:
            continue
        dtype, shape = store.meta(name)
        if len(shape) != 2 or not dtype.is_floating_point:
            continue
        kind = match["kind"]
        if kind not in layouts:
            layouts[kind] = fused.layout(kind, name)
        layout = layouts[kind]
        total = sum(end - begin for ranges in layout.values() for begin, end in ranges)
        if shape[0] != total:
            sizes = " + ".join(f"{part} {sum(e - b for b, e in ranges)}" for part, ranges in layout.items())
            raise InputError(fused.path, f"cannot split the fused '{name}' ({store.shard(name).path}): it has "
                                         f"{shape[0]} rows but this config ({fused.config['model_type']}) gives "
                                         f"{sizes} = {total}")
        source = views.get(name, View(name))
        for part, ranges in layout.items():
            view_name = split_name(name, part)
            if view_name in store.shard_of or view_name in views:
                raise InputError(store.shard(name).path, f"cannot split the fused '{name}': the checkpoint "
                                                         f"already has a tensor named '{view_name}'")
            views[view_name] = SplitView(name, part, ranges, source)
        hidden.add(name)
