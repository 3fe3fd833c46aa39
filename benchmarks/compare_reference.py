"""lorafft against the reference algorithm on one CPU, same synthetic pairs, one run.

Reference (what the paper's code does): two full ``torch.linalg.svd`` (base and tuned, fp32, reduced) and the
full cosine matrix ``U_tuned^T U_base``; intruders = top-k rows whose max |cos| < ε. lorafft: ``lorafft.analyze``
(exact fp64-Gram base basis + certified block Krylov top-k), base basis included in its time. lorafft cached:
``lorafft.scan`` of the pair written as safetensors files, with a base cache built beforehand (``lorafft cache
build``; reading both files is included in the time). Prints a table of median seconds, the ratios, and whether
the intruder counts agree, and writes it as JSON. "exact floor": the fp64 Gram and its LAPACK tridiagonal
eigen-decomposition alone, which any exact base basis pays on this CPU, and the speed-up that leaves at most.

    python benchmarks/compare_reference.py                       # 4096x4096 and 4096x11008, LoRA and full pairs
    python benchmarks/compare_reference.py --shapes 1024x1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorafft
from lorafft import linalg, synthetic
from lorafft.cache import build_base_cache

EPS = (0.5, 0.6, 0.7, 0.8, 0.9)


def reference(W0: torch.Tensor, Wt: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """Two full SVDs and the full cosine matrix, as in the paper's code (fp32)."""
    U0, _, _ = torch.linalg.svd(W0, full_matrices=False)
    Ut, _, _ = torch.linalg.svd(Wt, full_matrices=False)
    cosines = (Ut.T @ U0).abs()
    max_cos = cosines[:k].max(dim=1).values
    return [int((max_cos < e).sum()) for e in EPS], max_cos


def lorafft_counts(W0: torch.Tensor, Wt: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    result = lorafft.analyze(W0, Wt, k=k, eps=EPS)["left"]
    return result.counts[0].tolist(), result.max_cos[0]


def cached_scan_counts(base_file: Path, tuned_file: Path, cache: Path, k: int) -> tuple[list[int], torch.Tensor]:
    row = lorafft.scan(base_file, tuned_file, k=k, eps=EPS, base_cache=cache).rows[0]
    return [row.counts[f"{e:g}"] for e in EPS], torch.tensor(row.max_cos)


def exact_floor(W0: torch.Tensor) -> float:
    """Seconds of the two steps any exact (fp64 Gram) base basis pays on the CPU, whatever comes after: the fp64
    Gram matrix of the smaller side and its LAPACK tridiagonal eigen-decomposition (?sytrd + ?stevd)."""
    start = time.perf_counter()
    gram = linalg._gram_upper((W0 if W0.shape[0] <= W0.shape[1] else W0.T)[None], torch.float64)
    linalg._lapack_tridiagonal_eigh(gram[0].numpy().T)
    return time.perf_counter() - start


def timed(function, *args, repeats: int):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def pairs(shape, generator):
    m, n = shape
    W0 = synthetic.random_weight(m, n, generator=generator)
    full = W0 + synthetic.full_finetune_update(W0, generator=generator)
    A, B = synthetic.lora_update(m, n, 1, generator=generator, lora_alpha=2.0,
                                 sigma=synthetic.LORA_SIGMA * synthetic.SIGMA1)
    lora = W0 + 2.0 * B @ A
    return W0, {"full": full, "lora": lora}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method and pair (median reported)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_compare_reference.json"))
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    warm = synthetic.random_weight(256, 256, generator=torch.Generator().manual_seed(1))
    reference(warm, warm, args.k), lorafft_counts(warm, warm, args.k)  # library loading stays out of the timings
    lorafft.analysis.random_max_cos(4096, 4096)  # the scan's random-direction reference is cached per shape
    rows = []
    print(f"{'shape':>11} {'update':>6} {'reference s':>12} {'lorafft s':>10} {'speed-up':>9} {'cached s':>9} "
          f"{'speed-up':>9}  counts agree  max|Δ max|cos||  exact floor s (bound)")
    workdir = Path(tempfile.mkdtemp(prefix="lorafft-bench-"))
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        W0, tuned = pairs(shape, generator)
        base_file, cache = workdir / f"base-{text}.safetensors", workdir / f"cache-{text}"
        save_file({"weight": W0}, base_file)
        build_base_cache(base_file, cache)
        floor_time = statistics.median(exact_floor(W0) for _ in range(args.repeats))
        for kind, Wt in tuned.items():
            tuned_file = workdir / f"{kind}-{text}.safetensors"
            save_file({"weight": Wt.contiguous()}, tuned_file)
            ref_time, (ref_counts, ref_max) = timed(reference, W0, Wt, args.k, repeats=args.repeats)
            our_time, (our_counts, our_max) = timed(lorafft_counts, W0, Wt, args.k, repeats=args.repeats)
            cached_time, (cached_counts, cached_max) = timed(cached_scan_counts, base_file, tuned_file, cache, args.k,
                                                             repeats=max(3, args.repeats))
            difference = float(max((ref_max.double() - m.double()).abs().max() for m in (our_max, cached_max)))
            agree = ref_counts == our_counts == cached_counts
            row = {"shape": list(shape), "update": kind, "reference_s": ref_time, "lorafft_s": our_time,
                   "speedup": ref_time / our_time, "lorafft_cached_s": cached_time,
                   "speedup_cached": ref_time / cached_time, "reference_counts": ref_counts,
                   "lorafft_counts": our_counts, "lorafft_cached_counts": cached_counts, "counts_agree": agree,
                   "max_abs_difference": difference, "exact_floor_s": floor_time,
                   "speedup_bound_exact": ref_time / floor_time}
            rows.append(row)
            print(f"{text:>11} {kind:>6} {ref_time:12.2f} {our_time:10.2f} {ref_time / our_time:8.1f}x "
                  f"{cached_time:9.2f} {ref_time / cached_time:8.0f}x  {str(agree):>12}  {difference:15.1e}"
                  f"  {floor_time:6.2f} ({ref_time / floor_time:.1f}x)", flush=True)
    meta = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "lorafft": lorafft.__version__,
            "date": time.strftime("%Y-%m-%d"), "eps": EPS, "k": args.k, "repeats": args.repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
