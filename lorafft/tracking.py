"""Intruder dimensions of a model while it trains: the scan's rows for the live weights, step after step.

A :class:`Tracker` holds a torch module that is being trained: a PEFT LoRA model, whose base weights W0 are frozen
in the model and whose updates ΔW = s·B·A are read from the live LoRA modules and kept factored (DoRA merged as
PEFT merges it), or a plain model, whose weights at creation are snapshotted as W0. Each tracked matrix's complete
base basis (the paper's x_i) is computed once (at creation, or by :meth:`Tracker.prepare`), or read from a
``lorafft cache build`` directory, and kept explicit: fp64 for ``min(m, n) <= DENSE_SVD_MAX``, fp32 above (as a
base cache holds it).
:meth:`Tracker.step` then analyses the current weights as :func:`lorafft.scan` analyses a saved checkpoint (the same
:class:`lorafft.recipe.Recipe`: same rows, same certificate), warm: a LoRA update in its base's coordinates
(:mod:`lorafft.updating`) from the previous tracked step's vectors there, at every size; anything else by the
scan's Krylov iteration (or dense top-k) started from the previous step's top vectors and the adapter's B columns.
:meth:`Tracker.report` is a :class:`~lorafft.report.Report` with one checkpoint per tracked step (``"step N"``),
drawn by ``lorafft plot`` like a scan of a run's checkpoints.
"""

from __future__ import annotations

import dataclasses

import torch

from lorafft import adapters, io, linalg, loading, memory, pairing
from lorafft.cache import BaseCache
from lorafft.errors import InputError
from lorafft.io import hub
from lorafft.io.checkpoint import all_finite
from lorafft.options import ScanOptions
from lorafft.recipe import Recipe
from lorafft.pairing import Pair
from lorafft.report import MatrixRow, Report, eps_key, matrix_rows, timestamp, versions

STEP_PREFIX = "step "  # a tracked step's checkpoint label in a report: "step 100"


@dataclasses.dataclass
class _Tracked:
    """One tracked matrix: its report name, analysed shape ``[out, in]``, and where its weights live: a PEFT LoRA
    layer (``layer``, with ``adapter``) or a plain model's parameter (``parameter``, with its snapshot W0)."""

    name: str
    shape: tuple[int, int]
    stored: torch.Tensor  # W0 as stored in the model ([in, out] for a Conv1D): the cache fingerprint reads it
    layer: torch.nn.Module | None = None
    adapter: str | None = None
    parameter: torch.nn.Parameter | None = None

    def pair(self, device=None) -> Pair:
        """The scan's view of this matrix now: a Pair whose adapter holds the live LoRA factors (on ``device``;
        not copied when they are there already)."""
        if self.layer is None:
            return Pair(self.name, self.name, self.shape)
        layer, adapter = self.layer, self.adapter
        dora = layer.use_dora.get(adapter, False) if isinstance(getattr(layer, "use_dora", None), dict) else False
        module = adapters.LoraModule(
            base_name=self.name,
            lora_A=layer.lora_A[adapter].weight.detach().to(device),
            lora_B=layer.lora_B[adapter].weight.detach().to(device),
            scaling=float(layer.scaling[adapter]),
            fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
            magnitude=layer.lora_magnitude_vector[adapter].weight.detach().to(device) if dora else None,
            embedding=False,
        )
        return Pair(self.name, self.name, self.shape, module)


@dataclasses.dataclass
class _Batch:
    """Tracked matrices of one shape (a scan's batch), analysed together: ``W0 [L, m, n]`` in the analysed
    orientation on the tracker's device (fp64 when ``min(m, n) <= DENSE_SVD_MAX``, else fp32), their base basis,
    and the last tracked step's top vectors, in the form the next step starts from."""

    matrices: list[_Tracked]
    W0: torch.Tensor
    basis: linalg.BaseBasis | None = None  # computed by Tracker.prepare
    previous: torch.Tensor | None = None  # [L, m, k] the last step's left vectors (the Krylov start)
    coordinates: torch.Tensor | None = None  # [L, s, k + 1] the last step's vectors in the base's coordinates
    trail: tuple | None = None  # the last step's (side, in coordinates?, top-k vectors): the rows' cos_previous


