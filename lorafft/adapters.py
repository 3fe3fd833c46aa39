"""PEFT LoRA adapters, merged exactly as PEFT merges them (peft.tuners.lora, checked against peft 0.21).

A LoRA module adds ΔW = s·B·A to a base weight W0 [out, in], with A [r, in], B [out, r] and
s = α/r, or α/√r under rsLoRA (Shuttleworth et al. 2410.21228 compare W0 with W0 + ΔW). PEFT's rules reproduced
here:

* r and α of a module come from ``rank_pattern`` / ``alpha_pattern`` when a pattern key matches the module's
  name (relative to the model PEFT wrapped, i.e. without ``base_model.model.``) under PEFT's
  ``get_pattern_key``: the first key, in config order, with ``re.match(rf"(.*\\.)?({key})$", name)``;
  otherwise from ``r`` / ``lora_alpha``.
* Storage layout: ``nn.Linear`` stores W0 as [out, in]; GPT-2's ``Conv1D`` stores [in, out] (``fan_in_fan_out``)
  and ΔW is transposed to match. PEFT decides this per module from the module's class, overriding the config's
  ``fan_in_fan_out`` (and saving whichever value the last module set). Without classes, the base tensor's shape
  decides when ``shape_of`` is given and the matrix is not square; otherwise the config's flag. Embeddings store
  [num_embeddings, embedding_dim] with ``lora_embedding_A`` [r, num_embeddings], ``lora_embedding_B``
  [embedding_dim, r]: always the [in, out] case.
* DoRA (``use_dora``): with W = W0 + ΔW viewed as [out, in], the merged weight is
  (m / ‖W‖) · W, the norm taken per output channel (over the input axis), m = ``lora_magnitude_vector`` [out].
  Magnitude tensors in an adapter whose config does not set ``use_dora`` are ignored, as PEFT ignores them.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lorafft.errors import InputError
from lorafft.io import writer
from lorafft.io.checkpoint import all_finite

ADAPTER_CONFIG = "adapter_config.json"
BASE_PREFIX = "base_model.model."  # prefix PeftModel puts before the wrapped model's module names

# <module>.<kind>[.<adapter name>][.weight]; "weight" and "bias" are never adapter names.
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.weight)?$"
)
ROLE = {
    "lora_A": "A",
    "lora_embedding_A": "A",
    "lora_B": "B",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}
_SHOWN = 3  # names listed in one message


@dataclass
class LoraModule:
    """One LoRA update of one base tensor, as stored in the adapter (tensors in their stored dtype).

    ``lora_A`` is [r, in] and ``lora_B`` [out, r] (embeddings: [r, num_embeddings] and [embedding_dim, r]);
    ``scaling`` is s; ``fan_in_fan_out`` says the base weight is stored [in, out] (``Conv1D``, and every
    embedding); ``magnitude`` is DoRA's m [out] or None.
    """

    base_name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool
    magnitude: torch.Tensor | None
    embedding: bool


def lora_modules(adapter, base_index, shape_of: Callable[[str], Sequence[int]] | None = None) -> list[LoraModule]:
    """The LoRA modules of a PEFT adapter (``lorafft.io.Adapter``), their base tensors resolved by ``base_index``
    (a ``lorafft.pairing.NameIndex`` of the base checkpoint), sorted by base tensor name.

    ``shape_of`` (e.g. the base ``Checkpoint.shape``) gives a base tensor's shape; with it, the storage layout of
    non-square weights is taken from the base (exactly PEFT's per-module choice) and checked against the factors.

    Raises InputError for a config without ``r`` or ``lora_alpha``, a non-LoRA adapter, ranks or shapes that
    disagree with the config, incomplete modules, and modules that match no base tensor. Tensors that are not
    LoRA factors (``modules_to_save`` copies, biases) are skipped with a warning.
    """
    config_path = os.path.join(adapter.path, ADAPTER_CONFIG)
    settings = _Settings(adapter.config, config_path)
    tensors = adapter.tensors

    parts, ignored = module_parts(tensors, use_dora=settings.use_dora)
    if ignored:
        warnings.warn(f"{tensors.path}: ignoring {len(ignored)} tensors that do not enter the merged weights "
                      f"({_listing(ignored)})", stacklevel=2)

    base_names = {module: base_index.resolve(module + ".weight") for module in parts}
    unmatched = [module for module, base_name in base_names.items() if base_name is None]
    if unmatched:
        file = tensors.file_of(next(iter(parts[unmatched[0]].values())))
        several = sorted(base_index.candidates(unmatched[0] + ".weight"))
        if several:
            raise InputError(file, f"adapter module '{unmatched[0]}' matches {len(several)} base tensors "
                                   f"({_listing(several)}): which one it adapts is ambiguous (its key needs the "
                                   f"module's full path)")
        what = (f"adapter module '{unmatched[0]}' matches" if len(unmatched) == 1
                else f"{len(unmatched)} adapter modules ({_listing(unmatched)}) match")
        raise InputError(file, f"{what} no tensor in the base checkpoint")
    modules = [
        _module(tensors, module, roles, base_names[module],
                None if shape_of is None else tuple(shape_of(base_names[module])), settings)
        for module, roles in parts.items()
    ]
    return sorted(modules, key=lambda m: m.base_name)


def module_parts(tensors, *, use_dora: bool) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The adapter's LoRA tensors by module: ``{PEFT module name: {"A"|"B"|"magnitude": tensor name}}``, and the
    names of the tensors that are not LoRA factors (DoRA magnitudes too, unless ``use_dora``: PEFT ignores them).
    InputError for weights holding several adapters or a module with two tensors of one kind."""
    matches, ignored = [], []
    for name in tensors.names():
        match = LORA_KEY.match(name)
        if match is None or (match["kind"] == "lora_magnitude_vector" and not use_dora):
            ignored.append(name)
        else:
            matches.append((name, match))
    adapter_names = {match["adapter"] for _, match in matches}
    if len(adapter_names) > 1:
        names = ", ".join(sorted(n or "<unnamed>" for n in adapter_names))
        raise InputError(tensors.path, f"adapter weights hold several adapters ({names}); expected one")
    parts: dict[str, dict[str, str]] = {}
    for name, match in matches:
        module, role = match["module"].removeprefix(BASE_PREFIX), ROLE[match["kind"]]
        if role in parts.setdefault(module, {}):
            raise InputError(tensors.file_of(name), f"adapter module '{module}' has two {match['kind']} tensors")
        parts[module][role] = name
    return parts, ignored


def delta_weight(module: LoraModule) -> torch.Tensor:
    """ΔW = s·B·A in fp32, in the base tensor's storage layout: [out, in], or [in, out] if ``fan_in_fan_out``."""
    delta = (module.lora_B.float() @ module.lora_A.float()) * module.scaling
    return delta.T.contiguous() if module.fan_in_fan_out else delta


def merged_weight(module: LoraModule, base_weight: torch.Tensor) -> torch.Tensor:
    """The weight PEFT's ``merge`` produces from W0 = ``base_weight`` (storage layout, any float dtype), in fp32.

    Plain LoRA: W0 + ΔW. DoRA: (m / ‖W0 + ΔW‖) · (W0 + ΔW), the norm per output channel. Computed in fp32
    throughout, so for (b)f16 models it is PEFT's result before PEFT rounds ΔW and the sum to the model's dtype.
    InputError (naming the base tensor) if W0's shape is not ΔW's, or a DoRA row of W0 + ΔW is zero (no direction).
    """
    delta = delta_weight(module)
    if tuple(base_weight.shape) != tuple(delta.shape):
        raise InputError(module.base_name, f"base weight has shape {list(base_weight.shape)} but the adapter's "
                                           f"update has shape {list(delta.shape)}")
    merged = base_weight.to(torch.float32, copy=True).add_(delta)
    if module.magnitude is None:
        return merged
    rows = merged.T if module.fan_in_fan_out else merged  # [out, in]
    norms = torch.linalg.norm(rows, dim=1)
    zero = (norms == 0).nonzero().flatten()
    if len(zero):
        raise InputError(module.base_name, f"DoRA row {int(zero[0])} of W0 + s·B·A is zero" + (
            f" (and {len(zero) - 1} more)" if len(zero) > 1 else "") + ": its direction, and so PEFT's merged weight "
            "m · (W0 + s·B·A) / ||W0 + s·B·A||, is undefined there")
    rows = (module.magnitude.float() / norms)[:, None] * rows
    return rows.T.contiguous() if module.fan_in_fan_out else rows


class _Settings:
    """The parts of ``adapter_config.json`` that decide the merge, validated."""

    def __init__(self, config: dict, path: str):
        self.path = path
        peft_type = config.get("peft_type", "LORA")  # PEFT always writes it; hand-written configs may not
        if peft_type != "LORA":
            raise InputError(path, f"adapter type is {peft_type!r}; only LORA adapters can be merged")
        for key in ("r", "lora_alpha"):
            if key not in config:
                raise InputError(path, f"adapter config has no '{key}'")
        self.r = self._number(config["r"], "r", integer=True)
        self.alpha = self._number(config["lora_alpha"], "lora_alpha")
        self.rank_pattern = self._pattern(config, "rank_pattern", integer=True)
        self.alpha_pattern = self._pattern(config, "alpha_pattern")
        self.use_rslora = bool(config.get("use_rslora", False))
        self.use_dora = bool(config.get("use_dora", False))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    def _number(self, value, what: str, integer: bool = False):
        valid = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not valid or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
            kind = "a positive integer" if integer else "a positive number"
            raise InputError(self.path, f"adapter config '{what}' must be {kind}, got {value!r}")
        return value

    def _pattern(self, config: dict, key: str, integer: bool = False) -> dict:
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise InputError(self.path, f"adapter config '{key}' must be an object")
        for regex, value in pattern.items():
            try:
                re.compile(regex)
            except re.error as e:
                raise InputError(self.path, f"adapter config '{key}' key {regex!r} is not a regex: {e}") from e
            self._number(value, f"{key}[{regex!r}]", integer)
        return pattern

    def rank_and_scaling(self, key: str) -> tuple[int, float]:
        """(r, s) of the module named ``key`` (PEFT's ``current_key``)."""
        r = pattern_value(self.rank_pattern, key, self.r)
        alpha = pattern_value(self.alpha_pattern, key, self.alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def pattern_value(pattern: dict, key: str, default):
    """PEFT's ``pattern.get(get_pattern_key(pattern.keys(), key), default)``: the first matching key wins."""
    for pattern_key in pattern:
        if re.match(rf"(.*\.)?({pattern_key})$", key):
            return pattern[pattern_key]
    return default


def _module(tensors, module: str, roles: dict[str, str], base_name: str,
            base_shape: tuple[int, ...] | None, settings: _Settings) -> LoraModule:
    """Load and check one module's factors (``roles``: role -> tensor name; ``base_shape``: None if unknown)."""
    for role, kind in (("A", "lora_A"), ("B", "lora_B")):
        if role not in roles:
            raise InputError(tensors.file_of(next(iter(roles.values()))), f"adapter module '{module}' has no {kind}")
    if settings.use_dora and "magnitude" not in roles:
        raise InputError(tensors.file_of(roles["A"]),
                         f"adapter module '{module}' has no lora_magnitude_vector but the config sets use_dora")
    lora_a, lora_b = tensors.get(roles["A"]), tensors.get(roles["B"])
    file = tensors.file_of(roles["A"])
    r, scaling = settings.rank_and_scaling(module)
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != r or lora_b.shape[1] != r:
        raise InputError(file, f"adapter module '{module}': lora_A {list(lora_a.shape)} and lora_B "
                               f"{list(lora_b.shape)} do not have the rank r = {r} that {ADAPTER_CONFIG} gives")
    largest = scaling * float(lora_b.abs().max()) * float(lora_a.abs().max()) * r  # bounds every entry of s·B·A
    if not largest < torch.finfo(torch.float32).max:
        raise InputError(file, f"adapter module '{module}': its update s·B·A (s = {scaling:g} from lora_alpha and r) "
                               f"reaches {largest:g}, beyond float32: the tuned weight is not a number")
    magnitude = None
    if "magnitude" in roles:
        magnitude = tensors.get(roles["magnitude"])
        if tuple(magnitude.shape) != (lora_b.shape[0],):
            raise InputError(file, f"adapter module '{module}': lora_magnitude_vector has shape "
                                   f"{list(magnitude.shape)}, expected [{lora_b.shape[0]}]")
    embedding = LORA_KEY.match(roles["A"])["kind"] == "lora_embedding_A"
    out_in = (lora_b.shape[0], lora_a.shape[1])
    fan_in_fan_out = embedding or settings.fan_in_fan_out
    if base_shape is not None:
        if base_shape not in (out_in, out_in[::-1]) or (embedding and base_shape != out_in[::-1]):
            raise InputError(file, f"adapter module '{module}' updates a [{out_in[0]}, {out_in[1]}] weight but "
                                   f"base tensor '{base_name}' has shape {list(base_shape)}")
        if out_in[0] != out_in[1]:
            fan_in_fan_out = base_shape != out_in
    return LoraModule(
        base_name=base_name,
        lora_A=lora_a,
        lora_B=lora_b,
        scaling=scaling,
        fan_in_fan_out=fan_in_fan_out,
        magnitude=magnitude,
        embedding=embedding,
    )


def _listing(names: list[str]) -> str:
    """The first few names, quoted, with a count of the rest."""
    shown = ", ".join(f"'{n}'" for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


# ---------------------------------------------------------------------------------------------------------------
# Writing an adapter with rescaled singular triplets (lorafft.intervene), beside the reading rules it inverts

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_adapter(adapter, base_checkpoint, base_index, triplets: Mapping[str, tuple], lam: float, directory: str,
                  leave_out=()) -> list[str]:
    """Write ``adapter`` into ``directory`` with λ applied to the given singular triplets of its merged updates:
    s·B'·A' = s·B·A + (λ−1)·Σ u_j σ_j v_jᵀ per module, each module keeping its scaling s (the rules:
    :mod:`lorafft.intervene`'s docstring). Return the file names written.

    Args:
        adapter: the PEFT adapter (``lorafft.io.Adapter``).
        base_checkpoint: the base (``lorafft.io.Checkpoint``), read only for DoRA modules' W0.
        base_index: a ``lorafft.pairing.NameIndex`` of the base names, resolving PEFT keys to base tensors.
        triplets: base tensor name -> ``(LoraModule, U [out, c], S [c], V [in, c])``, fp64, in the analysed
            orientation; modules not named are written unchanged.
        lam: λ.
        directory: an existing, empty directory.
        leave_out: names of other files of the adapter directory not to copy.

    Returns:
        ``adapter_config.json``, ``adapter_model.safetensors`` (also when the input was ``.bin``; with the input's
        safetensors metadata) and the copied other files.
    """
    config = copy.deepcopy(adapter.config)  # every field kept
    use_rslora = bool(config.get("use_rslora", False))
    modules, _ = module_parts(adapter.tensors, use_dora=bool(config.get("use_dora")))  # key -> {role: name}
    key_of = {base_index.resolve(key + ".weight"): key for key in modules}
    tensors = {name: adapter.tensors.get(name) for name in adapter.tensors.names()}
    first_file = adapter.tensors.file_of(next(iter(tensors)))
    if not first_file.endswith(".safetensors"):
        tensors = {name: t.clone() for name, t in tensors.items()}  # .bin tensors may share storage
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def old_rank_alpha(key):
        return (pattern_value(rank_pattern, key, config["r"]), pattern_value(alpha_pattern, key, config["lora_alpha"]))

    entries = {}  # PEFT key -> (r, alpha)
    for name, (module, U, S, V) in triplets.items():
        key = key_of[name]
        roles = modules[key]
        r, alpha = old_rank_alpha(key)
        base_weight = base_checkpoint.get(name) if module.magnitude is not None else None
        lora_a, lora_b, magnitude = extended_factors(module, U, S, V, lam, tensors[roles["A"]], tensors[roles["B"]],
                                                     base_weight)
        if not all(all_finite(t) for t in (lora_a, lora_b, magnitude) if t is not None):
            raise InputError("lambda", f"{lam:g} leaves non-finite values in the factors of '{key}': nothing "
                                       f"written")
        tensors[roles["A"]], tensors[roles["B"]] = lora_a, lora_b
        if magnitude is not None:
            tensors[roles["magnitude"]] = magnitude
        r_new = lora_a.shape[0]
        alpha_new = alpha * (math.sqrt(r_new / r) if use_rslora else r_new / r)  # keeps s = α/r (α/√r)
        entries[key] = (r_new, int(alpha_new) if float(alpha_new).is_integer() else alpha_new)
    for key in modules:  # a module whose name ends with a changed one's would match that key: pin its own values
        if key not in entries and any(key.endswith("." + changed) for changed in list(entries)):
            entries[key] = old_rank_alpha(key)
    if entries:
        ordered = sorted(entries, key=lambda key: (-len(key), key))  # a longer name's key before its suffixes'
        config["rank_pattern"] = _merge_patterns({re.escape(key): entries[key][0] for key in ordered}, rank_pattern)
        config["alpha_pattern"] = _merge_patterns({re.escape(key): entries[key][1] for key in ordered}, alpha_pattern)

    metadata = writer.safetensors_metadata(first_file)
    writer.write_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), tensors, metadata)
    writer.write_json(os.path.join(directory, ADAPTER_CONFIG), config)
    skip = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin", *leave_out}
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + writer.copy_other_files(adapter.path, directory, skip)


def extended_factors(module: LoraModule, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, lam: float,
                     lora_a: torch.Tensor, lora_b: torch.Tensor, base_weight: torch.Tensor | None):
    """The factors of one module with (λ−1)·U diag(S) Vᵀ added to its update.

    Args:
        module: the module (its scaling s, orientation, DoRA magnitude m).
        U, S, V: the triplets, ``[out, c]``, ``[c]``, ``[in, c]`` fp64 in the analysed orientation (embeddings are
            analysed as stored, ``[in, out]``).
        lam: λ.
        lora_a, lora_b: the stored factors A ``[r, in]``, B ``[out, r]``.
        base_weight: W0 as stored, needed for DoRA only.

    Returns:
        ``(A' [r+c, in], B' [out, r+c], m' [out] or None)`` with s·B'·A' = s·B·A + (λ−1)·Σ u_j σ_j v_jᵀ in PEFT's
        B·A orientation ``[out, in]`` (DoRA: the new columns divided row-wise by D = m/‖V‖, and m' = D·‖V'‖).
    """
    if module.embedding:
        U, V = V, U
    coefficient = (abs(lam - 1) * S / module.scaling).sqrt()  # [c]
    b = U * (coefficient * math.copysign(1.0, lam - 1))  # [out, c]
    a = V * coefficient  # [in, c]
    dtype = torch.promote_types(lora_a.dtype, torch.float32)
    W0 = None
    if module.magnitude is not None:
        W0 = (base_weight.T if module.fan_in_fan_out else base_weight).double()  # [out, in]
        norm = torch.linalg.norm(W0 + module.scaling * (lora_b.double() @ lora_a.double()), dim=1)
        D = module.magnitude.double() / norm
        b = b / D[:, None]
    lora_b_new = torch.cat([lora_b.to(dtype), b.to(dtype)], dim=1)
    lora_a_new = torch.cat([lora_a.to(dtype), a.T.to(dtype)], dim=0)
    magnitude = None
    if W0 is not None:
        V_new = W0 + module.scaling * (lora_b_new.double() @ lora_a_new.double())
        magnitude = (D * torch.linalg.norm(V_new, dim=1)).to(torch.promote_types(module.magnitude.dtype,
                                                                                   torch.float32))
    return lora_a_new.contiguous(), lora_b_new.contiguous(), magnitude


def _merge_patterns(new: dict, old: dict) -> dict:
    """``new`` first (it must win PEFT's first-match rule), then the old entries not replaced."""
    return {**new, **{key: value for key, value in old.items() if key not in new}}
