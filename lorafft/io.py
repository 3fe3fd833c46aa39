"""Reading checkpoints: the only code that knows about files, shards and dtypes.

:func:`open_checkpoint` turns a Hugging Face checkpoint directory, a single ``.safetensors``/``.bin``/``.pt``/``.pth``
file, a shard index ``.json`` or an in-memory ``{name: tensor}`` dict into a :class:`Checkpoint`, which hands out one
tensor at a time (CPU, stored dtype). :func:`open_adapter` does the same for a PEFT adapter directory.

Every file is untrusted: each problem with one is raised as :class:`~lorafft.errors.InputError` naming that file.
Safetensors headers are validated here (:func:`_read_safetensors_header`) before the safetensors library sees the
file, and ``.bin`` files are only ever unpickled with ``weights_only=True``.

A checkpoint opened with :func:`open_checkpoint` is also *viewed* the way the analysis needs it, so that nothing
after this module knows about quantization or stacked experts:

- **FP8 weights** are dequantized on the fly (:func:`dequantize`): ``get`` of a float8 ``<m>.weight`` stored with
  ``<m>.weight_scale`` (compressed-tensors: per tensor ``[]``/``[1]``, per output channel ``[out, 1]``/``[out]``,
  or per 128×128 block) or ``<m>.weight_scale_inv`` (DeepSeek-V3: per 128×128 block, ``[ceil(out/128),
  ceil(in/128)]``, multiplied like the other scales: DeepSeek's ``weight_dequant`` computes ``x * s``) returns the
  fp32 product; the scale tensors are left out of ``names()``. A float8 weight without a scale is returned as
  stored.
- **Stacked expert tensors** (a 3-D floating tensor ``<...>.experts.<param>``, ``[E, ·, ·]``) are shown as E
  matrices ``<...>.experts.<param>.<e>`` in the torch ``[out, in]`` orientation; the stacked name is left out of
  ``names()``. Two layouts exist: ``[E, out, in]`` (vLLM's fused MoE, transformers' fused ``*Experts`` modules:
  ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) and ``[E, in, out]`` (GPT-OSS and Llama 4 checkpoints:
  ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, applied as ``x @ W[e]``). Shapes alone tell them apart only
  for a fused ``gate_up_proj`` beside its ``down_proj`` (``gate_up`` has twice the intermediate size I on its
  output side): ``expert_layout="auto"`` uses that test and assumes ``[E, out, in]`` otherwise; ``"out_in"`` or
  ``"in_out"`` says it outright. Per-expert 2-D tensors (``experts.3.w1.weight``) need nothing: they are ordinary.

``Checkpoint.stored_names()`` lists the tensors as the files hold them, for code that rewrites files.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from lorafft.errors import InputError

STATE_DICT = "<state dict>"  # the path named in messages about an in-memory state dict

# Files looked for in a checkpoint directory, in this order.
_LAYOUT = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_FINITE_CHECK_CHUNK = 1 << 24  # elements per torch.isfinite call, bounding its temporary bool tensor
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_BLOCK = 128  # DeepSeek-V3's (and compressed-tensors' block strategy's) quantization block: 128×128
_SCALE_SUFFIXES = ("_scale", "_scale_inv")  # <m>.weight_scale (compressed-tensors), <m>.weight_scale_inv (DeepSeek)
_STACKED_EXPERTS = re.compile(r"(^|\.)\w*experts\.[^.]+$")  # <...>.experts.<param>: a module's direct parameter

_Meta = tuple[torch.dtype, tuple[int, ...]]  # (stored dtype, shape) of one tensor


# ---------------------------------------------------------------------------------------------------------------
# Validation of untrusted input


def _read_safetensors_header(path: str) -> dict[str, _Meta]:
    """Validate a safetensors file's header against the file and return ``{name: (dtype, shape)}``.

    Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data bytes. Each tensor's
    ``data_offsets`` are relative to the data start; together they must tile the data exactly, without overlap.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise InputError(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(f.read(8), "little")
            if n > _MAX_HEADER_BYTES:
                raise InputError(path, f"truncated or corrupt header: header length {n} exceeds the 100 MB limit")
            if 8 + n > size:
                raise InputError(path, f"truncated or corrupt header: header length {n} "
                                       f"but only {size - 8} bytes follow")
            raw = f.read(n)
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"header is not valid UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise InputError(path, f"header is not a JSON object (got {type(header).__name__})")

    data_size = size - 8 - n
    metas: dict[str, _Meta] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise InputError(path, "__metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict):
            raise InputError(path, f"tensor '{name}': header entry is not a JSON object")
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
        if missing:
            raise InputError(path, f"tensor '{name}': header entry has no {', '.join(missing)}")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
            raise InputError(path, f"tensor '{name}': unknown dtype {dtype_name!r}")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise InputError(path, f"tensor '{name}': shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise InputError(path, f"tensor '{name}': data_offsets must be [begin, end] integers with "
                                   f"0 <= begin <= end, got {offsets!r}")
        dtype = _SAFETENSORS_DTYPES[dtype_name]
        begin, end = offsets
        needed = math.prod(shape) * dtype.itemsize
        if end - begin != needed:
            raise InputError(path, f"tensor '{name}': {end - begin} bytes for {dtype_name} {shape} (needs {needed})")
        if end > data_size:
            raise InputError(path, f"truncated: tensor '{name}' ends at byte {end} "
                                   f"but the file has {data_size} data bytes")
        metas[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))

    covered, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise InputError(path, f"tensors '{previous}' and '{name}' overlap (data bytes {begin}..{covered})")
        if begin > covered:
            raise InputError(path, f"data bytes {covered}..{begin} (before tensor '{name}') belong to no tensor")
        covered, previous = end, name
    if covered != data_size:
        raise InputError(path, f"the last {data_size - covered} data bytes belong to no tensor")
    return metas


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _load_torch(path: str) -> dict[str, torch.Tensor]:
    """Load a ``torch.save`` file (zip format memory-mapped, legacy format read whole) as ``{name: tensor}``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # corrupt or hostile files make torch raise many different types
        raise InputError(path, f"cannot read PyTorch checkpoint: {_short_reason(e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return _check_tensors(path, obj)


def _short_reason(e: Exception) -> str:
    """The first sentence of torch's (often multi-paragraph) error message."""
    text, prefix = str(e), ""
    if "WeightsUnpickler error:" in text:
        text, prefix = text.split("WeightsUnpickler error:", 1)[1], "refused by the weights_only unpickler: "
    first = re.split(r"\.\s|\n", text.strip(), maxsplit=1)[0]
    return prefix + (first or type(e).__name__)[:200]


def _check_tensors(path: str, obj) -> dict[str, torch.Tensor]:
    """``obj`` itself if it maps strings to tensors, else InputError."""
    if not isinstance(obj, Mapping):
        raise InputError(path, f"expected a dict of tensors, got {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str):
            raise InputError(path, f"tensor name {name!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise InputError(path, f"'{name}' is not a tensor (got {type(value).__name__})")
    return dict(obj)


def read_json_object(path) -> dict:
    """Parse a JSON file that must hold an object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise InputError(path, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _all_finite(t: torch.Tensor) -> bool:
    """False if a floating-point tensor holds NaN or Inf; checked in chunks to bound temporary memory."""
    if not t.is_floating_point():
        return True
    for chunk in t.reshape(-1).split(_FINITE_CHECK_CHUNK):
        if chunk.element_size() == 1:  # fp8 has no isfinite kernel; both formats fit fp16 exactly
            chunk = chunk.to(torch.float16)
        if not torch.isfinite(chunk).all():
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Shards: one file's tensors. Opening a shard is cheap; its data is mapped on first use and dropped by release().


class _SafetensorsShard:
    """A .safetensors file: header validated when constructed, data mapped by safe_open on the first tensor()."""

    def __init__(self, path: str):
        self.path = path
        self._metas = _read_safetensors_header(path)
        self._handle = None

    def names(self) -> Collection[str]:
        return self._metas.keys()

    def meta(self, name: str) -> _Meta:
        return self._metas[name]

    def tensor(self, name: str) -> torch.Tensor:
        try:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt")
            return self._handle.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise InputError(self.path, f"cannot read safetensors data: {e}") from e

    def expert(self, name: str, index: int) -> torch.Tensor:
        """``tensor(name)[index]``, reading only that slice's bytes."""
        try:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt")
            return self._handle.get_slice(name)[index]
        except (OSError, SafetensorError) as e:
            raise InputError(self.path, f"cannot read safetensors data: {e}") from e

    def release(self) -> None:
        self._handle = None  # safe_open unmaps when dropped


class _TensorsShard:
    """A ``torch.save`` file or an in-memory state dict: ``load()`` gives ``{name: tensor}``, called on first use."""

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

    def meta(self, name: str) -> _Meta:
        t = self._loaded()[name]
        return t.dtype, tuple(t.shape)

    def tensor(self, name: str) -> torch.Tensor:
        return self._loaded()[name].detach().cpu()

    def expert(self, name: str, index: int) -> torch.Tensor:
        return self._loaded()[name][index].detach().cpu()

    def release(self) -> None:
        self._tensors = None


_Shard = _SafetensorsShard | _TensorsShard


def _open_shard(file: str) -> _Shard:
    if file.endswith(".safetensors"):
        return _SafetensorsShard(file)
    if file.endswith(_TORCH_SUFFIXES):
        return _TensorsShard(file, lambda: _load_torch(file))
    raise InputError(file, "unsupported file type (expected .safetensors, .bin, .pt, .pth or an index .json)")


# ---------------------------------------------------------------------------------------------------------------
# Views: what a checkpoint looks like to the analysis (FP8 dequantized, stacked experts split)

Fp8Scheme = Literal["tensor", "channel", "block"]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, *, block: int = FP8_BLOCK) -> torch.Tensor:
    """A quantized ``weight [out, in]`` times its ``scale``, in fp32 (a new tensor; the inputs are not changed).

    ``scheme``: ``"tensor"`` (``scale`` has one element: shape ``[]`` or ``[1]``), ``"channel"`` (one per output
    row: ``[out, 1]`` or ``[out]``) or ``"block"`` (one per ``block × block`` tile, row-major:
    ``[ceil(out/block), ceil(in/block)]``; the last row and column of tiles may be partial). Every element is
    ``float32(weight) * float32(scale)`` rounded once, as DeepSeek-V3's ``weight_dequant`` (``y = x * s``) and
    compressed-tensors compute it. ValueError if ``scale``'s shape does not fit ``scheme`` and ``weight``.
    """
    if weight.ndim != 2:
        raise ValueError(f"dequantize needs a 2-D weight, got shape {list(weight.shape)}")
    expected = _scale_shapes(tuple(weight.shape), scheme, block)
    if tuple(scale.shape) not in expected:
        raise ValueError(f"a {scheme} scale of weight {list(weight.shape)} has shape "
                         f"{' or '.join(str(list(e)) for e in expected)}, got {list(scale.shape)}")
    out = weight.to(torch.float32, copy=True)
    scale = scale.to(torch.float32)
    if scheme == "tensor":
        out.mul_(scale.reshape(()))
    elif scheme == "channel":
        out.mul_(scale.reshape(-1, 1))
    else:  # one row of tiles at a time: the scales expanded along the columns are [in], not [out, in]
        columns = scale.repeat_interleave(block, dim=1)[:, : out.shape[1]]
        for row, start in enumerate(range(0, out.shape[0], block)):
            out[start : start + block].mul_(columns[row])
    return out


def _scale_shapes(shape: tuple[int, int], scheme: str, block: int = FP8_BLOCK) -> list[tuple[int, ...]]:
    """The scale shapes ``scheme`` allows for a weight of ``shape``."""
    rows, cols = shape
    if scheme == "tensor":
        return [(), (1,)]
    if scheme == "channel":
        return [(rows, 1), (rows,)]
    if scheme == "block":
        return [(-(-rows // block), -(-cols // block))]
    raise ValueError(f"unknown scale scheme {scheme!r} (expected 'tensor', 'channel' or 'block')")


def _fp8_scheme(shape: tuple[int, ...], scale_shape: tuple[int, ...], suffix: str) -> Fp8Scheme | None:
    """The scheme a scale named ``<weight><suffix>`` of ``scale_shape`` applies to a weight of ``shape``, or None.

    ``_scale`` (compressed-tensors): per tensor, per channel or per 128×128 block (its ``block`` strategy);
    ``_scale_inv`` (DeepSeek-V3): per 128×128 block only. The per-channel and block shapes coincide only for a
    weight of one row or a single block, where they mean the same product.
    """
    if len(shape) != 2:
        return None
    schemes = ("block",) if suffix == "_scale_inv" else ("tensor", "channel", "block")
    return next((scheme for scheme in schemes if scale_shape in _scale_shapes(shape, scheme)), None)


@dataclass(frozen=True)
class _Fp8View:
    """A float8 ``weight`` times its ``scale`` tensor, read as fp32."""

    weight: str
    scale: str
    scheme: Fp8Scheme


@dataclass(frozen=True)
class _ExpertView:
    """Expert ``index`` of a stacked ``[E, ·, ·]`` tensor, ``transposed`` when stored ``[E, in, out]``."""

    stacked: str
    index: int
    transposed: bool


ExpertLayout = Literal["auto", "out_in", "in_out"]


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


# ---------------------------------------------------------------------------------------------------------------
# Public API


class Checkpoint:
    """Named tensors of one checkpoint, read one at a time on the CPU.

    Built by :func:`open_checkpoint`. Holds a map tensor name -> shard; a shard's data is mapped when one of its
    tensors is first touched and stays mapped until :meth:`release` or :meth:`close`.

    With ``views`` (what :func:`open_checkpoint` does), float8 weights with a scale read as fp32 and stacked expert
    tensors as one matrix per expert (module docstring); ``names()`` lists what the analysis should see and
    ``stored_names()`` what the files hold. ``get`` accepts both kinds of names.
    """

    def __init__(self, path: str, shard_of: dict[str, _Shard], index: str | None = None, *, views: bool = False,
                 expert_layout: ExpertLayout = "auto"):
        if expert_layout not in ("auto", "out_in", "in_out"):
            raise ValueError(f"expert_layout must be 'auto', 'out_in' or 'in_out', got {expert_layout!r}")
        self.path = path  # what messages name: the directory or file given, or "<state dict>"
        self._shard_of = shard_of
        self._shards = {shard.path: shard for shard in shard_of.values()}
        self._index = index  # the index file the name -> shard map came from, if any
        self._use_views = views
        self._expert_layout = expert_layout
        self._views_found: tuple[dict[str, _Fp8View | _ExpertView], set[str]] | None = None

    def names(self) -> list[str]:
        """All tensor names the analysis sees, sorted: stored names, less FP8 scales and stacked expert tensors,
        plus one ``<stacked>.<e>`` per expert."""
        views, hidden = self._views()
        return sorted({name for name in self._shard_of if name not in hidden} | views.keys())

    def stored_names(self) -> list[str]:
        """All tensor names as stored in the files, sorted."""
        return sorted(self._shard_of)

    def is_view(self, name: str) -> bool:
        """True when ``get(name)`` is not a stored tensor as stored: a dequantized FP8 weight or one expert of a
        stacked tensor (code that rewrites files must not write such a tensor back under ``name``)."""
        return name in self._views()[0]

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name`` (for messages); touches no data."""
        view = self._views()[0].get(name)
        if view is not None:
            name = view.weight if isinstance(view, _Fp8View) else view.stacked
        return self._shard(name, check=False).path

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (as ``get`` returns it), without reading its data."""
        view = self._views()[0].get(name)
        if isinstance(view, _Fp8View):
            name = view.weight
        elif isinstance(view, _ExpertView):
            rows, cols = self._meta(view.stacked)[1][1:]
            return (cols, rows) if view.transposed else (rows, cols)
        return self._meta(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of tensor ``name`` as ``get`` returns it (the stored one; fp32 for a dequantized FP8 weight),
        without reading its data."""
        view = self._views()[0].get(name)
        if isinstance(view, _Fp8View):
            return torch.float32
        return self._meta(view.stacked if isinstance(view, _ExpertView) else name)[0]

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``: CPU, stored dtype (fp32 for a dequantized FP8 weight; one expert's ``[out, in]``
        matrix for ``<stacked>.<e>``). InputError if a floating-point result holds NaN or Inf."""
        view = self._views()[0].get(name)
        if isinstance(view, _Fp8View):
            shard = self._shard(view.weight)
            tensor = dequantize(shard.tensor(view.weight), self._shard(view.scale).tensor(view.scale), view.scheme)
        elif isinstance(view, _ExpertView):
            shard = self._shard(view.stacked)
            tensor = shard.expert(view.stacked, view.index)
            if view.transposed:
                tensor = tensor.T.contiguous()
        else:
            shard = self._shard(name)
            tensor = shard.tensor(name)
        if not _all_finite(tensor):
            raise InputError(shard.path, f"tensor '{name}' contains NaN or Inf")
        return tensor

    def release(self, file: str) -> None:
        """Unmap one shard's data (it is mapped again if one of its tensors is touched later)."""
        self._shards[file].release()

    def close(self) -> None:
        """Unmap every shard."""
        for shard in self._shards.values():
            shard.release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _meta(self, name: str) -> _Meta:
        return self._shard(name).meta(name)

    def _shard(self, name: str, check: bool = True) -> _Shard:
        """The shard holding ``name``; with ``check``, InputError if an index listed it but the shard lacks it."""
        try:
            shard = self._shard_of[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{name}'") from None
        if check and name not in shard.names():
            raise _missing_from_shard(shard, name, self._index)
        return shard

    def _views(self) -> tuple[dict[str, _Fp8View | _ExpertView], set[str]]:
        """``({name: view}, stored names hidden from names())``, found on first use from names, dtypes and shapes
        (headers only for safetensors). InputError for a float8 weight whose scale does not fit it."""
        if self._views_found is None:
            views: dict[str, _Fp8View | _ExpertView] = {}
            hidden: set[str] = set()
            if self._use_views:
                self._find_fp8(views, hidden)
                self._find_experts(views, hidden)
            self._views_found = views, hidden
        return self._views_found

    def _find_fp8(self, views: dict, hidden: set[str]) -> None:
        for weight in self._shard_of:
            scales = [(weight + suffix, suffix) for suffix in _SCALE_SUFFIXES if weight + suffix in self._shard_of]
            if not scales or self._meta(weight)[0] not in FP8_DTYPES:
                continue  # a float8 tensor without a scale is returned as stored; other dtypes are never scaled
            if len(scales) > 1:
                raise InputError(self._shard(weight).path, f"float8 tensor '{weight}' has both a '_scale' and a "
                                                           f"'_scale_inv' tensor: which one applies is ambiguous")
            (scale, suffix), = scales
            shape, (scale_dtype, scale_shape) = self._meta(weight)[1], self._meta(scale)
            scheme = _fp8_scheme(shape, scale_shape, suffix)
            if scheme is None or not scale_dtype.is_floating_point:
                allowed = ("[ceil(out/128), ceil(in/128)] (per 128x128 block)" if suffix == "_scale_inv" else
                           "[] or [1] (per tensor), [out, 1] or [out] (per channel), "
                           "[ceil(out/128), ceil(in/128)] (per 128x128 block)")
                what = (f"shape {list(scale_shape)}" if scheme is None else f"dtype {scale_dtype}")
                raise InputError(self._shard(scale).path, f"scale tensor '{scale}' ({what}) does not fit its float8 "
                                                      f"weight '{weight}' {list(shape)}: expected a floating-point "
                                                      f"scale of shape {allowed}")
            views[weight] = _Fp8View(weight, scale, scheme)
            hidden.add(scale)

    def _find_experts(self, views: dict, hidden: set[str]) -> None:
        stacked = {}
        for name in self._shard_of:
            if _STACKED_EXPERTS.search(name) and name not in views:
                dtype, shape = self._meta(name)
                if len(shape) == 3 and dtype.is_floating_point:
                    stacked[name] = shape
        for name, transposed in _stacked_transposed(stacked, self._expert_layout).items():
            hidden.add(name)
            for index in range(stacked[name][0]):
                views[f"{name}.{index}"] = _ExpertView(name, index, transposed)


def _missing_from_shard(shard: _Shard, name: str, index: str) -> InputError:
    return InputError(shard.path, f"tensor '{name}' listed in {os.path.basename(index)} is not in this shard")


def open_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor], *, views: bool = True,
                    expert_layout: ExpertLayout = "auto") -> Checkpoint:
    """Open a checkpoint directory, a single weights file, a shard index ``.json``, or a ``{name: tensor}`` dict.

    A directory is searched for ``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json`` and ``pytorch_model.bin``, in that order; the first found is used.
    ``views``: dequantize FP8 weights and split stacked expert tensors (module docstring); ``expert_layout``:
    how stacked experts are stored (``"auto"``, ``"out_in"`` for ``[E, out, in]``, ``"in_out"`` for ``[E, in, out]``).
    """
    options = {"views": views, "expert_layout": expert_layout}
    if isinstance(source, Mapping):
        tensors = _check_tensors(STATE_DICT, source)
        shard = _TensorsShard(STATE_DICT, lambda: tensors)
        return Checkpoint(STATE_DICT, dict.fromkeys(tensors, shard), **options)
    path = _existing(source)
    if not os.path.isdir(path):
        return _open_file(path, path, **options)
    for candidate in _LAYOUT:
        file = os.path.join(path, candidate)
        if os.path.isfile(file):
            return _open_file(path, file, **options)
    raise InputError(path, "no checkpoint found "
                           "(looked for model.safetensors[.index.json], pytorch_model.bin[.index.json])")


@dataclass
class Adapter:
    """A PEFT adapter directory: its parsed ``adapter_config.json`` (uninterpreted) and its tensors."""

    path: str
    config: dict
    tensors: Checkpoint


def is_adapter(source) -> bool:
    """True if ``source`` is a directory containing ``adapter_config.json``."""
    return not isinstance(source, Mapping) and os.path.isfile(os.path.join(os.fspath(source), _ADAPTER_CONFIG))


def open_adapter(source: str | os.PathLike) -> Adapter:
    """Open a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``)."""
    path = _existing(source)
    if not is_adapter(path):
        raise InputError(path, f"not a PEFT adapter directory (no {_ADAPTER_CONFIG})")
    config = read_json_object(os.path.join(path, _ADAPTER_CONFIG))
    for candidate in _ADAPTER_WEIGHTS:
        file = os.path.join(path, candidate)
        if os.path.isfile(file):
            return Adapter(path, config, _open_file(path, file))
    raise InputError(path, "no adapter_model.safetensors or adapter_model.bin")


def _existing(source: str | os.PathLike) -> str:
    path = os.fspath(source)
    if not os.path.exists(path):
        raise InputError(path, "no such file or directory")
    return path


def _open_file(path: str, file: str, **options) -> Checkpoint:
    """A Checkpoint (named ``path``) from one weights file or a shard index ``.json``; ``options`` go to it."""
    if file.endswith(".json"):
        return _open_index(path, file, **options)
    shard = _open_shard(file)
    return Checkpoint(path, dict.fromkeys(shard.names(), shard), **options)


def _open_index(path: str, index: str, **options) -> Checkpoint:
    """A Checkpoint from a shard index (``{"weight_map": {tensor name: shard file name}}``, shards beside it)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(index, "no 'weight_map' object in the index")
    shards: dict[str, _Shard] = {}
    for name, shard_name in weight_map.items():
        if not isinstance(shard_name, str) or os.path.basename(shard_name) != shard_name:
            raise InputError(index, f"weight_map entry for '{name}' is not a file name: {shard_name!r}")
        if shard_name not in shards:
            file = os.path.join(os.path.dirname(index), shard_name)
            if not os.path.isfile(file):
                raise InputError(index, f"shard '{shard_name}' named in the index does not exist")
            shards[shard_name] = _open_shard(file)
    for name, shard_name in weight_map.items():  # safetensors headers are already read: check them now
        shard = shards[shard_name]
        if isinstance(shard, _SafetensorsShard) and name not in shard.names():
            raise _missing_from_shard(shard, name, index)
    return Checkpoint(path, {name: shards[shard_name] for name, shard_name in weight_map.items()}, index=index,
                      **options)
