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
adapters, the LoRA B columns, or the dense fp64 top-k for small matrices; error bound ``TRIPLET_TOL`` per vector, a
warning where it is not met), on W0 + s·B·A kept factored for an adapter, on the fp32 Wt of a full fine-tune.

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

import functools
import math
import os
import warnings
from dataclasses import asdict, dataclass, field

import torch

from lorafft import adapters, analysis, distributed, io, linalg, loading, memory, pairing
from lorafft import options as options_module
from lorafft.cache import BaseCache
from lorafft.errors import InputError
from lorafft.io import hub, writer
from lorafft.io.checkpoint import all_finite
from lorafft.pairing import Pair
from lorafft.recipe import Recipe
from lorafft.report import timestamp

TRIPLET_TOL = 1e-8  # certified error bound of each rescaled singular vector (fp64 iteration)
RECORD = "lorafft_intervention.json"
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
    """What :func:`intervene` did: options, one :class:`MatrixIntervention` per matrix in scope, files written.
    ``base``/``tuned`` are the paths read (a Hub cache snapshot folder for a Hub id); ``inputs`` how they were found,
    as a scan report's ``inputs`` (``base_from``, ``hub``; :attr:`lorafft.io.hub.Located.record`), empty for paths."""

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
    inputs: dict = field(default_factory=dict)

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
    revision: str | None = None,
    which: str = "top",
    eps: float | None = None,
    k: int | None = None,
    include=None,
    exclude=None,
    embeddings: bool | None = None,
    tol: float | None = None,
    seed: int | None = None,
    max_batch_bytes: int | None = None,
    base_cache=None,
    device=None,
    backend: str | None = None,
    progress: bool = False,
    options: options_module.ScanOptions | None = None,
) -> InterventionSummary:
    """Rescale the intruder dimensions of ``tuned`` (relative to ``base``) by ``lam`` and write the result to
    ``out_dir`` (see the module docstring for the formula and both output formats).

    Args:
        base: the base checkpoint (directory, ``.safetensors``/``.bin`` file, shard index or Hub id). None: the
            base a PEFT adapter ``tuned`` names in its ``adapter_config.json``, as :func:`lorafft.scan` takes it.
        tuned: a PEFT LoRA adapter directory, or a full fine-tune in safetensors (directory, file or index), or
            either as a Hub id.
        out_dir: a new or empty directory (InputError if it holds anything).
        lam: λ ≥ 0, the factor applied to each rescaled singular value.
        revision: branch, tag or commit of every input given as a Hub id (default as in :func:`lorafft.scan`;
            :func:`lorafft.io.hub.locate_inputs`).
        which: ``"top"`` (the highest-ranked intruder per matrix) or ``"all"`` (every intruder among the top k).
        eps, k: the intruder definition (max |cos| < eps, among the top k left singular vectors; the paper: 0.5, 10).
        include, exclude, embeddings: scope, as in :func:`lorafft.scan` (regexes searched in base tensor names).
        tol, seed, max_batch_bytes: the scan's analysis (certified max |cos| error, random starts, memory cap).
        base_cache, device, backend: as in :func:`lorafft.scan` (a ``lorafft cache build`` directory; where and how
            the analysis runs). LoRA updates are kept factored as the scan keeps them.
        progress: a progress bar on stderr.
        options: a :class:`lorafft.options.ScanOptions`, as :func:`lorafft.scan` takes it (its first ε is the
            intervention's); the keyword arguments override it when given.

    Returns an :class:`InterventionSummary`. Raises InputError on bad input or options, and before any analysis
    when a matrix in scope of a full fine-tune is stored FP8-quantized or stacked per expert (it cannot be
    rewritten); nothing is written then.
    """
    given = dict(k=k, eps=eps, include=include, exclude=exclude, embeddings=embeddings, tol=tol, seed=seed,
                 base_cache=base_cache, max_batch_bytes=max_batch_bytes)
    lam = _check_options(lam, which, eps)
    settings = (options or options_module.ScanOptions()).replace(
        **{name: value for name, value in given.items() if value is not None})
    settings = settings.replace(eps=settings.eps[:1])  # one threshold: the intruders rescaled
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out_dir(out_dir)
    if isinstance(tuned, dict):
        raise InputError(io.STATE_DICT, "intervene rewrites files: TUNED must be a checkpoint or adapter on disk")
    located = hub.locate_inputs(base, [tuned], revision=revision)
    base, (tuned,) = located.base, located.tuned
    device = distributed.local_device() if device is None else torch.device(device)
    cache_in = None if base_cache is None else BaseCache(base_cache)
    tuned_source = loading.open_tuned(tuned)
    is_adapter = isinstance(tuned_source, io.Adapter)
    tuned_checkpoint = tuned_source.tensors if is_adapter else tuned_source
    layout = None if is_adapter else writer.checkpoint_files(tuned_checkpoint, os.fspath(tuned))
    scope = pairing.Scope(settings.include, settings.exclude, settings.embeddings)
    with loading.open_base(base) as base_checkpoint, tuned_checkpoint:
        pairs, skipped = pairing.find_pairs(base_checkpoint, tuned_source, scope)
        if not is_adapter:
            _check_rewritable(tuned_checkpoint, pairs)
        recipe = Recipe(settings, backend, cache_in)
        native = linalg.resolve_backend(device, backend) == "triton"
        loader = loading.BatchLoader(base_checkpoint, [tuned_source], [{pair.name: pair for pair in pairs}],
                                     device=device, native=native, read_bases=recipe.read_bases())
        plan = memory.Plan(device=device.type, sources=(("lora", 64) if is_adapter else ("full", 4),),
                           cached=cache_in is not None, k=settings.k, torch_products=not native)
        batches = pairing.shape_batches(pairs, lambda shape: memory.batch_size(shape, settings.max_batch_bytes, plan))
        edits, matrices = _EditFinder(recipe, lam, which).find(loader, batches, progress)
        published = base_checkpoint if is_adapter else tuned_checkpoint  # an adapter is merged in W0's dtype
        _check_lambda(lam, edits, lambda edit: published.dtype(edit.pair.name if is_adapter else edit.pair.tuned_name))
        summary = InterventionSummary(
            base=loading.describe(base), tuned=os.fspath(tuned),
            out_dir=out_dir, tuned_kind="lora" if is_adapter else "full", lam=lam, which=which,
            eps=settings.eps[0], k=settings.k, matrices=matrices, skipped=skipped, files=[],
            created=timestamp(),
            inputs=located.record,
        )
        with writer.new_directory(out_dir) as temporary:
            changed = edits if lam != 1 else {}
            if is_adapter:
                files = _write_adapter(tuned_source, base_checkpoint, changed, lam, temporary)
            else:
                files = _write_checkpoint(tuned_checkpoint, layout, changed, lam, temporary)
            summary.files = sorted(files + [RECORD])
            writer.write_json(os.path.join(temporary, RECORD), summary.to_dict(), indent=1)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Finding the triplets