class Tracker:
    """Follow the intruder dimensions (Shuttleworth et al. 2410.21228) of a model's weight matrices during training.

    Args:
        model: a PEFT model with LoRA adapters (one active adapter; its LoRA ``Linear``/``Conv1D`` layers are
            tracked) or a plain torch module (its 2-D weights are tracked against a snapshot taken now).
        k, eps, side, include, exclude: as in :func:`lorafft.scan` (regexes are searched in the report names).
        device: where the base bases live and the analysis runs ("cpu", "cuda:0", ...); default the device of the
            model's first tracked weight. Held there per matrix (``s = min(m, n)``): W0, the smaller side's basis,
            its σ and W0's row norms: in fp32, ``4 (m n + s²)`` bytes, for ``s > 512``; in fp64 with the base's fp64
            Gram matrix, ``8 (m n + 2 s²)`` bytes, for ``s <= 512`` (a base cache's bases stay fp32); and the last
            step's vectors, ``8 (m + s) (k + 1)`` bytes.
        base_cache: a ``lorafft cache build`` directory of the base model: bases found there are read, not
            computed, and matrices are named by the cache's names (as a scan against that base names them).
        tol, seed: as in :func:`lorafft.scan`.
        warm_start: start each step from the previous step's vectors (off: every step is analysed as a scan
            analyses a saved checkpoint, from scratch; for measuring what that saves).
        options: a :class:`lorafft.options.ScanOptions`, as :func:`lorafft.scan` takes it; the keyword arguments
            override it when given.
        prepare: compute the base bases now (default); False leaves that to :meth:`prepare` or the first
            :meth:`step` (a plain model's weights are snapshotted now either way).

    Matrices are named as a scan of a saved adapter (or full checkpoint) names them: by the base checkpoint's tensor
    names. The base checkpoint is the one the model was loaded from (a PEFT model's ``base_model_name_or_path``, else
    transformers' ``name_or_path``), when it is on disk or in the local Hub cache (nothing is downloaded): the model's
    parameter name without PEFT's ``base_model.model.`` and ``base_layer.`` is resolved against its names tolerantly of
    prefixes, as a scan pairs them (``bert.encoder.layer.0.attention.self.query.weight`` of a
    ``BertForSequenceClassification`` is ``encoder.layer.0.attention.self.query.weight`` of a ``BertModel``
    checkpoint). With ``base_cache``, the cache's names; with neither, the model's own.

    Each step's rows also carry ``cos_previous``, the cosines between the previous tracked step's top-k vectors and
    this step's (``warm_start`` only): what :func:`lorafft.plots.trajectory.tracked_trajectory` follows an intruder
    back through the run with.

    Raises InputError when nothing is in scope, or when a plain model's weights cannot be snapshotted (on the meta
    device, or partitioned away as DeepSpeed ZeRO-3 does).
    """

    def __init__(self, model: torch.nn.Module, k: int | None = None, eps=None, include=None, exclude=None,
                 side: str | None = None, device=None, base_cache=None, tol: float | None = None,
                 seed: int | None = None, warm_start: bool = True, prepare: bool = True,
                 options: ScanOptions | None = None):
        given = dict(k=k, eps=eps, side=side, include=include, exclude=exclude, tol=tol, seed=seed,
                     base_cache=base_cache)
        self.settings = (options or ScanOptions()).replace(
            **{name: value for name, value in given.items() if value is not None})  # validated as a scan's are
        self.sides, self.eps, self.warm_start = self.settings.sides, self.settings.eps, warm_start
        reader = None if self.settings.base_cache is None else BaseCache(self.settings.base_cache)
        self.recipe = Recipe(self.settings, cache_in=reader)
        scope = pairing.Scope(self.settings.include, self.settings.exclude)
        names = _checkpoint_names(model) if reader is None else pairing.NameIndex(reader.names)
        lora = _lora_layers(model)
        tracked = _lora_matrices(lora, scope, names) if lora else _snapshot_matrices(model, scope, names)
        if not tracked:
            raise InputError(type(model).__name__, "no weight matrix in scope to track" + (
                "" if lora else " (no PEFT LoRA layers, and no 2-D weight admitted by include/exclude)"))
        self.kind = "lora" if lora else "full"
        self.base = f"{type(model).__name__} " + ("(PEFT base weights)" if lora else "(weights at tracker creation)")
        self.device = torch.device(device) if device is not None else tracked[0].stored.device
        self.options = {**self.settings.record(), "tracking": True}
        self.batches = []
        plan = memory.Plan(device=self.device.type, sources=(("lora", 64) if lora else ("full", 4),), k=self.settings.k)
        for group in pairing.shape_batches(tracked, lambda shape: memory.batch_size(
                shape, self.settings.max_batch_bytes, plan)):  # cut as a scan cuts its batches
            pairs = [t.pair() for t in group]
            W0 = torch.stack([loading.oriented(t.stored, p) for t, p in zip(group, pairs)])
            W0 = W0.to(self.device, torch.float64 if min(W0.shape[1:]) <= linalg.DENSE_SVD_MAX else torch.float32)
            self.batches.append(_Batch(group, W0))
        self.rows: dict[int, list[MatrixRow]] = {}
        if prepare:
            self.prepare()

    def prepare(self) -> None:
        """Compute (or read from the base cache) every tracked matrix's base basis, if not done yet: the tracker's
        one expensive set-up (``IntruderCallback(background=True)`` runs it in its worker thread)."""
        for batch in self.batches:
            if batch.basis is None:
                loaded = self._loaded(batch, None, None, None)
                if self.recipe.cache_in is not None:
                    loaded.cached = self.recipe.cache_in.read(loaded.batch, loaded.stored)
                batch.basis = _explicit(self.recipe.basis(loaded))

    def capture(self) -> list[tuple]:
        """The tracked weights as they are now, copied, for :meth:`step` to analyse later (say, in another thread
        while training goes on): per batch, the LoRA updates kept factored (``linalg.LowRank``, r (m + n) numbers
        per matrix) or the dense tuned matrices (a plain model, DoRA), and the adapter's B columns."""
        captured = []
        with torch.no_grad():
            for batch in self.batches:
                pairs = [t.pair(self.device) for t in batch.matrices]
                for tracked, pair in zip(batch.matrices, pairs):
                    _check_finite(tracked, pair)
                update = loading.adapter_update(pairs) if self.kind == "lora" else None  # stacked: copies
                Wt = None if update is not None else torch.stack(
                    [_tuned(t, p, w0) for t, p, w0 in zip(batch.matrices, pairs, batch.W0)])
                captured.append((pairs, update, Wt, loading.adapter_columns(pairs) if self.kind == "lora" else None))
        return captured

    def step(self, step: int, captured: list[tuple] | None = None) -> list[MatrixRow]:
        """Analyse the weights as they are now (or as :meth:`capture` copied them) and keep the rows under
        training step ``step``.

        Returns the rows of a :func:`lorafft.scan` of the same weights (one per matrix and side, same fields and
        certificate), with ``checkpoint`` holding ``step``; :meth:`report` renumbers them. Steps must be analysed
        in training order for the warm starts to help (any order gives the same rows).
        """
        captured = self.capture() if captured is None else captured
        self.prepare()
        rows = []
        with torch.no_grad():
            for index, (batch, entry) in enumerate(zip(self.batches, captured)):
                batch_rows = self._analyse(batch, index, step, *entry)
                _chain(batch, batch_rows)
                rows.extend(batch_rows)
        self.rows[int(step)] = rows
        return rows

    def _analyse(self, batch: _Batch, index: int, step: int, pairs, update, Wt, B) -> list[MatrixRow]:
        """One batch's rows at ``step``, by the scan's recipe, warm-started from the previous step: a LoRA update in
        the base's coordinates from the previous coordinates, anything else (and the fallbacks) by Krylov from the
        previous step's top vectors, then the B columns."""
        Wt = None if Wt is None else Wt.to(self.device)
        update = None if update is None else update.to(self.device)
        loaded = self._loaded(batch, pairs, update if update is not None else Wt, B)
        warm = self.warm_start
        sides = tuple(dict.fromkeys(("left", *self.sides) if warm else self.sides))  # left vectors start the next
        results = self.recipe.analyse(loaded, 0, batch.basis, sides=sides,
                                      start=batch.previous if warm else None,
                                      previous=batch.coordinates if warm else None)
        batch.previous = results["left"].vectors if warm else None
        batch.coordinates = results["left"].coordinates if warm else None
        return matrix_rows(pairs, {side: results[side] for side in self.sides}, step)

    def _loaded(self, batch: _Batch, pairs, tuned, columns) -> loading.LoadedBatch:
        """The batch as the recipe takes a loaded one: W0 on the tracker's device and the step's tuned weights."""
        pairs = pairs or [t.pair() for t in batch.matrices]
        everything = list(range(len(pairs)))
        return loading.LoadedBatch(batch=pairs, pairs=[pairs], rows=[everything],
                                   stored=[t.stored for t in batch.matrices], W0=batch.W0, tuned=[tuned],
                                   columns=[None if columns is None else columns.to(self.device)], scales=[None])

    def restore(self, rows: list[MatrixRow]) -> None:
        """Keep rows tracked earlier (a resumed run's journal), ``checkpoint`` holding their step."""
        for row in rows:
            self.rows.setdefault(row.checkpoint, []).append(row)

    def forget_after(self, step: int) -> None:
        """Drop the rows of steps after ``step`` (a run resumed from that step tracks them again)."""
        self.rows = {s: rows for s, rows in self.rows.items() if s <= step}

    def report(self) -> Report:
        """The trajectory: one checkpoint per tracked step, in step order (``inputs.tuned = ["step N", ...]``)."""
        steps = sorted(self.rows)
        rows = [dataclasses.replace(row, checkpoint=c) for c, s in enumerate(steps) for row in self.rows[s]]
        inputs = {"base": self.base, "tuned": [f"{STEP_PREFIX}{s}" for s in steps],
                  "tuned_kind": [self.kind] * len(steps)}
        return Report(eps=self.eps, rows=rows, inputs=inputs, options=dict(self.options), versions=versions(),
                      created=timestamp())


