"""One prepared run on a CUDA device: kernel correctness against fp64, measured bandwidth, and timings.

Run it in one call on the lent GPU (it writes ``benchmarks/results/gpu_check-<date>.json`` with the device name,
driver, torch and triton versions):

    python benchmarks/gpu_check.py                  # the whole check, sized for a few minutes on an H100/H200
    python benchmarks/gpu_check.py --quick          # small sizes only (also runs on a CPU under TRITON_INTERPRET=1)
    python benchmarks/gpu_check.py --sections scan kernels   # a rerun of some sections

Each section runs on its own (an exception is recorded as that section's result) and the file is rewritten after
every section, so a failure or a timeout keeps what was measured before it.

What it measures (each timing: median of CUDA events after warm-up, inputs rotated so they exceed L2):
1. correctness of ``lorafft.kernels.sketch`` (fp32, fp16, bf16, fp8 e4m3 + scales) and ``lorafft.kernels.cosine``
   against torch fp64, and of a Triton-backend ``analyze`` against fp64 SVDs;
2. device copy bandwidth (a large ``copy_``) and a large bf16 matmul rate, on the spot;
3. the sketch kernel (both products, W X and W^T X; default split-K with ieee products, no split, tf32x3) against
   its torch equivalent (upcast + cuBLAS), as GB/s of W read and as a fraction of the copy bandwidth, at Llama-70B
   shapes;
4. the fused cosine kernel against materialize-then-reduce in torch;
5. one 70B-shaped layer (q, k, v, o, gate, up, down; bf16 read as stored) end to end against a cached base:
   device seconds, for a LoRA adapter kept factored and for a full fine-tune;
6. ``lorafft.scan`` of the synthetic trio on the device against the same scan on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lorafft  # noqa: E402
from lorafft import linalg, synthetic  # noqa: E402
from lorafft.kernels.cosine import max_abs_cos_fused  # noqa: E402
from lorafft.kernels.sketch import sketch  # noqa: E402

HIDDEN, KV, INTERMEDIATE = 8192, 1024, 28672
LAYER = synthetic.llama_layer_shapes(HIDDEN, KV, INTERMEDIATE)


def timed(function, *, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``function()`` by CUDA events (wall clock on a CPU)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            function()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm().clamp_min(1e-300))


def check_kernels(device, sizes) -> dict:
    """Sketch and cosine kernels against fp64 on fresh random inputs."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    results = {}
    m, n, b, L = sizes
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        if device.type == "cpu" and dtype in (torch.bfloat16, torch.float8_e4m3fn):
            continue  # the interpreter has no bf16/fp8
        W = torch.randn(L, m, n, generator=generator).to(dtype).to(device)
        X = torch.randn(L, n, b, generator=generator).to(device)
        scale = torch.rand(L, m, generator=generator).add(0.5).to(device) if dtype == torch.float8_e4m3fn else None
        reference = W.double() * (scale.double().unsqueeze(-1) if scale is not None else 1)
        for precision in ("ieee", "tf32x3"):
            out = sketch(W, X, scale=scale, precision=precision)
            results[f"sketch_{str(dtype)[6:]}_{precision}_rel_error"] = relative_error(out, reference @ X.double())
    Y = torch.linalg.qr(torch.randn(L, m, 10, generator=generator, dtype=torch.float64)).Q
    Xb = torch.linalg.qr(torch.randn(L, m, m, generator=generator, dtype=torch.float64)).Q
    max_cos, _, _ = max_abs_cos_fused(Xb.float().contiguous().to(device), Y.float().contiguous().to(device), (0.5,))
    reference = (Xb.mT @ Y).abs().max(dim=-2).values
    results["cosine_max_abs_error"] = float((max_cos.double().cpu() - reference).abs().max())
    return results


