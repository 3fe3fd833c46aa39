"""Pairing: which base tensor each tuned matrix is compared with, which matrices are in scope, and their batches.

Names are matched tolerantly of leading prefixes (``base_model.model.``, ``model.``, ``bert.``, ...): two names
pair when they are equal or one is the other with leading dot-separated components removed, and the match is
unique. Scope: every 2-D weight present in both with equal shape; embeddings and ``lm_head`` only when asked;
``include`` / ``exclude`` regular expressions (``re.search``) narrow it further. Biases are never in scope, even
2-D ones (GPT-OSS stores its experts' biases stacked, ``experts.gate_up_proj_bias [E, 2I]``). Matrices of one
shape form one batch for the linear algebra (:func:`shape_batches`).
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass

from lorafft import adapters, io
from lorafft.errors import InputError

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
        found = self.candidates(name)
        return found.pop() if len(found) == 1 else None

    def candidates(self, name: str) -> set[str]:
        """Every indexed name ``name`` could mean: itself, or the names equal to it up to leading components (more
        than one: ambiguous)."""
        if name in self.names:
            return {name}
        parts = name.split(".")
        suffixes = (".".join(parts[start:]) for start in range(1, len(parts)))  # this name carries an extra prefix
        found = {suffix for suffix in suffixes if suffix in self.names}
        found.update(self._by_suffix.get(name, []))  # the indexed name carries an extra prefix
        return found


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


@dataclass
class Pair:
    """One matrix to analyse: the base tensor name, where the tuned matrix comes from, and its analysed shape.

    ``shape`` is ``[out, in]``: PEFT ``fan_in_fan_out`` weights (GPT-2 Conv1D) are stored ``[in, out]`` and
    transposed (:attr:`transposed`); embeddings are analysed as stored, whether the tuned side is an adapter or a
    full fine-tune. ``adapter`` is the PEFT LoRA module when the tuned side is an adapter, else None.
    """

    name: str
    tuned_name: str
    shape: tuple[int, int]
    adapter: adapters.LoraModule | None = None

    @property
    def transposed(self) -> bool:
        return self.adapter is not None and self.adapter.fan_in_fan_out and not self.adapter.embedding


def find_pairs(base: io.Checkpoint, tuned: io.Checkpoint | io.Adapter, scope: Scope, *, strict: bool = False):
    """``(pairs, skipped)``: the pairs in scope, and the skipped names with reasons (``{"name", "reason"}``).

    Raises InputError when nothing pairs, or (``strict``) when a paired name has a different shape; otherwise each
    name skipped for its shape or an ambiguous match is a warning.
    """
    if isinstance(tuned, io.Adapter):
        (pairs, skipped), noted = _adapter_pairs(base, tuned, scope), []
    else:
        pairs, skipped, noted = _checkpoint_pairs(base, tuned, scope, strict)
    if not pairs:
        because = (f": the {len(skipped)} in common with it are empty, ambiguous or differ in shape (first: "
                   f"{skipped[0]['reason']})" if skipped else "")
        raise InputError(tuned.path, f"no 2-D weight matrices in scope in common with the base checkpoint "
                                     f"{base.path}{because}")
    for file, problem in noted:
        warnings.warn(f"{file}: {problem}; skipped", stacklevel=2)
    return pairs, skipped


def _adapter_pairs(base: io.Checkpoint, adapter: io.Adapter, scope: Scope):
    pairs, skipped = [], []
    for module in adapters.lora_modules(adapter, NameIndex(base.names()), base.shape):
        if scope.admits(module.base_name):
            shape = tuple(base.shape(module.base_name))
            pair = Pair(module.base_name, module.base_name, shape, module)
            pair.shape = shape[::-1] if pair.transposed else shape
            _admit(pair, pairs, skipped, [base.dtype(module.base_name)])
    return pairs, skipped


def not_a_weight(dtype) -> str | None:
    """Why a 2-D tensor of ``dtype`` is no weight matrix to analyse (integers, bools: an int8 quantized weight is W
    only with scales whose layout lorafft does not know), or None for a floating-point one (FP8 included)."""
    if dtype.is_floating_point:
        return None
    return (f"{str(dtype).removeprefix('torch.')} tensor: not a floating-point weight (a quantized weight is W only "
            f"with its scales, and lorafft reads those for FP8 only)")


def _admit(pair: Pair, pairs: list[Pair], skipped: list[dict], dtypes=()) -> None:
    """Add ``pair``, or skip it with a reason when it has no entries (a ``[0, n]`` weight has no singular vectors)
    or one of its tensors' ``dtypes`` is not floating point (:func:`not_a_weight`)."""
    reasons = [reason for reason in map(not_a_weight, dtypes) if reason]
    if 0 in pair.shape:
        skipped.append({"name": pair.name, "reason": f"empty matrix {list(pair.shape)}: no singular vectors"})
    elif reasons:
        skipped.append({"name": pair.name, "reason": reasons[0]})
    else:
        pairs.append(pair)


def _checkpoint_pairs(base: io.Checkpoint, tuned: io.Checkpoint, scope: Scope, strict: bool):
    """``(pairs, skipped, noted)``: noted the ``(file, problem)`` of each name skipped for its shape or for an
    ambiguous match (one tuned tensor resolving for several base tensors)."""
    tuned_index = NameIndex(tuned.names())
    pairs, skipped, noted = [], [], []
    resolved = {name: tuned_index.resolve(name) for name in base.names()}
    claims = defaultdict(list)  # tuned name -> the base names it resolves for: more than one is ambiguous
    for name, tuned_name in resolved.items():
        if tuned_name is not None:
            claims[tuned_name].append(name)
    for name in base.names():
        tuned_name = resolved[name]
        if tuned_name is None or len(base.shape(name)) != 2 or not scope.admits(name):
            continue
        if len(claims[tuned_name]) > 1:
            problem = (f"tensor '{tuned_name}' matches several base tensors ({', '.join(claims[tuned_name])}): "
                       f"which one it fine-tunes is ambiguous")
            noted.append((tuned.file_of(tuned_name), problem))
            skipped.append({"name": name, "reason": problem})
            continue
        base_shape, tuned_shape = list(base.shape(name)), list(tuned.shape(tuned_name))
        if base_shape != tuned_shape:
            problem = f"tensor '{tuned_name}' has shape {tuned_shape} but base '{name}' has {base_shape}"
            if strict:
                raise InputError(tuned.file_of(tuned_name), problem)
            noted.append((tuned.file_of(tuned_name), problem))
            skipped.append({"name": name, "reason": problem})
            continue
        _admit(Pair(name, tuned_name, tuple(base_shape)), pairs, skipped, [base.dtype(name), tuned.dtype(tuned_name)])
    return pairs, skipped, noted


def shape_batches(pairs: list[Pair], batch_size) -> list[list[Pair]]:
    """Same-shape groups of ``pairs``, cut into batches of at most ``batch_size(shape)`` matrices (the memory model's
    answer, :func:`lorafft.memory.batch_size`), in first-seen order."""
    batches = []
    for shape, group in group_by_shape(pairs, lambda p: p.shape).items():
        size = max(1, int(batch_size(shape)))
        batches.extend(group[start : start + size] for start in range(0, len(group), size))
    return batches