def intruder_metrics(rows: list[MatrixRow], eps) -> dict[str, int]:
    """Scalars for a training logger: ``intruders/eps=0.5`` (total over the rows) and ``intruders/eps=0.5/query``
    per module type (the shortest suffix of the module path that tells it apart from the other tracked paths:
    ``query``, ``attention.output.dense``); with both sides, ``intruders/left/eps=0.5`` and so on."""
    short = _short_names({row.module for row in rows})
    sides = {row.side for row in rows}
    metrics = {}
    for row in rows:
        prefix = "intruders" if len(sides) == 1 else f"intruders/{row.side}"
        for e in eps:
            key = f"{prefix}/eps={eps_key(e)}"
            for name in (key, f"{key}/{short[row.module]}"):
                metrics[name] = metrics.get(name, 0) + row.counts[eps_key(e)]
    return metrics


def _short_names(paths: set[str]) -> dict[str, str]:
    """Each module path's shortest dot-suffix that no other path shares at that length (else the whole path)."""
    short = {}
    for path in paths:
        parts = path.split(".")
        for length in range(1, len(parts) + 1):
            suffix = parts[-length:]
            if not any(other != path and other.split(".")[-length:] == suffix for other in paths):
                break
        short[path] = ".".join(suffix)
    return short


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """PEFT LoRA layers (``lora_A``, ``scaling``, ``get_base_layer``) as ``(name without PEFT's prefix, layer)``."""
    return [(name.removeprefix(adapters.BASE_PREFIX), module) for name, module in model.named_modules()
            if hasattr(module, "lora_A") and hasattr(module, "scaling") and hasattr(module, "get_base_layer")]


