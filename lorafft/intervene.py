"""The paper's intervention (Shuttleworth et al. 2410.21228, Sec. 6, Tables 3–4): rescale intruder dimensions.

For a base matrix W0 and a tuned matrix Wt = W0 + ΔW, both torch ``[out, in]`` weights, let (u_j, σ_j, v_j) be the
j-th singular triplet of Wt (u_j ∈ R^out, v_j ∈ R^in unit vectors, j = 0..k-1 by descending σ_j). u_j is the
paper's y_j; it is an *intruder* at threshold ε when ``max_i |<u_j, x_i>| < ε`` over every left singular vector x_i
of W0 (as :func:`lorafft.scan` finds them). The intervention replaces σ_j by λ·σ_j for the chosen intruders:

    W' = W0 + ΔW + (λ − 1) · Σ_j u_j σ_j v_jᵀ

Because the u_j, v_j are exact singular vectors of Wt, every other singular triplet of Wt is untouched: the singular
values of W' are those of Wt with each rescaled σ_j replaced by λ·σ_j (which may move it down in rank), and its
singular vectors are Wt's. λ < 1 shrinks the intruders (the paper: less forgetting of the pre-training
distribution), λ = 0 removes them, λ = 1 changes nothing, λ > 1 amplifies them. Negative λ is refused (it would
flip the vector's sign, not scale a singular value).

``which="top"`` rescales the highest-ranked intruder of each matrix (smallest j), ``"all"`` every intruder among the
top k. The triplets are computed in fp64 (certified block Krylov started from the base's top vectors and, for
adapters, the LoRA B columns; error bound ``TRIPLET_TOL`` per vector), on the merged fp32 Wt that ``scan`` analyses.

Outputs, written into a new (or empty) directory, atomically (a temporary directory beside it, renamed):

* TUNED a PEFT LoRA adapter (ΔW = s·B·A, s = α/r or α/√r under rsLoRA, A [r, in], B [out, r]): an exact PEFT
  adapter. A module with c rescaled intruders gets rank r' = r + c: ``B' = [B, b_1..b_c]``, ``A' = [A; a_1ᵀ..a_cᵀ]``
  with ``b_j = sign(λ−1)·√(|λ−1|σ_j/s)·u_j`` and ``a_j = √(|λ−1|σ_j/s)·v_j``, so that s·b_j·a_jᵀ = (λ−1)u_jσ_jv_jᵀ.
  Its scaling is kept: ``rank_pattern`` gets r' and ``alpha_pattern`` α' = s·r' (s·√r' under rsLoRA) under the
  module's full name, regex-escaped (PEFT's rule: ``re.match(rf"(.*\\.)?({key})$", name)``, first key wins; keys
  are ordered longest first, and a module whose name ends with a changed module's name gets an explicit entry with
  its old r and α, so no other module changes). The original factors are kept bit for bit, so nothing of ΔW is lost
  (unlike re-truncating to rank r). Changed modules' factors are stored in fp32 when the adapter's are (b)f16, so
  the new columns are not rounded to 8 bits; unchanged modules keep their dtype and bytes.
  ``fan_in_fan_out`` (GPT-2 Conv1D) and LoRA embeddings are handled in PEFT's B·A orientation.
  DoRA: PEFT merges (m / ‖V‖)·V, V = W0 + s·B·A, norms per output row. With D = m / ‖V‖ the target is
  W' = D·(V + D⁻¹(λ−1)uσvᵀ), so b_j is divided by D (row-wise) and the magnitude becomes m' = D·‖V'‖, V' the new
  W0 + s·B'·A': exact, with m rewritten for the module.
  The adapter weights are written as ``adapter_model.safetensors`` (also when the input was ``adapter_model.bin``),
  with the input's safetensors metadata; ``adapter_config.json`` keeps every other field.
* TUNED a full fine-tune in safetensors (one file, or shards with an index): the same shard file names, the same
  tensor → shard assignment, the same index, dtypes and metadata. Shards without a changed matrix are copied byte
  for byte; in the others every untouched tensor keeps its bytes, and changed ones are computed in fp64 and
  rounded once to their stored dtype. Other files of the directory (config.json, tokenizer, ...) are copied;
  subdirectories and other weight files (``*.bin``, ``*.pt``, ...) are not (they would hold the old weights), with a
  warning. PyTorch ``.bin`` checkpoints are refused (InputError): they would have to change format and file names;
  convert them to safetensors first.

Both kinds also get ``lorafft_intervention.json``: what was rescaled (the :class:`InterventionSummary`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass, field

import torch

from lorafft import adapters, analysis, io, linalg, loading, options, pairing
from lorafft.cache import BaseCache, batch_basis
from lorafft.errors import InputError
from lorafft.options import DEFAULT_MAX_BATCH_BYTES
from lorafft.pairing import Pair

WHICH = ("top", "all")
TRIPLET_TOL = 1e-8  # certified error bound of each rescaled singular vector (fp64 iteration)
RECORD = "lorafft_intervention.json"
_INDEX = "model.safetensors.index.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_WEIGHT_FILE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|\.index\.json$")
_SIGMA_AGREEMENT = 1e-4  # relative agreement required between analyze's σ_j and the fp64 triplet's


@dataclass
class RescaledDimension:
    """One rescaled intruder: its rank j (0-based among Wt's top k), max |cos| against the base, σ_j and λ·σ_j."""

    rank: int
    max_cos: float
    sigma_before: float
    sigma_after: float


@dataclass
class MatrixIntervention:
    """One matrix in scope: ``intruders`` found at ε among the top k, the ``rescaled`` ones (empty: untouched).
    For adapter modules ``lora_rank`` is ``[r, r']`` (r' = r + number rescaled; equal when nothing changed)."""

    name: str
    tuned_name: str
    shape: tuple[int, int]
    intruders: int
    rescaled: list[RescaledDimension] = field(default_factory=list)
    lora_rank: list[int] | None = None


@dataclass
class InterventionSummary:
    """What :func:`intervene` did: options, one :class:`MatrixIntervention` per matrix in scope, files written."""

    base: str
    tuned: str
    out_dir: str
    tuned_kind: str  # "lora" or "full"
    lam: float
    which: str
    eps: float
    k: int
    matrices: list[MatrixIntervention]
    skipped: list[dict]
    files: list[str]
    created: str = ""

    @property
    def rescaled(self) -> int:
        """Number of rescaled intruder dimensions over all matrices."""
        return sum(len(m.rescaled) for m in self.matrices)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["rescaled_total"] = self.rescaled
        for matrix in data["matrices"]:
            matrix["shape"] = list(matrix["shape"])
        return data

    def summary(self, shown: int = 8) -> str:
        """A few lines for a terminal: totals, the first ``shown`` changed matrices, where the output is."""
        changed = [m for m in self.matrices if m.rescaled]
        kind = "LoRA adapter" if self.tuned_kind == "lora" else "full fine-tune"
        lines = [
            f"intervention λ={self.lam:g} on the {'top intruder' if self.which == 'top' else 'intruders'} "
            f"(ε={self.eps:g}, k={self.k}) of a {kind}",
            f"{len(self.matrices)} matrices in scope, {sum(m.intruders for m in self.matrices)} intruders; "
            f"rescaled {self.rescaled} in {len(changed)} matrices, {len(self.matrices) - len(changed)} untouched",
        ]
        for m in changed[:shown]:
            dims = ", ".join(f"σ{d.rank} {d.sigma_before:.4g}->{d.sigma_after:.4g} (max|cos| {d.max_cos:.3f})"
                             for d in m.rescaled)
            rank = f"  [LoRA rank {m.lora_rank[0]}->{m.lora_rank[1]}]" if m.lora_rank else ""
            lines.append(f"  {m.name}: {dims}{rank}")
        if len(changed) > shown:
            lines.append(f"  ... and {len(changed) - shown} more (see {RECORD})")
        lines.append(f"written to {self.out_dir}" + (" (PEFT adapter)" if self.tuned_kind == "lora" else ""))
        return "\n".join(lines)


@dataclass
class _Edit:
    """The rescaled triplets of one matrix, in the analysed orientation ``[out, in]`` (scan's): U ``[out, c]``,
    S ``[c]``, V ``[in, c]``, fp64."""

    pair: Pair
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def intervene(
    base,
    tuned,
    out_dir,
    *,
    lam: float,
    which: str = "top",
    eps: float = 0.5,
    k: int = 10,
    include=(),
    exclude=(),
    embeddings: bool = False,
    tol: float = 1e-5,
    seed: int = 0,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    base_cache=None,
    device=None,
    backend: str | None = None,
    progress: bool = False,
) -> InterventionSummary:
    """Rescale the intruder dimensions of ``tuned`` (relative to ``base``) by ``lam`` and write the result to
    ``out_dir`` (see the module docstring for the formula and both output formats).

    Args:
        base: the base checkpoint (directory, ``.safetensors``/``.bin`` file or shard index).
        tuned: a PEFT LoRA adapter directory, or a full fine-tune in safetensors (directory, file or index).
        out_dir: a new or empty directory (InputError if it holds anything).
        lam: λ ≥ 0, the factor applied to each rescaled singular value.
        which: ``"top"`` (the highest-ranked intruder per matrix) or ``"all"`` (every intruder among the top k).
        eps, k: the intruder definition (max |cos| < eps, among the top k left singular vectors; the paper: 0.5, 10).
        include, exclude, embeddings: scope, as in :func:`lorafft.scan` (regexes searched in base tensor names).
        tol, seed, max_batch_bytes: the scan's analysis (certified max |cos| error, random starts, memory cap).
        base_cache, device, backend: as in :func:`lorafft.scan` (a ``lorafft cache build`` directory; where and how
            the analysis runs). LoRA updates are kept factored as the scan keeps them.
        progress: a progress bar on stderr.

    Returns an :class:`InterventionSummary`. Raises InputError on bad input or options; nothing is written then.
    """
    lam = _check_options(lam, which, eps)
    settings = options.ScanOptions(k=k, eps=eps, include=include, exclude=exclude, embeddings=embeddings, tol=tol,
                                   seed=seed, base_cache=base_cache, max_batch_bytes=max_batch_bytes)
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out_dir(out_dir)
    if isinstance(tuned, dict):
        raise InputError(io.STATE_DICT, "intervene rewrites files: TUNED must be a checkpoint or adapter on disk")
    device = torch.device("cpu" if device is None else device)
    reader = None if base_cache is None else BaseCache(base_cache)
    tuned_source = loading.open_tuned(tuned)
    is_adapter = isinstance(tuned_source, io.Adapter)
    tuned_checkpoint = tuned_source.tensors if is_adapter else tuned_source
    layout = None if is_adapter else _safetensors_layout(tuned_checkpoint, os.fspath(tuned))
    scope = pairing.Scope(settings.include, settings.exclude, settings.embeddings)
    with loading.open_base(base) as base_checkpoint, tuned_checkpoint:
        pairs, skipped = pairing.find_pairs(base_checkpoint, tuned_source, scope)
        loader = loading.BatchLoader(base_checkpoint, [tuned_source], [{pair.name: pair for pair in pairs}],
                                     device=device, native=linalg.resolve_backend(device, backend) == "triton")
        finder = _EditFinder(settings, lam, which, reader, backend)
        edits, matrices = finder.find(loader, pairing.shape_batches(pairs, settings.max_batch_bytes), progress)
        views = [] if is_adapter else [e.pair.tuned_name for e in edits.values() if tuned_checkpoint.is_view(e.pair.tuned_name)]
        if views:
            raise InputError(tuned_checkpoint.file_of(views[0]), f"intervene cannot rewrite '{views[0]}': it is "
                                                                 "stored FP8-quantized or stacked per expert")
        summary = InterventionSummary(
            base=loading.describe(base), tuned=os.fspath(tuned),
            out_dir=out_dir, tuned_kind="lora" if is_adapter else "full", lam=lam, which=which, eps=float(eps),
            k=k, matrices=matrices, skipped=skipped, files=[],
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        temporary = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
        os.mkdir(temporary)
        try:
            if is_adapter:
                files = _write_adapter(tuned_source, base_checkpoint, edits, lam, temporary, matrices)
            else:
                files = _write_checkpoint(tuned_checkpoint, layout, edits, lam, temporary)
            summary.files = sorted(files + [RECORD])
            with open(os.path.join(temporary, RECORD), "w", encoding="utf-8") as f:
                json.dump(summary.to_dict(), f, indent=1)
                f.write("\n")
            _publish(temporary, out_dir)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Finding the triplets


def _check_options(lam, which, eps) -> float:
    """λ as a float; ``which`` one of WHICH; ``eps`` one threshold (k, ε's range and the rest: ScanOptions)."""
    lam = options.scale_factor(lam)
    if which not in WHICH:
        raise InputError("which", f"must be 'top' or 'all', got {which!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise InputError("eps", f"must be one threshold in (0, 1], got {eps!r}")
    return lam


def _check_out_dir(out_dir: str) -> None:
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            raise InputError(out_dir, "output directory exists and is not empty; choose a new one (nothing written)")
    elif os.path.lexists(out_dir):
        raise InputError(out_dir, "output path exists and is not a directory (nothing written)")


@dataclass
class _EditFinder:
    """Finds the triplets to rescale: each batch analysed as :func:`lorafft.scan` analyses it (same loader, base
    basis, start block and per-batch random stream), then the chosen intruders' triplets recomputed in fp64."""

    settings: options.ScanOptions
    lam: float
    which: str
    reader: BaseCache | None
    backend: str | None

    def find(self, loader: loading.BatchLoader, batches: list[list[Pair]], progress: bool):
        """``({name: _Edit}, [MatrixIntervention])``: edits only for matrices with something to rescale."""
        from tqdm.auto import tqdm

        edits, matrices = {}, []
        with tqdm(total=sum(map(len, batches)), unit="matrix", disable=not progress, desc="lorafft intervene") as bar:
            for position, loaded in loader.batches(batches):
                self._batch(position, loaded, edits, matrices)
                bar.update(len(loaded.pairs[0]))
        return edits, matrices

    def _batch(self, position: int, loaded: loading.LoadedBatch, edits: dict, matrices: list) -> None:
        settings, eps = self.settings, self.settings.eps[0]
        batch, (entry,), (columns,) = loaded.pairs[0], loaded.tuned, loaded.columns
        generator = torch.Generator().manual_seed(settings.seed + 7919 * position)
        basis = batch_basis(loaded.W0, loaded.stored, [pair.name for pair in batch], self.reader)
        Wt, update = (None, entry) if isinstance(entry, linalg.LowRank) else (entry, None)
        result = analysis.analyze(loaded.W0, Wt, lora=update, k=settings.k, eps=settings.eps, start=columns,
                                  tol=settings.tol, generator=generator, basis=basis, backend=self.backend)["left"]
        intruders = [torch.nonzero(result.max_cos[index] < eps).flatten().tolist() for index in range(len(batch))]
        chosen = [ranks[:1] if self.which == "top" else ranks for ranks in intruders]
        rows = [index for index, ranks in enumerate(chosen) if ranks]
        triplets = self._triplets(loaded, basis, rows, columns, generator) if rows else None
        for index, pair in enumerate(batch):
            ranks = chosen[index]
            matrix = MatrixIntervention(pair.name, pair.tuned_name, tuple(pair.shape), intruders=len(intruders[index]))
            if pair.adapter is not None:
                r = pair.adapter.lora_A.shape[0]
                matrix.lora_rank = [r, r + (len(ranks) if self.lam != 1 else 0)]
            matrices.append(matrix)
            if not ranks:
                continue
            row = rows.index(index)
            S = triplets.S[row, ranks]
            _check_agreement(pair, ranks, S, result.singular_values[index, ranks], result.error_bound[index])
            for j, sigma in zip(ranks, S.tolist()):
                matrix.rescaled.append(RescaledDimension(j, float(result.max_cos[index, j]), sigma, self.lam * sigma))
            edits[pair.name] = _Edit(pair, triplets.U[row][:, ranks], S, triplets.V[row][:, ranks])

    def _triplets(self, loaded: loading.LoadedBatch, basis, rows: list[int], columns, generator) -> linalg.TruncatedSVD:
        """Top-k singular triplets of the tuned matrices ``rows`` of the batch in fp64, certified to TRIPLET_TOL,
        started as ``analyze`` starts (:func:`lorafft.analysis.start_block`), so a few iterations suffice."""
        guesses, block = analysis.start_block(basis, self.settings.k, columns)
        entry = loaded.tuned[0]
        if isinstance(entry, linalg.LowRank):
            W, low_rank = loaded.W0[rows].double(), linalg.LowRank(entry.B[rows], entry.A[rows], entry.scale[rows])
        else:
            W, low_rank = entry[rows].double(), None
        return linalg.truncated_svd(W, self.settings.k, start=guesses[rows], block_size=block, tol=TRIPLET_TOL,
                                    generator=generator, low_rank=low_rank)


def _check_agreement(pair, ranks, S, S_analysis, error_bound) -> None:
    """The fp64 triplets must be the ones ``analyze`` classified: same σ_j (to the fp32 analysis' accuracy)."""
    scale = float(S_analysis.abs().max())
    if not torch.allclose(S, S_analysis, rtol=0, atol=_SIGMA_AGREEMENT * max(scale, 1e-300)):
        raise RuntimeError(f"{pair.name}: fp64 singular values {S.tolist()} disagree with the analysis' "
                           f"{S_analysis.tolist()} (please report this)")
    for j in ranks:
        if not math.isfinite(float(error_bound[j])):
            warnings.warn(f"{pair.name}: singular value σ{j} is not separated from its neighbours, so its "
                          f"singular vector (the rescaled intruder) is one of several equally valid choices",
                          stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# Writing a PEFT adapter


def _write_adapter(adapter: io.Adapter, base_checkpoint: io.Checkpoint, edits: dict[str, _Edit], lam: float,
                   directory: str, matrices: list[MatrixIntervention]) -> list[str]:
    """Write the adapter with every edit applied (module docstring); return the file names written."""
    config = json.loads(json.dumps(adapter.config))  # a deep copy; every field kept
    use_rslora = bool(config.get("use_rslora", False))
    base_index = pairing.NameIndex(base_checkpoint.names())
    modules, _ = adapters.module_parts(adapter.tensors, use_dora=bool(config.get("use_dora")))  # key -> {role: name}
    key_of = {base_index.resolve(key + ".weight"): key for key in modules}
    tensors = {name: adapter.tensors.get(name) for name in adapter.tensors.names()}
    if not adapter.tensors.file_of(next(iter(tensors))).endswith(".safetensors"):
        tensors = {name: t.clone() for name, t in tensors.items()}  # .bin tensors may share storage
    original_r = config["r"]
    original_alpha = config["lora_alpha"]
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}

    def old_rank_alpha(key):
        return (adapters.pattern_value(rank_pattern, key, original_r),
                adapters.pattern_value(alpha_pattern, key, original_alpha))

    entries = {}  # PEFT key -> (r, alpha)
    for name, edit in edits.items() if lam != 1 else ():
        module, key = edit.pair.adapter, key_of[name]
        roles = modules[key]
        r, alpha = old_rank_alpha(key)
        base_weight = base_checkpoint.get(name) if module.magnitude is not None else None
        lora_a, lora_b, magnitude = _extended_factors(module, edit, lam, tensors[roles["A"]], tensors[roles["B"]],
                                                      base_weight)
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

    from safetensors.torch import save_file

    save_file({name: t.contiguous() for name, t in tensors.items()}, os.path.join(directory, _ADAPTER_WEIGHTS),
              metadata=_safetensors_metadata(adapter.tensors.file_of(next(iter(tensors)))))
    with open(os.path.join(directory, adapters.ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    skip = {adapters.ADAPTER_CONFIG, _ADAPTER_WEIGHTS, "adapter_model.bin"}
    return [adapters.ADAPTER_CONFIG, _ADAPTER_WEIGHTS] + _copy_other_files(adapter.path, directory, skip)


def _extended_factors(module: adapters.LoraModule, edit: _Edit, lam: float, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, base_weight: torch.Tensor | None):
    """``(A' [r+c, in], B' [out, r+c], m' [out] or None)`` with s·B'·A' = s·B·A + (λ−1)·Σ u_j σ_j v_jᵀ (DoRA:
    divided row-wise by D = m/‖V‖, and m' = D·‖V'‖), all in PEFT's B·A orientation ``[out, in]``. ``base_weight``
    (W0 as stored) is needed for DoRA only."""
    U, V = (edit.V, edit.U) if module.embedding else (edit.U, edit.V)  # embeddings are analysed as stored, [in, out]
    coefficient = (abs(lam - 1) * edit.S / module.scaling).sqrt()  # [c]
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


# ---------------------------------------------------------------------------------------------------------------
# Writing a full checkpoint


@dataclass
class _Layout:
    """A safetensors checkpoint's files: ``shards`` (path -> tensor names), the ``index`` path or None, and the
    ``directory`` whose other files are copied (None when the input was a single file or an index)."""

    shards: dict[str, list[str]]
    index: str | None
    directory: str | None


def _safetensors_layout(checkpoint: io.Checkpoint, source: str) -> _Layout:
    shards: dict[str, list[str]] = {}
    for name in checkpoint.stored_names():
        shards.setdefault(checkpoint.file_of(name), []).append(name)
    other = sorted(file for file in shards if not file.endswith(".safetensors"))
    if other:
        raise InputError(other[0], "intervene rewrites only safetensors checkpoints (a .bin one would change "
                                   "format and file names); convert it to safetensors first")
    if os.path.isdir(source):
        index = os.path.join(source, _INDEX)
        return _Layout(shards, index if os.path.isfile(index) else None, source)
    return _Layout(shards, source if source.endswith(".json") else None, None)


def _write_checkpoint(checkpoint: io.Checkpoint, layout: _Layout, edits: dict[str, _Edit], lam: float,
                      directory: str) -> list[str]:
    """Write every shard (copied, or rewritten with its edited tensors), the index and the other files."""
    from safetensors.torch import load_file, save_file

    by_tuned_name = {edit.pair.tuned_name: edit for edit in edits.values()} if lam != 1 else {}
    written = []
    for shard, names in layout.shards.items():
        target = os.path.join(directory, os.path.basename(shard))
        changed = [name for name in names if name in by_tuned_name]
        if not changed:
            shutil.copyfile(shard, target)
        else:
            checkpoint.release(shard)
            tensors = load_file(shard)
            for name in changed:
                tensors[name] = _rescaled(tensors[name], by_tuned_name[name], lam)
            save_file(tensors, target, metadata=_safetensors_metadata(shard))
            del tensors
        written.append(os.path.basename(shard))
    if layout.index is not None:
        shutil.copyfile(layout.index, os.path.join(directory, os.path.basename(layout.index)))
        written.append(os.path.basename(layout.index))
    if layout.directory is not None:
        written += _copy_other_files(layout.directory, directory, set(written))
    return written


def _rescaled(stored: torch.Tensor, edit: _Edit, lam: float) -> torch.Tensor:
    """W' = Wt + (λ−1)·U diag(S) Vᵀ in fp64, rounded once to the stored dtype (full fine-tunes are analysed as
    stored, so the triplets are in the storage orientation)."""
    assert not edit.pair.transposed
    W = stored.double()
    W.addmm_(edit.U * edit.S, edit.V.T, alpha=lam - 1)
    return W.to(stored.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Files


def _safetensors_metadata(file: str) -> dict[str, str] | None:
    """A safetensors file's ``__metadata__`` (``{"format": "pt"}`` for other formats, as transformers writes it)."""
    if not file.endswith(".safetensors"):
        return {"format": "pt"}
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return f.metadata()


def _copy_other_files(source: str, directory: str, skip: set[str]) -> list[str]:
    """Copy the regular files of ``source`` not in ``skip`` into ``directory``; other weight files and
    subdirectories are left out with one warning (they would carry the unmodified weights)."""
    copied, left_out = [], []
    for entry in sorted(os.listdir(source)):
        path = os.path.join(source, entry)
        if entry in skip or entry == RECORD:
            continue
        if not os.path.isfile(path) or _WEIGHT_FILE.search(entry):
            left_out.append(entry)
            continue
        shutil.copyfile(path, os.path.join(directory, entry))
        copied.append(entry)
    if left_out:
        warnings.warn(f"{source}: not copied to the output (other weights or subdirectories): "
                      f"{', '.join(left_out[:5])}" + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""),
                      stacklevel=3)
    return copied


def _publish(temporary: str, out_dir: str) -> None:
    """Rename the finished temporary directory to ``out_dir`` (which may exist only as an empty directory)."""
    try:
        os.rename(temporary, out_dir)
    except OSError as e:
        raise InputError(out_dir, f"cannot create the output directory: {e.strerror or e} (nothing written)") from e
