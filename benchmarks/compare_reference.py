"""lorafft against the reference algorithm on one CPU, same synthetic pairs, one run.

Reference (what the paper's code does): two full ``torch.linalg.svd`` (base and tuned, fp32, reduced) and the
full cosine matrix ``U_tuned^T U_base``; intruders = top-k rows whose max |cos| < ε. Against it, on the same pairs:

* ``lorafft``: ``lorafft.analyze`` on tensors (exact fp64-Gram base basis included): the full fine-tune's dense Wt;
  the LoRA update as its factors (``lora=(B, A, s)``: the update path, lorafft.updating);
* ``lorafft cached``: ``lorafft.scan`` from the files against a base cache built beforehand (``lorafft cache build``;
  reading the files is in the time): the full fine-tune as a safetensors checkpoint, the LoRA update as a PEFT
  adapter directory (rank ``--rank``, default 16);
* ``krylov``: the same two LoRA scans with the update path taken away (``analysis._update_path`` answering None): the
  block Krylov path that answered LoRA adapters before, so the update path is compared with it in the same run.

For the cached LoRA scan the benchmark also counts the passes over W0 (calls of the products that read a whole weight,
``linalg.product``, ``linalg.matmul_fp64``, ``linalg.row_norms``, on W0's storage) and prints, per shape, the median
seconds, the speed-ups, whether the intruder counts agree, and the largest max|cos| difference; "exact floor": the
fp64 Gram and its LAPACK tridiagonal eigen-decomposition alone, which any exact base basis pays on this CPU.

    python benchmarks/compare_reference.py                       # 4096x4096 and 4096x11008, LoRA and full pairs
    python benchmarks/compare_reference.py --shapes 1024x1024 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorafft
from lorafft import analysis, linalg, loading, synthetic
from lorafft.cache import build_base_cache

EPS = (0.5, 0.6, 0.7, 0.8, 0.9)
NAME = "model.layers.0.mlp.proj"  # the matrix's module name in the files (base tensor NAME.weight)
CACHED_REPEATS = 9  # the scans against a cache take a tenth of a second: their median is of nine runs


def reference(W0: torch.Tensor, Wt: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """Two full SVDs and the full cosine matrix, as in the paper's code (fp32)."""
    U0, _, _ = torch.linalg.svd(W0, full_matrices=False)
    Ut, _, _ = torch.linalg.svd(Wt, full_matrices=False)
    cosines = (Ut.T @ U0).abs()
    max_cos = cosines[:k].max(dim=1).values
    return [int((max_cos < e).sum()) for e in EPS], max_cos


def analyzed(W0: torch.Tensor, tuned, k: int) -> tuple[list[int], torch.Tensor]:
    """``lorafft.analyze`` of a dense Wt or of LoRA factors ``(B, A, s)``."""
    lora = tuned if isinstance(tuned, tuple) else None
    result = lorafft.analyze(W0, None if lora else tuned, lora=lora, k=k, eps=EPS)["left"]
    return result.counts[0].tolist(), result.max_cos[0]


def scanned(base_file: Path, tuned: Path, k: int, cache: Path | None) -> tuple[list[int], torch.Tensor]:
    row = lorafft.scan(base_file, tuned, k=k, eps=EPS, base_cache=cache, progress=False).rows[0]
    return [row.counts[f"{e:g}"] for e in EPS], torch.tensor(row.max_cos)


@contextlib.contextmanager
def krylov_only():
    """Every matrix through the certified block Krylov iteration, as LoRA adapters were answered before the update
    path existed: the update path taken away, and the dense top-k of small matrices (``linalg.DENSE_SVD_MAX = 0``;
    no matrix this script times is that small)."""
    update_path, limit = analysis._update_path, linalg.DENSE_SVD_MAX
    analysis._update_path, linalg.DENSE_SVD_MAX = (lambda *args, **kwargs: None), 0
    try:
        yield
    finally:
        analysis._update_path, linalg.DENSE_SVD_MAX = update_path, limit


@contextlib.contextmanager
def counting_passes():
    """Count the calls that read a whole W0 as the loader loaded it (``counts["passes"]``): products, fp64 products
    and row norms whose operand shares W0's storage (a transposed view included; the cached basis does not)."""
    counts, storages = {"passes": 0}, set()
    load = loading.BatchLoader._load
    originals = {name: getattr(linalg, name) for name in ("product", "matmul_fp64", "row_norms")}

    def loaded(self, *args, **kwargs):
        batch = load(self, *args, **kwargs)
        storages.add(batch.W0.untyped_storage().data_ptr())
        return batch

    def counted(function):
        def call(W, *args, **kwargs):
            counts["passes"] += W.untyped_storage().data_ptr() in storages
            return function(W, *args, **kwargs)
        return call

    loading.BatchLoader._load = loaded
    for name, function in originals.items():
        setattr(linalg, name, counted(function))
    try:
        yield counts
    finally:
        loading.BatchLoader._load = load
        for name, function in originals.items():
            setattr(linalg, name, function)


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