def _checkpoint_names(model: torch.nn.Module) -> pairing.NameIndex | None:
    """The tensor names of the checkpoint ``model`` was loaded from (a PEFT model's ``base_model_name_or_path``, else
    transformers' ``name_or_path``) when it is a local checkpoint or in the local Hub cache, else None: the names a
    scan of the model's adapter (or of a fine-tune saved from it) against that base gives."""
    configs = getattr(model, "peft_config", None)
    config = configs.get(getattr(model, "active_adapter", None)) if isinstance(configs, dict) else None
    source = getattr(config, "base_model_name_or_path", None) or getattr(model, "name_or_path", None)
    path = hub.cached(source) if isinstance(source, str) and source else None
    if path is None or io.is_adapter(path):
        return None
    try:
        with io.open_checkpoint(path) as checkpoint:
            return pairing.NameIndex(checkpoint.names())
    except InputError:  # not a checkpoint lorafft reads: the model's own names
        return None


def _chain(batch: _Batch, rows: list[MatrixRow]) -> None:
    """Set each row's ``cos_previous`` (the cosines ``[k, k]`` between the batch's top-k vectors at its previous
    tracked step and now) and keep this step's vectors for the next: the ones the warm start keeps, the left vectors
    ``[L, m, k]`` of a step analysed as a scan, or the small side's coordinates in the base basis ``[L, s, k + 1]``
    (two steps in coordinates need only their product: the basis is orthonormal to its own precision).
    A step whose vectors are of the other side, or none (``warm_start=False``), breaks the chain (``cos_previous``
    stays None)."""
    k = rows[0].k
    if batch.coordinates is not None:
        now = (batch.basis.small_side, True, batch.coordinates[..., :k])
    else:
        now = None if batch.previous is None else ("left", False, batch.previous[..., :k])
    before = batch.trail
    if now is not None and before is not None and before[0] == now[0]:
        if before[1] and now[1]:
            cosines = before[2].mT @ now[2]
        else:
            cosines = _in_space(batch, before).mT @ _in_space(batch, now)
        position = {tracked.name: index for index, tracked in enumerate(batch.matrices)}
        for row in rows:
            row.cos_previous = torch.round(cosines[position[row.name]], decimals=6).tolist()
    batch.trail = now


