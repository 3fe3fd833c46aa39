"""Pairing: which base tensor each tuned matrix is compared with, and which matrices are in scope.

Names are matched tolerantly of leading prefixes (``base_model.model.``, ``model.``, ``bert.``, ...): two names
pair when they are equal or one is the other with leading dot-separated components removed, and the match is
unique. Scope: every 2-D weight present in both with equal shape; embeddings and ``lm_head`` only when asked;
``include`` / ``exclude`` regular expressions (``re.search``) narrow it further. Biases are never in scope, even
2-D ones (GPT-OSS stores its experts' biases stacked, ``experts.gate_up_proj_bias [E, 2I]``). Matrices of one
shape form one batch for the linear algebra.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

EMBEDDING_PATTERN = re.compile(r"(^|\.)(embed\w*|wte|wpe|\w*embeddings|lm_head|shared)(\.|$)")
BIAS_PATTERN = re.compile(r"(^|[._])bias$")  # GPT-OSS's stacked expert biases ``experts.gate_up_proj_bias`` are 2-D


class NameIndex:
    """Resolve names from another checkpoint (or a PEFT adapter) to the names of this one.

    ``resolve("bert.encoder.layer.0.attention.self.query.weight")`` finds ``encoder.layer.0...query.weight``
    and vice versa. Returns ``None`` when nothing, or more than one name, matches.
    """

    def __init__(self, names):
        self.names = set(names)
        self._by_suffix: dict[str, list[str]] = defaultdict(list)
        for name in self.names:
            parts = name.split(".")
            for start in range(1, len(parts)):
                self._by_suffix[".".join(parts[start:])].append(name)

    def resolve(self, name: str) -> str | None:
        if name in self.names:
            return name
        parts = name.split(".")
        for start in range(1, len(parts)):  # this name carries an extra prefix
            suffix = ".".join(parts[start:])
            if suffix in self.names:
                return suffix
        candidates = self._by_suffix.get(name, [])  # the indexed name carries an extra prefix
        return candidates[0] if len(candidates) == 1 else None


def layer_and_module(name: str) -> tuple[int | None, str]:
    """Split a tensor name into its layer index and module path.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``(3, "self_attn.q_proj")``; names without a numeric component
    give ``(None, name without ".weight")``. The layer is the first numeric component *before* any experts
    container (a component ending in ``experts``: ``experts``, ``local_experts``, ``shared_experts``): expert
    indices are not layers. ``model.layers.0.mlp.experts.3.w1.weight`` -> ``(0, "mlp.experts.3.w1")``;
    a stacked expert tensor's per-expert view (:mod:`lorafft.io`) ``model.layers.0.mlp.experts.down_proj.3`` ->
    ``(0, "mlp.experts.down_proj.3")``; ``experts.3.w1.weight`` -> ``(None, "experts.3.w1")``.
    """
    parts = name.split(".")
    if parts[-1] == "weight":
        parts = parts[:-1]
    for position, part in enumerate(parts):
        if part.endswith("experts"):
            break
        if part.isdigit():
            return int(part), ".".join(parts[position + 1 :]) or parts[position - 1]
    return None, ".".join(parts)


def is_embedding(name: str) -> bool:
    """True for token/position embeddings and the output head, which the default scope leaves out."""
    return EMBEDDING_PATTERN.search(name) is not None


@dataclass(frozen=True)
class Scope:
    """Which matrices a scan looks at. ``include``/``exclude`` are regexes searched in the base tensor name."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: bool = False

    def admits(self, name: str) -> bool:
        if BIAS_PATTERN.search(name):  # a bias is never a weight matrix, even when 2-D (stacked per expert)
            return False
        if not self.embeddings and is_embedding(name):
            return False
        if self.include and not any(re.search(pattern, name) for pattern in self.include):
            return False
        return not any(re.search(pattern, name) for pattern in self.exclude)


def group_by_shape(items, shape_of):
    """``{shape: [item, ...]}`` in first-seen order, so each group can be processed as one batch."""
    groups: dict[tuple[int, ...], list] = {}
    for item in items:
        groups.setdefault(tuple(shape_of(item)), []).append(item)
    return groups
