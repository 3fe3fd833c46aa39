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
- **Fused projections**, only when asked (``open_checkpoint(..., split_fused=True)``, ``lorafft scan
  --split-fused``; by default they are analysed whole): a 2-D ``<m>.qkv_proj.weight`` or ``<m>.query_key_value.weight``
  is shown as ``<m>.qkv_proj.q.weight``, ``.k.weight``, ``.v.weight`` (``<m>.query_key_value.q.weight`` ...), a 2-D
  ``<m>.gate_up_proj.weight`` as ``<m>.gate_up_proj.gate.weight`` and ``.up.weight``, each the rows that projection
  applies, in head order; the fused name is left out of ``names()``. The layout comes from the checkpoint
  directory's ``config.json`` (its ``model_type`` and sizes), as transformers' modeling code reads the fused output:

  ======================  ===============  =================================================================
  model_type              tensor           rows (h = num_attention_heads, d = head_dim)
  ======================  ===============  =================================================================
  ``phi3``                qkv_proj         ``[q; k; v]``: h·d, kv·d, kv·d (kv = num_key_value_heads, default
                                           h; d = head_dim, default hidden_size // h)
  ``phi3``                gate_up_proj     ``[gate; up]``: intermediate_size each (``chunk(2)``, gate first)
  ``gpt_neox``            query_key_value  per head ``[h, 3, d]`` (q, k, v of head 0, then of head 1, ...);
                                           d = hidden_size // num_attention_heads
  ``bloom``               query_key_value  per head ``[h, 3, d]`` as GPT-NeoX; h = ``n_head``,
                                           d = hidden_size (or ``n_embed``) // h
  ``falcon``              query_key_value  per key/value group ``[g, h/g + 2, d]``: the group's h/g query heads,
                                           then its k, then its v; g = num_kv_heads (default h) with
                                           ``new_decoder_architecture``, else 1 with ``multi_query`` (default
                                           true), else h (that is ``[h, 3, d]``); d = hidden_size // h
  ======================  ===============  =================================================================

  Sources: transformers' ``Phi3Attention``/``Phi3MLP``, ``GPTNeoXAttention``, ``BloomAttention._reshape``,
  ``FalconAttention._split_heads`` and their configs. Anything else (another model_type, Falcon's pre-transformers
  ``RefinedWeb``/``RefinedWebModel`` configs, a tensor whose rows do not add up) is an InputError naming the config
  file, never a guess. Fused biases are left as stored (biases are never analysed). A PEFT adapter on a fused module
  is merged onto the whole fused weight: splitting applies to full checkpoints only.

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

from lorafft.arrays import as_tensor
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
CONFIG = "config.json"  # a Hugging Face checkpoint directory's model config (read for split_fused)
_FUSED_WEIGHT = re.compile(r"(^|\.)(?P<kind>qkv_proj|gate_up_proj|query_key_value)\.weight$")
FUSED_MODEL_TYPES = {  # fused 2-D weight -> the model_types whose row layout split_fused knows (module docstring)
    "qkv_proj": ("phi3",),
    "gate_up_proj": ("phi3",),
    "query_key_value": ("bloom", "falcon", "gpt_neox"),
}

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
    """``obj`` as a dict of tensors if it maps strings to tensors (or to DLPack arrays such as CuPy's, wrapped
    without a copy: :func:`lorafft.arrays.as_tensor`), else InputError."""
    if not isinstance(obj, Mapping):
        raise InputError(path, f"expected a dict of tensors, got {type(obj).__name__}")
    tensors = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise InputError(path, f"tensor name {name!r} is not a string")
        try:
            tensors[name] = as_tensor(value)
        except TypeError:
            raise InputError(path, f"'{name}' is not a tensor (got {type(value).__name__})") from None
    return tensors


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

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """``tensor(name)[start:stop]``, reading only those rows' bytes."""
        try:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt")
            return self._handle.get_slice(name)[start:stop]
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

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._loaded()[name][start:stop].detach().cpu()

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


@dataclass(frozen=True)
class _SplitView:
    """Part ``part`` of a fused 2-D weight ``fused``: its rows ``fused[a:b]`` for each ``(a, b)`` in ``rows``, in
    order (one range for ``[q; k; v]`` blocks, one per head or group for interleaved layouts)."""

    fused: str
    part: str
    rows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class FusedConfig:
    """A checkpoint directory's ``config.json`` (``path``, for messages) and its parsed ``config``: how fused
    projections split (module docstring)."""

    path: str
    config: dict

    def layout(self, kind: str, name: str) -> dict[str, tuple[tuple[int, int], ...]]:
        """``{part: row ranges}`` of a fused ``kind`` tensor (``qkv_proj``, ``gate_up_proj``, ``query_key_value``)
        under this config, parts in stored order. ``name`` (one such tensor) is only for messages. InputError naming
        the config file for an unknown model_type or a missing or malformed size."""
        model_type = self.config.get("model_type")
        what = f"cannot split the fused '{name}'"
        if model_type is None:
            raise InputError(self.path, f"{what}: this config has no 'model_type', needed to know the layout of "
                                        f"{kind} (--split-fused)")
        supported = FUSED_MODEL_TYPES[kind]
        if model_type not in supported:
            raise InputError(self.path, f"{what}: lorafft knows the row layout of {kind} only for model_type "
                                        f"{', '.join(supported)}, not {model_type!r}; scan without --split-fused to "
                                        f"analyse it whole")

        def get(*keys: str, default: int | None = None) -> int:
            return self._int(keys, default, f"{what} ({model_type})")

        if kind == "gate_up_proj":  # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1)
            size = get("intermediate_size")
            return _contiguous({"gate": size, "up": size})
        if model_type == "phi3":  # Phi3Attention: [q; k; v] by num_attention_heads, num_key_value_heads
            heads = get("num_attention_heads")
            kv_heads = get("num_key_value_heads", default=heads)
            head_dim = get("hidden_size") // heads if self.config.get("head_dim") is None else get("head_dim")
            return _contiguous({"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim})
        if model_type == "gpt_neox":  # qkv.view(..., heads, 3 * head_size): q, k, v per head
            heads = get("num_attention_heads")
            return _grouped(heads, 1, get("hidden_size") // heads)
        if model_type == "bloom":  # fused_qkv.view(..., num_heads, 3, head_dim)
            heads = get("n_head", "num_attention_heads")
            return _grouped(heads, 1, get("hidden_size", "n_embed") // heads)
        # falcon: FalconAttention._split_heads
        heads = get("num_attention_heads", "n_head")
        head_dim = get("hidden_size", "n_embed") // heads
        if self._bool("new_decoder_architecture", False, f"{what} ({model_type})"):
            groups = get("num_kv_heads", "n_head_kv", default=heads)
        else:
            groups = 1 if self._bool("multi_query", True, f"{what} ({model_type})") else heads
        if heads % groups:
            raise InputError(self.path, f"{what}: num_attention_heads {heads} is not a multiple of num_kv_heads "
                                        f"{groups}")
        return _grouped(groups, heads // groups, head_dim)

    def _int(self, keys: tuple[str, ...], default: int | None, what: str) -> int:
        """The first of ``keys`` present (not null) in the config, a positive integer; else ``default``."""
        for key in keys:
            value = self.config.get(key)
            if value is not None:
                if not (_is_int(value) and value > 0):
                    raise InputError(self.path, f"{what}: '{key}' must be a positive integer, got {value!r}")
                return value
        if default is None:
            raise InputError(self.path, f"{what}: this config has no {' or '.join(repr(k) for k in keys)} "
                                        f"(needed by --split-fused)")
        return default

    def _bool(self, key: str, default: bool, what: str) -> bool:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InputError(self.path, f"{what}: '{key}' must be true or false, got {value!r}")
        return value


def _contiguous(sizes: dict[str, int]) -> dict[str, tuple[tuple[int, int], ...]]:
    """Row ranges of parts stored one after the other, ``[a; b; ...]``."""
    layout, start = {}, 0
    for part, size in sizes.items():
        layout[part] = ((start, start + size),)
        start += size
    return layout


def _grouped(groups: int, queries: int, head_dim: int) -> dict[str, tuple[tuple[int, int], ...]]:
    """Row ranges of q, k, v stored ``[groups, queries + 2, head_dim]``: per group its ``queries`` query heads,
    one key head and one value head (adjacent ranges merged)."""
    ranges: dict[str, list[tuple[int, int]]] = {"q": [], "k": [], "v": []}
    stride = (queries + 2) * head_dim
    for group in range(groups):
        start = group * stride
        ranges["q"].append((start, start + queries * head_dim))
        ranges["k"].append((start + queries * head_dim, start + (queries + 1) * head_dim))
        ranges["v"].append((start + (queries + 1) * head_dim, start + stride))
    merged = {}
    for part, spans in ranges.items():
        out = [spans[0]]
        for begin, end in spans[1:]:
            if begin == out[-1][1]:
                out[-1] = (out[-1][0], end)
            else:
                out.append((begin, end))
        merged[part] = tuple(out)
    return merged


def _rows(tensor: torch.Tensor, rows: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """``tensor``'s rows ``rows`` as a new tensor (a copy: it does not keep ``tensor`` alive)."""
    return torch.cat([tensor[begin:end] for begin, end in rows]) if len(rows) > 1 else tensor[slice(*rows[0])].clone()


def split_name(fused: str, part: str) -> str:
    """The view name of part ``part`` of the fused weight ``fused``: ``<m>.qkv_proj.weight`` ->
    ``<m>.qkv_proj.q.weight``."""
    return f"{fused.removesuffix('.weight')}.{part}.weight"


_View = _Fp8View | _ExpertView | _SplitView


# ---------------------------------------------------------------------------------------------------------------
# Public API


class Checkpoint:
    """Named tensors of one checkpoint, read one at a time on the CPU.

    Built by :func:`open_checkpoint`. Holds a map tensor name -> shard; a shard's data is mapped when one of its
    tensors is first touched and stays mapped until :meth:`release` or :meth:`close`.

    With ``views`` (what :func:`open_checkpoint` does), float8 weights with a scale read as fp32 and stacked expert
    tensors as one matrix per expert, and with a ``fused_config`` fused projections as their parts (module
    docstring); ``names()`` lists what the analysis should see and ``stored_names()`` what the files hold. ``get``
    accepts both kinds of names.
    """

    def __init__(self, path: str, shard_of: dict[str, _Shard], index: str | None = None, *, views: bool = False,
                 expert_layout: ExpertLayout = "auto", fused_config: FusedConfig | None = None):
        if expert_layout not in ("auto", "out_in", "in_out"):
            raise ValueError(f"expert_layout must be 'auto', 'out_in' or 'in_out', got {expert_layout!r}")
        if fused_config is not None and not views:
            raise ValueError("splitting fused projections is a view: it needs views=True")
        self.path = path  # what messages name: the directory or file given, or "<state dict>"
        self._shard_of = shard_of
        self._shards = {shard.path: shard for shard in shard_of.values()}
        self._index = index  # the index file the name -> shard map came from, if any
        self._use_views = views
        self._expert_layout = expert_layout
        self._fused_config = fused_config
        self._views_found: tuple[dict[str, _View], set[str]] | None = None

    def names(self) -> list[str]:
        """All tensor names the analysis sees, sorted: stored names, less FP8 scales, stacked expert tensors and
        split fused weights, plus one ``<stacked>.<e>`` per expert and one ``<fused>.<part>.weight`` per part."""
        views, hidden = self._views()
        return sorted((self._shard_of.keys() | views.keys()) - hidden)

    def stored_names(self) -> list[str]:
        """All tensor names as stored in the files, sorted."""
        return sorted(self._shard_of)

    def is_view(self, name: str) -> bool:
        """True when ``get(name)`` is not a stored tensor as stored: a dequantized FP8 weight, one expert of a
        stacked tensor or one part of a fused weight (code that rewrites files must not write such a tensor back
        under ``name``)."""
        return name in self._views()[0]

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name`` (for messages); touches no data."""
        views = self._views()[0]
        view = views.get(name)
        if isinstance(view, _SplitView):
            name, view = view.fused, views.get(view.fused)
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
        elif isinstance(view, _SplitView):
            return sum(end - begin for begin, end in view.rows), self._meta(view.fused)[1][1]
        return self._meta(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of tensor ``name`` as ``get`` returns it (the stored one; fp32 for a dequantized FP8 weight or a
        part of one), without reading its data."""
        views = self._views()[0]
        view = views.get(name)
        if isinstance(view, _SplitView):
            name, view = view.fused, views.get(view.fused)
        if isinstance(view, _Fp8View):
            return torch.float32
        return self._meta(view.stacked if isinstance(view, _ExpertView) else name)[0]

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``: CPU, stored dtype (fp32 for a dequantized FP8 weight; one expert's ``[out, in]``
        matrix for ``<stacked>.<e>``; a copy of the part's rows for ``<fused>.<part>.weight``). InputError if a
        floating-point result holds NaN or Inf."""
        views = self._views()[0]
        view = views.get(name)
        if isinstance(view, _Fp8View):
            shard, tensor = self._dequantized(view)
        elif isinstance(view, _SplitView):
            source = views.get(view.fused)
            if isinstance(source, _Fp8View):  # dequantize the whole (block scales may straddle the parts)
                shard, whole = self._dequantized(source)
                tensor = _rows(whole, view.rows)
                del whole
            else:
                shard = self._shard(view.fused)
                tensor = (shard.rows(view.fused, *view.rows[0]) if len(view.rows) == 1 else
                          _rows(shard.tensor(view.fused), view.rows))
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

    def _dequantized(self, view: _Fp8View) -> tuple[_Shard, torch.Tensor]:
        shard = self._shard(view.weight)
        return shard, dequantize(shard.tensor(view.weight), self._shard(view.scale).tensor(view.scale), view.scheme)

    def _shard(self, name: str, check: bool = True) -> _Shard:
        """The shard holding ``name``; with ``check``, InputError if an index listed it but the shard lacks it."""
        try:
            shard = self._shard_of[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{name}'") from None
        if check and name not in shard.names():
            raise _missing_from_shard(shard, name, self._index)
        return shard

    def _views(self) -> tuple[dict[str, _View], set[str]]:
        """``({name: view}, names hidden from names())``, found on first use from names, dtypes and shapes
        (headers only for safetensors) and the fused config. InputError for a float8 weight whose scale does not
        fit it, or a fused weight the config cannot split."""
        if self._views_found is None:
            views: dict[str, _View] = {}
            hidden: set[str] = set()
            if self._use_views:
                self._find_fp8(views, hidden)
                self._find_experts(views, hidden)
                if self._fused_config is not None:
                    self._find_fused(views, hidden, self._fused_config)
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

    def _find_fused(self, views: dict, hidden: set[str], fused: FusedConfig) -> None:
        layouts: dict[str, dict[str, tuple[tuple[int, int], ...]]] = {}  # kind -> layout, one per checkpoint
        for name in sorted(self._shard_of):
            match = _FUSED_WEIGHT.search(name)
            if match is None:
                continue
            dtype, shape = self._meta(name)
            if len(shape) != 2 or not dtype.is_floating_point:
                continue
            kind = match["kind"]
            if kind not in layouts:
                layouts[kind] = fused.layout(kind, name)
            layout = layouts[kind]
            total = sum(end - begin for ranges in layout.values() for begin, end in ranges)
            if shape[0] != total:
                sizes = " + ".join(f"{part} {sum(e - b for b, e in ranges)}" for part, ranges in layout.items())
                raise InputError(fused.path, f"cannot split the fused '{name}' ({self._shard(name).path}): it has "
                                             f"{shape[0]} rows but this config ({fused.config['model_type']}) gives "
                                             f"{sizes} = {total}")
            for part, ranges in layout.items():
                view_name = split_name(name, part)
                if view_name in self._shard_of or view_name in views:
                    raise InputError(self._shard(name).path, f"cannot split the fused '{name}': the checkpoint "
                                                             f"already has a tensor named '{view_name}'")
                views[view_name] = _SplitView(name, part, ranges)
            hidden.add(name)


def _missing_from_shard(shard: _Shard, name: str, index: str) -> InputError:
    return InputError(shard.path, f"tensor '{name}' listed in {os.path.basename(index)} is not in this shard")


def open_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor], *, views: bool = True,
                    expert_layout: ExpertLayout = "auto", split_fused: bool = False) -> Checkpoint:
    """Open a checkpoint directory, a single weights file, a shard index ``.json``, or a ``{name: tensor}`` dict.

    A directory is searched for ``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json`` and ``pytorch_model.bin``, in that order; the first found is used.
    ``views``: dequantize FP8 weights and split stacked expert tensors (module docstring); ``expert_layout``:
    how stacked experts are stored (``"auto"``, ``"out_in"`` for ``[E, out, in]``, ``"in_out"`` for ``[E, in, out]``).
    ``split_fused``: show fused ``qkv_proj`` / ``gate_up_proj`` / ``query_key_value`` weights as their parts, as
    the directory's ``config.json`` says (module docstring); only a directory has one, so a file or a state dict is
    an InputError, and so is a directory without it. Whether the config fits is checked when the names are first
    listed.
    """
    if split_fused and not views:
        raise ValueError("split_fused is a view: it needs views=True")
    options = {"views": views, "expert_layout": expert_layout}
    if isinstance(source, Mapping):
        if split_fused:
            raise InputError(STATE_DICT, f"--split-fused needs the checkpoint's {CONFIG} to know how fused "
                                         f"projections split, and an in-memory state dict has none: give the "
                                         f"checkpoint directory")
        tensors = _check_tensors(STATE_DICT, source)
        shard = _TensorsShard(STATE_DICT, lambda: tensors)
        return Checkpoint(STATE_DICT, dict.fromkeys(tensors, shard), **options)
    path = _existing(source)
    if not os.path.isdir(path):
        if split_fused:
            raise InputError(path, f"--split-fused needs the checkpoint's {CONFIG} to know how fused projections "
                                   f"split, and a single file has none: give the checkpoint directory that holds "
                                   f"this file and {CONFIG}")
        return _open_file(path, path, **options)
    if split_fused:
        config = os.path.join(path, CONFIG)
        if not os.path.isfile(config):
            raise InputError(config, f"no such file: --split-fused reads the model_type and head counts of "
                                     f"the checkpoint {path} from it")
        options["fused_config"] = FusedConfig(config, read_json_object(config))
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
