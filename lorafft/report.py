"""The report: one row per matrix and side, totals per ε, and how it was made (JSON schema 1, CSV, DataFrame).

JSON schema (``schema_version`` 1; documented in the README):

``{"schema_version": 1, "lorafft_version", "created", "inputs": {"base", "tuned": [...], "tuned_kind": [...]},
"options": {...}, "versions": {library: version}, "matrices": [row, ...], "totals": {ε: count},
"totals_by_side": {side: {ε: count}}, "totals_by_checkpoint": [{ε: count}, ...], "skipped": [{"name", "reason"}]}``,
where a row is ``{"name", "tuned_name", "checkpoint", "layer", "module", "shape", "side", "k", "singular_values",
"base_singular_values", "max_cos", "argmax", "error_bound", "near_threshold", "counts": {ε: count}, "random_floor",
"random_reference": {"p5", "p50", "p95", "p99"}, "delta_effective_rank", "delta_stable_rank", "iterations",
"base_rank", "undetermined": {ε: count}, "delta_magnitude", "delta_direction", "outside", "cos_previous"}``. ε keys
are strings (``"0.5"``); ``argmax`` is the 0-based rank of the best-matching base singular vector; ``error_bound`` is
null where the tuned singular value is not separated from its neighbours (that vector is not determined by the
matrix). The JSON Schema is a file of the package, ``lorafft/report.schema.json`` (:data:`SCHEMA_FILE`); every report
read is validated against it (:func:`check_schema`).
"""

from __future__ import annotations

import csv
import datetime
import functools
import importlib.resources
import io
import json
import math
import platform
from dataclasses import dataclass, field

from lorafft.errors import InputError, plural, printable
from lorafft.io.jsonfile import is_int, read_json_object
from lorafft.io.writer import write_atomic
from lorafft.options import eps_key, report_file
from lorafft.pairing import Pair, layer_and_module

SCHEMA_VERSION = 1
SCHEMA_FILE = "report.schema.json"  # in the package, beside this module


def _finite_or_none(values):
    return [v if math.isfinite(v) else None for v in values]