def _in_space(batch: _Batch, kept: tuple) -> torch.Tensor:
    """A step's kept top-k vectors ``(side, in coordinates, tensor)`` as vectors of that side, ``[L, d, k]`` fp64."""
    _, in_coordinates, vectors = kept
    return (batch.basis.small_vectors(vectors) if in_coordinates else vectors).double()


def _report_name(name: str, names: pairing.NameIndex | None) -> str:
    """The base tensor name a scan would give: the base checkpoint's (or base cache's) name for the model's ``name``
    when ``names`` has one, else the model's."""
    resolved = None if names is None else names.resolve(name)
    return name if resolved is None else resolved


def _lora_matrices(layers, scope: pairing.Scope, names) -> list[_Tracked]:
    """The LoRA ``Linear``/``Conv1D`` layers in scope that hold the active adapter (embedding and convolution
    LoRA layers, and quantized base weights, are not tracked). InputError for adapters merged into the base."""
    tracked = []
    for name, layer in layers:
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        weight = getattr(layer.get_base_layer(), "weight", None)
        if not active or weight is None or weight.dim() != 2 or not weight.is_floating_point():
            continue
        if len(active) > 1:
            raise InputError(name, f"LoRA layer has several active adapters ({', '.join(active)}); track one")
        if getattr(layer, "merged", False):
            raise InputError(name, "the LoRA update is merged into the base weight (merge_adapter()): unmerge it "
                                   "to track, the base weight is the reference")
        report_name = _report_name(name + ".weight", names)
        if scope.admits(report_name):
            A, B = layer.lora_A[active[0]].weight, layer.lora_B[active[0]].weight
            tracked.append(_Tracked(report_name, (B.shape[0], A.shape[1]), weight.detach(), layer, active[0]))
    return tracked


def _snapshot_matrices(model: torch.nn.Module, scope: pairing.Scope, names) -> list[_Tracked]:
    """Every 2-D floating weight in scope, its current value snapshotted (cloned) as W0, analysed as stored."""
    tracked = []
    for name, parameter in model.named_parameters():
        report_name = _report_name(name, names)
        if parameter.dim() != 2 or not parameter.is_floating_point() or not scope.admits(report_name):
            continue
        if parameter.is_meta or parameter.numel() == 0:
            raise InputError(name, "the model has no PEFT LoRA adapters and this weight is not materialized here "
                                   "(meta device, or partitioned as by DeepSpeed ZeRO-3): no base snapshot possible")
        stored = parameter.detach().clone()
        tracked.append(_Tracked(report_name, tuple(stored.shape), stored, parameter=parameter))
    return tracked


def _explicit(basis: linalg.BaseBasis) -> linalg.BaseBasis:
    """The basis with its small side's vectors explicit, so that every step's coordinates are one product: fp64
    (``"explicit64"``, with the fp64 Gram matrix the dense top-k of small matrices uses) for ``s <= DENSE_SVD_MAX``,
    fp32 (``"explicit32"``, 4 s² bytes instead of 16 s² for reflectors and eigenvectors in fp64) above, as a base
    cache holds it; the update path certifies either on the matrix itself."""
    if basis.kind == "explicit32" or (basis.kind == "explicit64" and basis.gram is not None):
        return basis
    small = basis.sigma.shape[-1] <= linalg.DENSE_SVD_MAX and basis.gram is not None
    Z = basis.top_vectors(basis.small_side, basis.sigma.shape[-1])
    return dataclasses.replace(basis, Z=Z if small else Z.float(), kind="explicit64" if small else "explicit32",
                               reflectors=None, tau=None, row_norms=basis.base_rows())


def _check_finite(tracked: _Tracked, pair: Pair) -> None:
    """InputError naming the matrix when its live weights (a plain model's, or the LoRA factors and DoRA magnitude)
    hold NaN or Inf: training diverged, and no singular vector is defined."""
    module = pair.adapter
    live = [tracked.parameter] if module is None else [module.lora_A, module.lora_B, module.magnitude]
    if not all(all_finite(t.detach()) for t in live if t is not None):
        raise InputError(tracked.name, "the weights hold NaN or Inf now (training diverged?): no singular vectors "
                                       "to track")


def _tuned(tracked: _Tracked, pair: Pair, W0: torch.Tensor) -> torch.Tensor:
    """The current tuned matrix, analysed orientation, fp32: a plain model's live weight, or a LoRA layer's
    weight merged the way PEFT merges it (DoRA) onto ``W0``."""
    if tracked.parameter is not None:
        return tracked.parameter.detach().float().to(W0.device)
    return loading.merged(pair, W0)