def pairs(shape, rank: int, generator, workdir: Path) -> tuple[torch.Tensor, Path, dict]:
    """W0 (written as ``base.safetensors``), and per kind ``(in-memory tuned, file or adapter dir, dense Wt)``."""
    m, n = shape
    W0 = synthetic.random_weight(m, n, generator=generator)
    full = W0 + synthetic.full_finetune_update(W0, generator=generator)
    A, B = synthetic.lora_update(m, n, rank, generator=generator, lora_alpha=2.0 * rank,
                                 sigma=synthetic.LORA_SIGMA * synthetic.SIGMA1)
    base_file = workdir / f"base-{m}x{n}.safetensors"
    save_file({f"{NAME}.weight": W0}, base_file)
    full_file = workdir / f"full-{m}x{n}.safetensors"
    save_file({f"{NAME}.weight": full.contiguous()}, full_file)
    adapter = synthetic.write_peft_adapter(workdir / f"lora-{m}x{n}", {NAME: (A, B)}, r=rank, lora_alpha=2.0 * rank,
                                           target_modules=["proj"])
    return W0, base_file, {"full": (full, full_file, full), "lora": ((B, A, 2.0), adapter, W0 + 2.0 * B @ A)}


def measure_pair(shape, rank: int, args, generator, workdir: Path) -> list[dict]:
    W0, base_file, tuned = pairs(shape, rank, generator, workdir)
    cache = workdir / f"cache-{shape[0]}x{shape[1]}"
    build_base_cache(base_file, cache)
    floor_time = statistics.median(exact_floor(W0) for _ in range(args.repeats))
    rows = []
    for kind, (in_memory, on_disk, dense) in tuned.items():
        ref_time, (ref_counts, ref_max) = timed(reference, W0, dense, args.k, repeats=args.repeats)
        our_time, (our_counts, our_max) = timed(analyzed, W0, in_memory, args.k, repeats=args.repeats)
        cached_time, (cached_counts, cached_max) = timed(scanned, base_file, on_disk, args.k, cache,
                                                         repeats=max(CACHED_REPEATS, args.repeats))
        row = {"shape": list(shape), "update": kind, "rank": rank if kind == "lora" else None,
               "reference_s": ref_time, "lorafft_s": our_time, "speedup": ref_time / our_time,
               "lorafft_cached_s": cached_time, "speedup_cached": ref_time / cached_time,
               "reference_counts": ref_counts, "lorafft_counts": our_counts, "lorafft_cached_counts": cached_counts,
               "exact_floor_s": floor_time, "speedup_bound_exact": ref_time / floor_time}
        maxima = [our_max, cached_max]
        agree = ref_counts == our_counts == cached_counts
        if kind == "lora":
            with counting_passes() as counts:
                scanned(base_file, on_disk, args.k, cache)
            with krylov_only():
                krylov_time, (krylov_counts, krylov_max) = timed(analyzed, W0, in_memory, args.k,
                                                                 repeats=args.repeats)
                krylov_cached, (krylov_cached_counts, _) = timed(scanned, base_file, on_disk, args.k, cache,
                                                                 repeats=max(CACHED_REPEATS, args.repeats))
            maxima.append(krylov_max)
            agree = agree and krylov_counts == krylov_cached_counts == ref_counts
            row.update({"passes_over_W0_cached": counts["passes"], "krylov_s": krylov_time,
                        "krylov_cached_s": krylov_cached, "speedup_krylov_cached": ref_time / krylov_cached,
                        "uncached_over_krylov": our_time / krylov_time})
        row["counts_agree"] = agree
        row["max_abs_difference"] = float(max((ref_max.double() - m.double()).abs().max() for m in maxima))
        rows.append(row)
        passes = f"  {row['passes_over_W0_cached']} passes" if kind == "lora" else ""
        print(f"{shape[0]}x{shape[1]:<6} {kind:>5} reference {ref_time:6.2f} s | lorafft {our_time:6.2f} s "
              f"({ref_time / our_time:5.1f}x) | cached {cached_time:6.3f} s ({ref_time / cached_time:5.0f}x){passes}"
              + (f" | krylov {row['krylov_s']:.2f} s, cached {row['krylov_cached_s']:.3f} s" if kind == "lora"
                 else "") + f" | counts agree {agree}, max|Δ| {row['max_abs_difference']:.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapter (default 16)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method and pair (median reported)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_compare_reference.json"))
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    warm = synthetic.random_weight(256, 256, generator=torch.Generator().manual_seed(1))
    reference(warm, warm, args.k), analyzed(warm, warm, args.k)  # library loading stays out of the timings
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorafft-bench-") as workdir:
        for text in args.shapes:
            shape = tuple(int(v) for v in text.split("x"))
            lorafft.analysis.random_max_cos(min(shape), min(shape))  # cached per shape, as in a long scan
            rows += measure_pair(shape, args.rank, args, generator, Path(workdir))
    meta = {"command": "python benchmarks/compare_reference.py", "machine": platform.node(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "lorafft": lorafft.__version__, "date": time.strftime("%Y-%m-%d"),
            "eps": EPS, "k": args.k, "rank": args.rank, "repeats": args.repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