@dataclass
class MatrixRow:
    """One matrix, one side. Lists have length k (tuned singular vectors by descending singular value)."""

    name: str
    tuned_name: str
    checkpoint: int
    layer: int | None
    module: str
    shape: tuple[int, int]
    side: str
    k: int
    singular_values: list[float]
    base_singular_values: list[float]
    max_cos: list[float]
    argmax: list[int]
    error_bound: list[float]
    near_threshold: list[bool]
    counts: dict[str, int]
    random_floor: float
    random_reference: dict[str, float]
    delta_effective_rank: float | None
    delta_stable_rank: float | None
    iterations: int
    base_rank: int | None = None  # numerical rank of W0; below min(shape): undefined base vectors beyond it
    undetermined: dict[str, int] = field(default_factory=dict)  # per ε: left out of counts (analysis._defined_match)
    # DoRA's ΔM and ΔD of the matrix (analysis.magnitude_direction), the same on both sides' rows; None in reports
    # written before they were added, and ΔD None when no row of W0 and Wt is non-zero in both
    delta_magnitude: float | None = None
    delta_direction: float | None = None
    # rank-deficient base only: each y_j's length outside the span of the defined base vectors; y_j is an intruder
    # at ε iff max(max_cos_j, outside_j) < ε (``intruders``); None at full rank, where it is 0
    outside: list[float] | None = None
    # how the tuned top-k were found and certified: "dense", "krylov" or "update" (analysis.tuned_top); None in
    # reports written before it was recorded
    method: str | None = None
    # a Tracker's rows only: [k][k] cosines <y_i at the previous tracked step, y_j now> of one side's vectors (a
    # singular triplet's both vectors share i and j); None at the first step and where the chain broke
    cos_previous: list[list[float]] | None = None

    def intruders(self, eps: float) -> int:
        """The number of intruders at any ``eps`` (``counts`` holds the scan's ε's): y_j with max |cos| < eps that
        no completion of a rank-deficient base basis can reach (see ``outside``)."""
        return sum(self.is_intruder(eps))

    def is_intruder(self, eps: float) -> list[bool]:
        """Per tuned vector y_j, whether it is an intruder at ``eps``: ``max(max_cos_j, outside_j) < eps``."""
        outside = self.outside or [0.0] * len(self.max_cos)
        return [max(value, length) < eps for value, length in zip(self.max_cos, outside)]

    def to_dict(self) -> dict:
        row = dict(self.__dict__)
        row["shape"] = list(self.shape)
        row["error_bound"] = _finite_or_none(self.error_bound)
        return row

    @classmethod
    def from_dict(cls, data: dict) -> MatrixRow:
        """Inverse of :meth:`to_dict` (a null error bound is infinite); ValueError when a per-vector list is not of
        length k, or counts do not name the ε's."""
        row = dict(data)
        row["shape"] = tuple(row["shape"])
        row["error_bound"] = [math.inf if v is None else v for v in row["error_bound"]]
        k = row["k"]
        for name in _PER_VECTOR + (("outside",) if row.get("outside") is not None else ()):
            if not isinstance(row[name], list) or len(row[name]) != k:
                raise ValueError(f"matrix {row['name']!r}: {name} does not hold k = {k} values")
        previous = row.get("cos_previous")
        if previous is not None and not (isinstance(previous, list) and len(previous) == k and all(
                isinstance(line, list) and len(line) == k for line in previous)):
            raise ValueError(f"matrix {row['name']!r}: cos_previous is not k × k = {k} × {k} cosines")
        if not isinstance(row["counts"], dict) or not is_int(row["checkpoint"]):
            raise ValueError(f"matrix {row['name']!r}: counts is not an object, or checkpoint not an index")
        return cls(**row)


_PER_VECTOR = ("singular_values", "base_singular_values", "max_cos", "argmax", "error_bound", "near_threshold")