def check_analysis(device, m: int, n: int) -> dict:
    """A Triton-backend ``analyze`` of a LoRA pair against fp64 SVDs."""
    generator = torch.Generator().manual_seed(1)
    W0 = synthetic.random_weight(m, n, generator=generator)
    A, B = synthetic.lora_update(m, n, 4, generator=generator, lora_alpha=8.0,
                                 sigma=synthetic.LORA_SIGMA * synthetic.SIGMA1)
    Wt = W0 + 2.0 * B @ A
    result = lorafft.analyze(W0.to(device), Wt.to(device), k=10, backend="triton")["left"]
    U0, _, _ = torch.linalg.svd(W0.double(), full_matrices=False)
    Ut, _, _ = torch.linalg.svd(Wt.double(), full_matrices=False)
    reference = (U0.T @ Ut[:, :10]).abs().max(dim=0).values
    return {"analyze_max_abs_error": float((result.max_cos[0].cpu() - reference).abs().max()),
            "analyze_counts": result.counts[0].tolist(), "reference_counts": [int((reference < 0.5).sum())]}


def measure_device(device, repeats: int) -> dict:
    """Copy bandwidth and a bf16 matmul rate measured now."""
    size = 1 << 30 if device.type == "cuda" else 1 << 24
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source), repeats=repeats)
    side = 8192 if device.type == "cuda" else 256
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    matmul_s = timed(lambda: a @ a, repeats=repeats)
    return {"copy_GBps": 2 * size / copy_s / 1e9, "bf16_matmul_TFLOPs": 2 * side**3 / matmul_s / 1e12}