def _check_options(lam, which, eps) -> float:
    """λ as a float; ``which`` one of ``options.WHICH``; ``eps`` one threshold or None (k, ε's range and the rest:
    ScanOptions)."""
    lam = options_module.scale_factor(lam)
    if which not in options_module.WHICH:
        raise InputError("which", f"must be 'top' or 'all', got {which!r}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        raise InputError("eps", f"must be one threshold in (0, 1], got {eps!r}")
    return lam


def _check_lambda(lam: float, edits: dict[str, _Edit], dtype_of) -> None:
    """InputError when λ·σ_j, a singular value of a published matrix, would overflow the dtype its weights are
    published in (``dtype_of(edit)``: the checkpoint's, or for an adapter its base's, where it is merged), naming
    the largest λ that matrix allows; every entry of a matrix is at most its largest singular value."""
    for edit in edits.values():
        dtype = dtype_of(edit)
        largest = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
        top = float(edit.S.max())
        if lam * top >= largest:
            raise InputError("lambda", f"{lam:g} makes a singular value of '{edit.pair.name}' {lam * top:.3g}, "
                                       f"beyond the largest {str(dtype).removeprefix('torch.')} ({largest:.3g}) "
                                       f"its weights are published in: λ must stay below {largest / top:.3g} there")


def _check_rewritable(checkpoint: io.Checkpoint, pairs: list[Pair]) -> None:
    """InputError, naming its file, for the first paired tensor of a full fine-tune that is a view (FP8-quantized
    or one expert of a stacked tensor): it cannot be written back as it is read."""
    views = [pair.tuned_name for pair in pairs if checkpoint.is_view(pair.tuned_name)]
    if views:
        raise InputError(checkpoint.file_of(views[0]), f"intervene cannot rewrite '{views[0]}': it is stored "
                                                       "FP8-quantized or stacked per expert (leave such tensors "
                                                       "out with --exclude)")


def _check_out_dir(out_dir: str) -> None:
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            raise InputError(out_dir, "output directory exists and is not empty; choose a new one (nothing written)")
    elif os.path.lexists(out_dir):
        raise InputError(out_dir, "output path exists and is not a directory (nothing written)")


@dataclass
class _EditFinder:
    """Finds the triplets to rescale: each batch analysed as :func:`lorafft.scan` analyses it (the same
    :class:`lorafft.recipe.Recipe`), then the chosen intruders' triplets recomputed in fp64 by the same chooser
    (:func:`lorafft.analysis.tuned_top`), started from the vectors the analysis found."""

    recipe: Recipe
    lam: float
    which: str

    def find(self, loader: loading.BatchLoader, batches: list[list[Pair]], progress: bool):
        """``({name: _Edit}, [MatrixIntervention])``: edits only for matrices with something to rescale."""
        from tqdm.auto import tqdm

        edits, matrices = {}, []
        with tqdm(total=sum(map(len, batches)), unit="matrix", disable=not progress, desc="lorafft intervene") as bar:
            for _, loaded in loader.batches(batches):
                self._batch(loaded, edits, matrices)
                bar.update(len(loaded.pairs[0]))
        return edits, matrices

    def _batch(self, loaded: loading.LoadedBatch, edits: dict, matrices: list) -> None:
        batch = loaded.pairs[0]
        basis = self.recipe.basis(loaded)
        result = self.recipe.analyse(loaded, 0, basis, sides=("left",))["left"]
        intruders = [torch.nonzero(result.intruders[index, :, 0]).flatten().tolist() for index in range(len(batch))]
        chosen = [ranks[:1] if self.which == "top" else ranks for ranks in intruders]
        rows = [index for index, ranks in enumerate(chosen) if ranks]
        triplets = self._triplets(loaded, basis, rows, result) if rows else None
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
            _check_agreement(pair, ranks, S, result.singular_values[index, ranks], result.error_bound[index],
                             triplets.error_bound[row])
            for j, sigma in zip(ranks, S.tolist()):
                matrix.rescaled.append(RescaledDimension(j, float(result.max_cos[index, j]), sigma, self.lam * sigma))
            U, V = triplets.U[row][:, ranks], triplets.V[row][:, ranks]
            sign = U.gather(0, U.abs().argmax(dim=0, keepdim=True)).sign()  # u_j's largest entry positive: the
            edits[pair.name] = _Edit(pair, U * sign, S, V * sign)  # same factors whichever path found (u, v) or -(u, v)

    def _triplets(self, loaded: loading.LoadedBatch, basis, rows: list[int], result) -> linalg.TruncatedSVD:
        """Top-k singular triplets of the tuned matrices ``rows`` of the batch in fp64, certified to TRIPLET_TOL, by
        the analysis' own chooser, started from the vectors it found (a few iterations, or one certifying step)."""
        entry, settings = loaded.tuned[0], self.recipe.options
        update = entry.select(rows) if isinstance(entry, linalg.LowRank) else None
        Wt = None if update is not None else linalg.dequantized(entry, loaded.scales[0])[rows].double()
        names = [loaded.pairs[0][row].name for row in rows]
        tuned = analysis.tuned_top(loaded.W0[rows].double(), Wt, k=settings.k,
                                   basis=basis.select(rows), backend="torch", low_rank=update,
                                   start=result.vectors[rows], tol=TRIPLET_TOL,
                                   generator=analysis.matrix_generators(settings.seed, names))
        return tuned.svd


def _check_agreement(pair, ranks, S, S_analysis, error_bound, triplet_bound) -> None:
    """The fp64 triplets must be the ones ``analyze`` classified: same σ_j (to the fp32 analysis' accuracy); a
    warning for each rescaled vector that is not determined (``error_bound [k]`` of the analysis infinite) or
    certified only above TRIPLET_TOL (``triplet_bound [k]``)."""
    scale = float(S_analysis.abs().max())
    if not torch.allclose(S, S_analysis, rtol=0, atol=_SIGMA_AGREEMENT * max(scale, 1e-300)):
        raise RuntimeError(f"{pair.name}: fp64 singular values {S.tolist()} disagree with the analysis' "
                           f"{S_analysis.tolist()} (please report this)")
    for j in ranks:
        if not math.isfinite(float(error_bound[j])):
            warnings.warn(f"{pair.name}: singular value σ{j} is not separated from its neighbours, so its "
                          f"singular vector (the rescaled intruder) is one of several equally valid choices",
                          stacklevel=3)
        elif float(triplet_bound[j]) > TRIPLET_TOL:
            warnings.warn(f"{pair.name}: the rescaled singular vectors of σ{j} are certified to "
                          f"{float(triplet_bound[j]):.1e}, not {TRIPLET_TOL:.0e} (σ{j} lies close to a neighbour)",
                          stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# Writing the output (lorafft.io.writer; the adapter-writing rules are in lorafft.adapters)


def _write_adapter(adapter: io.Adapter, base_checkpoint: io.Checkpoint, edits: dict[str, _Edit], lam: float,
                   directory: str) -> list[str]:
    """Write the adapter with every edit applied (module docstring; :func:`lorafft.adapters.write_adapter`)."""
    triplets = {name: (edit.pair.adapter, edit.U, edit.S, edit.V) for name, edit in edits.items()}
    return adapters.write_adapter(adapter, base_checkpoint, pairing.NameIndex(base_checkpoint.names()), triplets, lam,
                                  directory, leave_out=(RECORD,))


def _write_checkpoint(checkpoint: io.Checkpoint, layout: writer.CheckpointFiles, edits: dict[str, _Edit],
                      lam: float, directory: str) -> list[str]:
    """Write every shard (copied, or rewritten with its edited tensors), the index and the other files."""
    replace = {edit.pair.tuned_name: functools.partial(_rescaled, edit=edit, lam=lam) for edit in edits.values()}
    return writer.copy_checkpoint(checkpoint, layout, directory, replace, leave_out=(RECORD,))


def _rescaled(stored: torch.Tensor, edit: _Edit, lam: float) -> torch.Tensor:
    """W' = Wt + (λ−1)·U diag(S) Vᵀ in fp64, rounded once to the stored dtype (full fine-tunes are analysed as
    stored, so the triplets are in the storage orientation)."""
    assert not edit.pair.transposed
    W = stored.double()
    W.addmm_(edit.U * edit.S, edit.V.T, alpha=lam - 1)
    W = W.to(stored.dtype)
    if not all_finite(W):  # _check_lambda bounds every entry; this is what is published, checked all the same
        raise InputError("lambda", f"{lam:g} leaves non-finite values in '{edit.pair.tuned_name}': nothing written")
    return W