@dataclass(repr=False)
class Report:
    """Everything a scan found. ``rows`` in scan order; ``eps`` the thresholds swept."""

    eps: tuple[float, ...]
    rows: list[MatrixRow]
    inputs: dict
    options: dict
    versions: dict
    skipped: list[dict] = field(default_factory=list)
    created: str = ""
    profile: dict | None = None  # a profiled scan's {"wall_seconds", "stages": {stage: seconds}} (lorafft.profiling)

    def __repr__(self) -> str:
        """One line: the inputs, how many matrices and sides, the totals per ε (the rows are ``report.rows``)."""
        tuned = self.checkpoints
        shown = repr(tuned[0]) if len(tuned) == 1 else f"[{tuned[0]!r}, ... {len(tuned)} checkpoints]"
        sides = "+".join(sorted({r.side for r in self.rows}))
        return (f"Report(base={self.inputs.get('base')!r}, tuned={shown}, "
                f"{plural(len({r.name for r in self.rows}), 'matrix', 'matrices')} ({sides}), "
                f"totals={self.totals()})")

    @property
    def checkpoints(self) -> list[str]:
        """The tuned inputs, in the order of the rows' ``checkpoint`` index."""
        tuned = self.inputs.get("tuned", [])
        return tuned if isinstance(tuned, list) else [tuned]

    def totals(self, side: str | None = None, checkpoint: int | None = None) -> dict[str, int]:
        """Intruder count per ε summed over rows (of one side and/or one checkpoint, or all rows)."""
        rows = [r for r in self.rows
                if (side is None or r.side == side) and (checkpoint is None or r.checkpoint == checkpoint)]
        return {eps_key(e): sum(r.counts[eps_key(e)] for r in rows) for e in self.eps}

    def to_dict(self) -> dict:
        sides = sorted({r.side for r in self.rows})
        return {
            "schema_version": SCHEMA_VERSION,
            "lorafft_version": self.versions.get("lorafft"),
            "created": self.created,
            "inputs": self.inputs,
            "options": self.options,
            "versions": self.versions,
            "matrices": [r.to_dict() for r in self.rows],
            "totals": self.totals(),
            "totals_by_side": {side: self.totals(side) for side in sides},
            "totals_by_checkpoint": [self.totals(checkpoint=c) for c in range(len(self.checkpoints))],
            "skipped": self.skipped,
            **({"profile": self.profile} if self.profile is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        """Read back a report written by :meth:`to_json` (schema 1; :meth:`load` also checks it against the JSON
        Schema first)."""
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported report schema_version {data.get('schema_version')!r}")
        report = cls(
            eps=tuple(float(e) for e in data["options"]["eps"]),
            rows=[MatrixRow.from_dict(row) for row in data["matrices"]],
            inputs=data["inputs"],
            options=data["options"],
            versions=data["versions"],
            skipped=data.get("skipped", []),
            created=data.get("created", ""),
            profile=data.get("profile"),
        )
        keys, checkpoints = {eps_key(e) for e in report.eps}, len(report.checkpoints)
        for row in report.rows:
            if not keys <= row.counts.keys() or not 0 <= row.checkpoint < checkpoints:
                raise ValueError(f"matrix {row.name!r}: counts miss an ε of options.eps, or checkpoint "
                                 f"{row.checkpoint} is not one of the {checkpoints} tuned inputs")
        return report

    def flat_rows(self) -> list[dict]:
        """The per-matrix table: one dict per row (matrix, side and checkpoint), per-ε counts as ``intruders@ε``
        columns, the per-vector lists as lists (:meth:`to_csv` writes them space-separated). For one row per
        vector, :meth:`vectors`."""
        flat = []
        for r in self.rows:
            entry = {
                "name": r.name,
                "checkpoint": r.checkpoint,
                "layer": r.layer,
                "module": r.module,
                "rows": r.shape[0],
                "cols": r.shape[1],
                "side": r.side,
                "k": r.k,
                **{f"intruders@{key}": count for key, count in r.counts.items()},
                "min_max_cos": min(r.max_cos) if r.max_cos else math.nan,
                "random_floor": r.random_floor,
                "random_p50": r.random_reference.get("p50"),
                "random_p99": r.random_reference.get("p99"),
                "delta_effective_rank": r.delta_effective_rank,
                "delta_stable_rank": r.delta_stable_rank,
                "delta_magnitude": r.delta_magnitude,
                "delta_direction": r.delta_direction,
                "base_rank": r.base_rank,
                **{f"undetermined@{key}": count for key, count in r.undetermined.items()},
                "max_error_bound": max(r.error_bound) if r.error_bound else math.nan,
                "near_threshold": sum(r.near_threshold),
                "max_cos": list(r.max_cos),
                "argmax": list(r.argmax),
                "singular_values": list(r.singular_values),
                "base_singular_values": list(r.base_singular_values),
            }
            flat.append(entry)
        return flat

    def vector_rows(self) -> list[dict]:
        """The per-vector table: one dict per (matrix, side, checkpoint, j), j the 0-based rank of the tuned
        singular vector y_j. Columns: ``name``, ``checkpoint`` (index) and ``tuned`` (that input), ``layer``,
        ``module``, ``side``, ``j``, ``sigma`` (σ_j of Wt), ``base_sigma`` (σ_j of W0), ``max_cos``
        (max_i |<y_j, x_i>|), ``argmax`` (that i), ``error_bound`` (on max_cos; NaN where σ_j is repeated),
        ``near_threshold``, ``outside`` (length outside a rank-deficient base's defined span, else 0) and one boolean
        ``intruder@ε`` per ε of the report (summed over j they give the row's ``counts``)."""
        table = []
        for r in self.rows:
            intruders = {eps_key(e): r.is_intruder(e) for e in self.eps}
            outside = r.outside or [0.0] * len(r.max_cos)
            for j in range(len(r.max_cos)):
                table.append({
                    "name": r.name,
                    "checkpoint": r.checkpoint,
                    "tuned": self.checkpoints[r.checkpoint],
                    "layer": r.layer,
                    "module": r.module,
                    "side": r.side,
                    "j": j,
                    "sigma": r.singular_values[j],
                    "base_sigma": r.base_singular_values[j] if j < len(r.base_singular_values) else math.nan,
                    "max_cos": r.max_cos[j],
                    "argmax": r.argmax[j],
                    "error_bound": r.error_bound[j] if math.isfinite(r.error_bound[j]) else math.nan,
                    "near_threshold": r.near_threshold[j],
                    "outside": outside[j],
                    **{f"intruder@{key}": flags[j] for key, flags in intruders.items()},
                })
        return table

    def to_json(self, path=None, *, indent: int = 1) -> str:
        """The JSON text; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"
        if path is not None:
            write_atomic(path, text)
        return text

    def to_csv(self, path=None) -> str:
        """The per-matrix table of :meth:`flat_rows` as CSV (its per-vector lists space-separated); also written
        atomically to ``path`` when given. For one line per vector: ``report.vectors().to_csv(path)``."""
        buffer = io.StringIO()
        rows = [{key: " ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
                 if isinstance(value, list) else value for key, value in row.items()} for row in self.flat_rows()]
        fields = list(rows[0]) if rows else ["name"]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        if path is not None:
            write_atomic(path, buffer.getvalue())
        return buffer.getvalue()

    def to_pandas(self):
        """The per-matrix table of :meth:`flat_rows` as a ``pandas.DataFrame`` (per-vector columns hold lists).
        pandas is an optional extra (``pip install pandas``)."""
        return _data_frame(self.flat_rows())

    def vectors(self):
        """The per-vector table of :meth:`vector_rows` as a ``pandas.DataFrame``: one row per (matrix, side,
        checkpoint, j), what ``df.groupby(["name", "side", "checkpoint"])`` and ``df[df["intruder@0.5"]]`` read."""
        return _data_frame(self.vector_rows())

    def save(self, path) -> None:
        """Write atomically as CSV when ``path`` ends in ``.csv``, else JSON."""
        (self.to_csv if str(path).endswith(".csv") else self.to_json)(path)

    @classmethod
    def load(cls, path) -> Report:
        """Read a JSON report file (the untrusted-JSON limits of :mod:`lorafft.io.jsonfile`), checked against the
        report's JSON Schema (:func:`check_schema`); InputError(path, problem) when it is missing, unreadable, a
        CSV table, or not a schema-1 report (naming the JSON path of the first problem)."""
        data = read_json_object(report_file(path))
        check_schema(data, path)
        try:
            report = cls.from_dict(data)
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(path, f"not a lorafft report of schema {SCHEMA_VERSION}: {error}") from None
        if not report.rows:
            raise InputError(path, "the report holds no matrices")
        return report

    def summary(self, worst: int = 5) -> str:
        """A short text table: totals per ε (with the random floor range), what to read with care, and the rows with
        most intruders."""
        keys = [eps_key(e) for e in self.eps]
        sides = sorted({r.side for r in self.rows})
        analysed = sorted({r.k for r in self.rows})  # min(k, m, n) per matrix
        k = f"{analysed[0]}" if len(analysed) == 1 else f"{analysed[0]}..{analysed[-1]} (min(k, m, n) per matrix)"
        lines = [f"{plural(len({r.name for r in self.rows}), 'matrix', 'matrices')}, "
                 f"k={k if analysed else self.options.get('k')}, side {'+'.join(sides)}"]
        floors = sorted({round(r.random_floor, 4) for r in self.rows})
        if floors:
            upper = f" .. {floors[-1]:g}" if len(floors) > 1 else ""
            lines.append(f"random-direction floor 1/sqrt(d): {floors[0]:g}{upper}")
        if len(self.checkpoints) == 1:
            counts = "  ".join(f"ε={key}: {count}" for key, count in self.totals().items())
            lines.append(f"intruders (max|cos| < ε):  {counts}")
        else:
            lines.append("intruders (max|cos| < ε) per checkpoint:")
            for index, label in enumerate(self.checkpoints):
                counts = "  ".join(f"ε={key}: {count}" for key, count in self.totals(checkpoint=index).items())
                lines.append(f"  [{index}] {printable(label)}:  {counts}")
        lines.extend(self._caveats())
        ranked = sorted(self.rows, key=lambda r: (-r.counts[keys[0]], min(r.max_cos) if r.max_cos else 1.0))
        ranked = [r for r in ranked if r.counts[keys[0]] > 0][:worst]
        if ranked:
            lines.append(f"most intruders at ε={keys[0]}:")
            width = max(len(printable(r.name)) for r in ranked)
            for r in ranked:
                where = f"  [{r.checkpoint}]" if len(self.checkpoints) > 1 else ""  # the per-checkpoint labels above
                lines.append(f"  {printable(r.name):<{width}}{where}  {r.side:<5}  {r.counts[keys[0]]:>3}/{r.k}  "
                             f"min max|cos| {min(r.max_cos):.3f}")
        if self.skipped:
            lines.append(f"{plural(len(self.skipped), 'matrix', 'matrices')} skipped (see 'skipped' in the report)")
        return "\n".join(lines)

    def _caveats(self) -> list[str]:
        """Summary lines for vectors whose count could flip, or is not a property of the matrices."""
        lines = []
        flagged = sum(sum(r.near_threshold) for r in self.rows)
        if flagged:
            lines.append(f"{plural(flagged, 'vector lies', 'vectors lie')} within 1e-3 (or the error bound) of a "
                         "threshold: see near_threshold")
        unbounded = sum(sum(not math.isfinite(b) for b in r.error_bound) for r in self.rows)
        if unbounded:
            lines.append(f"{plural(unbounded, 'vector has', 'vectors have')} a repeated singular value, so no single "
                         "vector and no error bound (error_bound null): max|cos| depends on the choice within that "
                         "subspace")
        deficient = [r for r in self.rows if r.base_rank is not None and r.base_rank < min(r.shape)]
        if deficient:
            unsure = {key: sum(r.undetermined.get(key, 0) for r in deficient) for key in map(eps_key, self.eps)}
            lines.append(f"{plural(len(deficient), 'row has', 'rows have')} a rank-deficient base (basis undefined "
                         f"beyond its rank, see base_rank); undetermined, not counted: "
                         + "  ".join(f"ε={key}: {count}" for key, count in unsure.items()))
        return lines

    def _repr_html_(self) -> str:
        """Notebooks: the summary tables and, when matplotlib is installed, the counts-vs-ε figure."""
        from lorafft.plots.html import summary_html

        return summary_html(self, figure=True)

    def threshold(self, eps: float | None = None) -> float:
        """``eps``, or the report's smallest ε when None (the default of every figure)."""
        return min(self.eps) if eps is None else eps

    # Pictures: thin wrappers over lorafft.plots (matplotlib is imported only when one is drawn). Each returns a
    # matplotlib Figure; ``eps=None`` means the report's smallest ε.

    def plot_counts_vs_eps(self, side: str = "left", eps_grid=None, *, others: dict | None = None,
                           label: str = "this report", ax=None):
        """Intruders versus ε, one curve per checkpoint (and per report of ``others``, e.g. per LoRA rank): Figure 4."""
        from lorafft.plots.figures import plot_counts_vs_eps

        return plot_counts_vs_eps({label: self, **others} if others else self, side, eps_grid, ax=ax)

    def plot_checkpoint_totals(self, side: str = "left", eps=None, *, ax=None):
        """Intruders per tuned input, one bar per ε: which of several adapters (or checkpoints) grew intruders."""
        from lorafft.plots.figures import plot_checkpoint_totals

        return plot_checkpoint_totals(self, side, eps, ax=ax)

    def plot_counts_vs_k(self, side: str = "left", eps: float | None = None, *, per_module: bool = False,
                         checkpoint: int | None = None, ax=None):
        """Intruders among the top k versus k / min(m, n), up to the scan's k: the paper's Figure 15."""
        from lorafft.plots.figures import plot_counts_vs_k

        eps = self.threshold(eps)
        return plot_counts_vs_k(self, side, eps, per_module=per_module, checkpoint=checkpoint, ax=ax)

    def plot_layer_bars(self, side: str = "left", eps: float | None = None, *, checkpoint: int | None = None, ax=None):
        """Intruders per layer, stacked by module (Figure 4's totals split by layer and module)."""
        from lorafft.plots.figures import plot_layer_bars

        eps = self.threshold(eps)
        return plot_layer_bars(self, side, eps, checkpoint=checkpoint, ax=ax)

    def plot_spectra(self, name: str, side: str = "left", eps: float | None = None, *, checkpoint: int | None = None,
                     ax=None):
        """Matrix ``name``'s fine-tuned singular values beside the base's, intruders ringed (tuned vs base spectra)."""
        from lorafft.plots.figures import plot_spectra

        return plot_spectra(self, name, side, eps, checkpoint=checkpoint, ax=ax)

    def plot_similarity(self, name: str, n: int = 10, side: str = "left", eps: float | None = None, *,
                        checkpoint: int | None = None, ax=None):
        """|cos| heatmap of matrix ``name``'s top-n base and tuned singular vectors, read from the report's input
        paths (the last checkpoint by default): the paper's Figures 1–3."""
        from lorafft.plots.heatmaps import plot_similarity, similarity

        checkpoint = len(self.checkpoints) - 1 if checkpoint is None else checkpoint
        eps = self.threshold(eps)
        drawn = similarity(self.inputs["base"], self.checkpoints[checkpoint], name, n=n, side=side, eps=eps,
                           k_intruders=self.options.get("k"), split_fused=self.options.get("split_fused", False))
        return plot_similarity(drawn, ax=ax)

    def plot_trajectory(self, name: str, side: str = "left", eps: float | None = None, *, search: int | None = None,
                        ax=None):
        """Rank and singular value of the last checkpoint's intruders of ``name`` across the report's checkpoints,
        read from its input paths (a tracked run's: followed through the cosines its rows keep; ValueError when
        they hold none): the paper's Figure 5."""
        from lorafft.plots.trajectory import intruder_trajectory, is_tracked, plot_trajectory, tracked_trajectory

        eps = self.threshold(eps)
        if is_tracked(self):
            return plot_trajectory(tracked_trajectory(self, name, side=side, eps=eps), ax=ax)
        drawn = intruder_trajectory(self.inputs["base"], self.checkpoints, name, side=side, eps=eps,
                                    k=self.options.get("k", 10), search=search,
                                    split_fused=self.options.get("split_fused", False))
        return plot_trajectory(drawn, ax=ax)

    def plot_magnitude_direction(self, *, modules=None, ax=None):
        """ΔD (x) against ΔM (y) per module type (all, or ``modules``), a point per layer and checkpoint, the
        least-squares slope and its 95% interval per panel: DoRA's Figure 2 (Liu et al. 2024)."""
        from lorafft.plots.magnitude_direction import plot_magnitude_direction

        return plot_magnitude_direction(self, modules=modules, ax=ax)

    def to_html(self, path, **options) -> None:
        """Write one offline HTML page: tables, every figure and the worst matrix's heatmap
        (:func:`lorafft.plots.write_html`)."""
        from lorafft.plots.html import write_html

        write_html(self, path, **options)


def check_schema(data: dict, source) -> None:
    """InputError(source, problem) unless ``data`` is a report by the JSON Schema :data:`SCHEMA_FILE` with only
    finite numbers; the problem names the JSON path of the first place that is not (``$.matrices[0].max_cos[2]``).
    ``jsonschema`` is imported here, when a report is read."""
    from jsonschema.exceptions import best_match

    error = best_match(_schema_validator().iter_errors(data))
    if error is not None:
        value = error.instance
        problem = (f"{value} is not a finite number" if isinstance(value, float) and not math.isfinite(value)
                   else error.message)
        raise InputError(source, f"not a lorafft report of schema {SCHEMA_VERSION}: {error.json_path}: "
                                 f"{printable(problem)[:300]}")


@functools.lru_cache(maxsize=1)
def _schema_validator():
    """The JSON Schema validator of reports (draft 2020-12), NaN and ±Infinity refused where a number is due."""
    import jsonschema

    schema = json.loads(importlib.resources.files("lorafft").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))
    draft = jsonschema.Draft202012Validator
    finite = draft.TYPE_CHECKER.redefine(
        "number", lambda checker, value: draft.TYPE_CHECKER.is_type(value, "number") and math.isfinite(value))
    return jsonschema.validators.extend(draft, type_checker=finite)(schema)


def _data_frame(records: list[dict]):
    """``pandas.DataFrame(records)``; pandas is an optional extra, imported here."""
    try:
        import pandas
    except ImportError as error:
        raise ImportError("lorafft's tables need pandas: pip install pandas (or the lorafft 'pandas' extra)") from error
    return pandas.DataFrame(records)


def timestamp() -> str:
    """Now in UTC to the second, ISO 8601: a report's ``created``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """The versions a report records: lorafft, torch, numpy, safetensors and Python."""
    import numpy
    import safetensors
    import torch

    from lorafft import __version__

    return {
        "lorafft": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def matrix_rows(pairs: list[Pair], results: dict, checkpoint: int, ranks=None) -> list[MatrixRow]:
    """The report rows of one analysed batch: per matrix of ``pairs``, one row per side of ``results``
    (``{side: lorafft.analysis.SideAnalysis}`` of the stack, with its ΔM and ΔD); ``ranks`` per matrix
    ``(effective, stable)`` of ΔW."""
    rows = []
    first = next(iter(results.values()))
    changes = list(zip(first.delta_magnitude.tolist(), first.delta_direction.tolist()))
    for index, pair in enumerate(pairs):
        layer, module = layer_and_module(pair.name)
        effective, stable = (None, None) if ranks is None else ranks[index]
        magnitude, direction = changes[index]
        for side, result in results.items():
            rows.append(
                MatrixRow(
                    name=pair.name,
                    tuned_name=pair.tuned_name,
                    checkpoint=checkpoint,
                    layer=layer,
                    module=module,
                    shape=pair.shape,
                    side=side,
                    k=result.max_cos.shape[-1],
                    singular_values=result.singular_values[index].tolist(),
                    base_singular_values=result.base_singular_values[index].tolist(),
                    max_cos=result.max_cos[index].tolist(),
                    argmax=result.argmax[index].tolist(),
                    error_bound=result.error_bound[index].tolist(),
                    near_threshold=result.near_threshold[index].tolist(),
                    counts={eps_key(e): int(c) for e, c in zip(result.eps, result.counts[index].tolist())},
                    random_floor=result.random_floor,
                    random_reference=result.random_reference,
                    delta_effective_rank=effective,
                    delta_stable_rank=stable,
                    iterations=result.iterations,
                    base_rank=int(result.base_rank[index]),
                    undetermined={eps_key(e): int(c) for e, c in zip(result.eps, result.undetermined[index].tolist())},
                    outside=(result.outside[index].tolist() if int(result.base_rank[index]) < min(pair.shape)
                             or bool(result.outside[index].any()) else None),
                    delta_magnitude=magnitude,
                    delta_direction=direction if direction is None or math.isfinite(direction) else None,
                    method=result.method[index],
                )
            )
    return rows
