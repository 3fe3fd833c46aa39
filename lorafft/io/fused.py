"""Fused projections: the rows of a fused weight that each of its projections applies, from ``config.json``.

A fused ``qkv_proj`` / ``gate_up_proj`` / ``query_key_value`` weight is split as the checkpoint directory's
``config.json`` says (``model_type`` and sizes), the way transformers' modeling code reads the fused output:

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
``RefinedWeb``/``RefinedWebModel`` configs, a missing or malformed size) is an InputError naming the config file,
never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafft.errors import InputError
from lorafft.io.jsonfile import is_int

CONFIG = "config.json"  # a Hugging Face checkpoint directory's model config (read for split_fused)
FUSED_WEIGHT = re.compile(r"(^|\.)(?P<kind>qkv_proj|gate_up_proj|query_key_value)\.weight$")
FUSED_MODEL_TYPES = {  # fused 2-D weight -> the model_types whose row layout split_fused knows (module docstring)
    "qkv_proj": ("phi3",),
    "gate_up_proj": ("phi3",),
    "query_key_value": ("bloom", "falcon", "gpt_neox"),
}

RowRanges = tuple[tuple[int, int], ...]  # rows fused[a:b] for each (a, b), in order


@dataclass(frozen=True)
class FusedConfig:
    """A checkpoint directory's ``config.json`` (``path``, for messages) and its parsed ``config``: how fused
    projections split (module docstring)."""

    path: str
    config: dict

    def layout(self, kind: str, name: str) -> dict[str, RowRanges]:
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
                if not (is_int(value) and value > 0):
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


def _contiguous(sizes: dict[str, int]) -> dict[str, RowRanges]:
    """Row ranges of parts stored one after the other, ``[a; b; ...]``."""
    layout, start = {}, 0
    for part, size in sizes.items():
        layout[part] = ((start, start + size),)
        start += size
    return layout


def _grouped(groups: int, queries: int, head_dim: int) -> dict[str, RowRanges]:
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


def split_name(fused: str, part: str) -> str:
    """The view name of part ``part`` of the fused weight ``fused``: ``<m>.qkv_proj.weight`` ->
    ``<m>.qkv_proj.q.weight``."""
    return f"{fused.removesuffix('.weight')}.{part}.weight"