def time_kernels(device, shapes, repeats: int, copy_GBps: float) -> dict:
    """Sketch kernel vs upcast + cuBLAS, and fused cosine vs materialize-then-reduce, per shape (bf16 weights)."""
    results = {}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    for name, (m, n) in shapes.items():
        rotation = max(2, (256 << 20) // (2 * m * n) + 1)  # rotate inputs so the set exceeds L2
        weights = [torch.randn(1, m, n, device=device).to(dtype) for _ in range(rotation)]
        X, X_t = torch.randn(1, n, 20, device=device), torch.randn(1, m, 20, device=device)
        counter = iter(range(10**9))
        row = {"shape": [m, n]}
        variants = {"default": {}, "no_split": {"split_k": 1}, "tf32x3": {"precision": "tf32x3"}}
        for variant, options in variants.items():  # the default is auto split-K with ieee products
            for transpose in (False, True):
                seconds = timed(lambda: sketch(weights[next(counter) % rotation], X_t if transpose else X,
                                               transpose=transpose, **options), repeats=repeats)
                gbps = 2 * m * n / seconds / 1e9
                key = f"{variant}{'_transposed' if transpose else ''}"
                row[key] = {"s": seconds, "GBps": gbps, "fraction_of_copy": gbps / copy_GBps}
        row["torch_upcast_s"] = timed(lambda: weights[next(counter) % rotation].float() @ X, repeats=repeats)
        results[name] = row
    for s in (1024, 4096) if device.type == "cuda" else (64,):
        Xb = torch.linalg.qr(torch.randn(1, s, s, device=device)).Q.contiguous()
        Y = torch.linalg.qr(torch.randn(1, s, 10, device=device)).Q.contiguous()
        fused_s = timed(lambda: max_abs_cos_fused(Xb, Y, (0.5,)), repeats=repeats)
        torch_s = timed(lambda: (Xb.mT @ Y).abs().max(dim=-2), repeats=repeats)
        results[f"cosine_{s}"] = {"fused_s": fused_s, "materialize_then_reduce_s": torch_s}
    return results


def time_layer(device, shapes, repeats: int) -> dict:
    """One decoder layer (bf16 weights, read as stored) analysed against a cached base, the tuned side only, device
    seconds per layer: a rank-16 LoRA adapter (kept factored, as scan does) and a full fine-tune (dense Wt)."""
    generator = torch.Generator().manual_seed(2)
    lora_s = full_s = 0.0
    for name, (m, n) in shapes.items():
        W0 = synthetic.random_weight(m, n, generator=generator).to(device).to(torch.bfloat16)
        basis = linalg.base_basis(W0[None])
        basis = linalg.BaseBasis(W0=basis.W0, sigma=basis.sigma,
                                 Z=basis.top_vectors(basis.small_side, basis.sigma.shape[-1]).float(),
                                 reflectors=None, tau=None)  # what a cache holds
        A, B = synthetic.lora_update(m, n, 16, generator=generator, lora_alpha=32.0, sigma=7.5)
        A, B = A.to(device), B.to(device)
        lora_s += timed(lambda: lorafft.analyze(W0, lora=(B, A, 2.0), k=10, basis=basis, backend="triton"),
                        repeats=repeats, warmup=1)
        Wt = (W0.float() + 2.0 * B @ A).to(torch.bfloat16)
        full_s += timed(lambda: lorafft.analyze(W0, Wt, k=10, basis=basis, backend="triton"), repeats=repeats, warmup=1)
        del Wt
    return {"layer_seconds_lora": lora_s, "layer_seconds_full": full_s}


def check_scan(device) -> dict:
    """``lorafft.scan`` of the synthetic trio (LoRA adapter and full fine-tune, both sides) on ``device`` against the
    same scan on the CPU: identical counts and argmax, largest max|cos| difference, wall seconds of each."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        trio = synthetic.write_trio(Path(directory))
        result = {}
        for kind in ("lora", "full"):
            tuned = getattr(trio, kind)
            begin = time.perf_counter()
            cpu = lorafft.scan(trio.base, tuned, eps=(0.5, 0.9), side="both", device="cpu")
            middle = time.perf_counter()
            here = lorafft.scan(trio.base, tuned, eps=(0.5, 0.9), side="both", device=device)
            end = time.perf_counter()
            same = all(a.counts == b.counts and a.argmax == b.argmax for a, b in zip(here.rows, cpu.rows))
            difference = max(abs(x - y) for a, b in zip(here.rows, cpu.rows) for x, y in zip(a.max_cos, b.max_cos))
            result[kind] = {"rows": len(here.rows), "counts_and_argmax_equal": same, "max_abs_difference": difference,
                            "cpu_s": middle - begin, "device_s": end - middle}
    return result


SECTIONS = ("correctness", "analysis", "scan", "device_rates", "kernels", "layer_70b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these (default: all, in this order)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    shapes = synthetic.llama_layer_shapes(256, 64, 688) if quick else LAYER
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
              "driver": _driver(), "torch": torch.__version__, "triton": _triton_version(),
              "date": time.strftime("%Y-%m-%d"), "quick": quick}
    out = Path(__file__).parent / "results" / f"gpu_check-{report['date']}{'-quick' if quick else ''}.json"
    copy_GBps = None
    run = {
        "correctness": lambda: check_kernels(device, (70, 45, 5, 3) if quick else (4096, 11008, 20, 2)),
        "analysis": lambda: check_analysis(device, *((256, 512) if quick else (4096, 11008))),
        "scan": lambda: check_scan(device),
        "device_rates": lambda: measure_device(device, args.repeats),
        "kernels": lambda: time_kernels(device, shapes, args.repeats, copy_GBps or math.nan),
        "layer_70b": lambda: time_layer(device, shapes, max(3, args.repeats // 3)),
    }
    for section in args.sections:  # each section on its own: one failure costs that section, not the device time
        begin = time.perf_counter()
        try:
            report[section] = run[section]()
        except Exception as error:  # recorded in the results, which are written after every section
            report[section] = {"error": f"{type(error).__name__}: {error}"}
        report[section]["seconds"] = time.perf_counter() - begin
        if section == "device_rates" and "copy_GBps" in report[section]:
            copy_GBps = report[section]["copy_GBps"]
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{section}: {json.dumps(report[section])}", flush=True)
    print(f"written: {out}")


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
