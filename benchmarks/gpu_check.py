"""The device check: one command, at most 8 minutes on one H200, offline; PASS/FAIL per section with thresholds.

On the device machine (no network; the project installs offline):

    pip install --no-build-isolation --no-deps -e . && python benchmarks/gpu_check.py --out "$OUT"

It writes ``gpu_check.json`` (machine, versions, date, every number) and ``gpu_check.log`` (this output) to
``--out`` (default ``$OUT``, the only folder that comes back from a device run), rewriting the JSON after every
section so a timeout keeps what was measured. Sections, in order (each on its own: an error fails that section):

1. ``pytest``: the ``gpu``-marked tests, ``-x``.
2. ``correctness``: the sketch kernel against fp64 computed on the GPU, both orientations, fp32, fp16, bf16,
   fp8 e4m3/e5m2 without and with tensor/channel/128×128-block scales, outputs poisoned with NaN.
3. ``rates``: copy bandwidth; bf16 matmul rate.
4. ``sketch``: the sketch kernel at Llama-70B shapes (bf16, fp8 e4m3 with every scale layout, fp32) as a fraction
   of copy bandwidth, torch's time for the same product beside each (fp32 copy made once, then fp32 ``bmm``;
   bf16 ``bmm`` with fp32 output where torch offers it); thresholds in ``THRESHOLDS["sketch"]`` (issue 21).
5. ``cosine``: ``linalg.match``'s GPU path (fp32 explicit basis, full-precision ``bmm`` then max/argmax) at
   s = 8192, k = 10/32, L = 1/8, as a fraction of copy bandwidth for reading the basis.
6. ``krylov``: ``eigh`` of one 8192 fp64 Gram; one Krylov iteration split into its two products and the rest
   (Cholesky orthonormalisation, Rayleigh–Ritz ``eigh``, the synchronisation of the stopping decision), and each
   part alone beside its alternative (Householder QR, ``eigh`` on the host) for issue 20's "products at least half
   of each iteration" (``products_s`` against ``orthonormalise_eigh_sync_s``).
7. ``layer``: one Llama-70B layer (q, k, v, o, gate, up, down; bf16 as stored) analysed against cached bases
   (fp32, as ``cache build`` stores them), for a rank-16 LoRA kept factored and for a full fine-tune.
8. ``scan``: ``lorafft.scan`` of the synthetic trio on the GPU equal to the same scan on the CPU.
9. ``cli``: ``lorafft demo``, ``scan`` (the GPU by default), ``cache build --device``, ``scan --base-cache`` run as
   commands, each report equal to the same scan with ``--device cpu``.
10. ``tracking``: ``lorafft.Tracker`` on a small PEFT LoRA model on the GPU equal to a CPU tracker, two steps.

``--only SECTION ...`` runs chosen sections (``rates`` too when a timing needs the copy rate), and the one section
not in the default run: ``tiles``, the sketch kernel's GPU time for each tile candidate (``TILE_CANDIDATES``: the
evidence for the tiles ``kernels/sketch.py`` uses), and ``whole_model``: ``benchmarks/whole_model.py`` at Llama-70B
shapes, ``WHOLE_MODEL_LAYERS`` layers (about 19 GB of disk; checkpoints written, cache built and four scans, each in a
fresh process, with their read floors): cached scans within 1.25x of their read floor, ΔM/ΔD under 5 % of each scan,
the allocator's peak within 10 % of the memory model's prediction and under 90 % of the device, and the scans against
the cache equal to those without it within the certified bounds (issue 20). ``--only sketch tiles`` is the check of
issue 21, ``--only whole_model`` issue 20's.

Timings: CUDA events around ``CALLS`` (>= 20) back-to-back calls, median of 5 such pairs, after warm-up; the kernels'
own time from the same calls captured in a CUDA graph (``gpu``; the speed thresholds apply to it), and one call
from Python (``call``: the host's launch cost included, which a batch of L matrices per launch amortises). The
sketch's calls cycle through copies of the weights (``_rotation``) so that none finds its weights in the 50 MB L2.
``--quick`` is the CPU rehearsal (small sizes, Triton interpreter, no thresholds on speed) that the test suite runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lorafft  # noqa: E402
from lorafft import linalg, synthetic  # noqa: E402
from lorafft.io.fp8 import FP8_BLOCK  # noqa: E402

try:
    from lorafft.kernels.sketch import sketch  # noqa: E402
except ImportError as error:  # the kernels exist as lorafft.kernels only once the project is installed
    sys.exit(f"{error}: install first: pip install --no-build-isolation --no-deps -e .")

CALLS, SAMPLES = 20, 5
PYTEST_SECONDS = 240
SHAPES_70B = {"q_proj/o_proj": (8192, 8192), "gate/up_proj": (28672, 8192), "down_proj": (8192, 28672),
              "k/v_proj": (1024, 8192)}
THRESHOLDS = {"sketch_error": 1e-5, "sketch": {"bf16_8192x28672": 0.8, "bf16_8192x8192": 0.7, "fp8e4m3_any_scale": 0.6},
              "cosine_fraction_of_copy": 0.5, "krylov_products_share": 0.5, "layer_seconds": 1.0,
              "scan_max_cos_difference": 1e-5,
              "whole_model": {"cached_over_read_floor": 1.25, "magnitude_direction_share": 0.05,
                              "device_prediction_error": 0.10, "device_share": 0.90}}


def seconds_per_call(function) -> float:
    """Median over SAMPLES (5) event pairs of (time of ``CALLS`` back-to-back calls) / CALLS, after two warm-up
    calls."""
    calls = CALLS
    function(), function()
    samples = []
    for _ in range(SAMPLES):
        if torch.cuda.is_available():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                function()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3 / calls)
        else:
            begin = time.perf_counter()
            for _ in range(calls):
                function()
            samples.append((time.perf_counter() - begin) / calls)
    return statistics.median(samples)


def graph_seconds_per_call(function) -> float | str:
    """GPU time of one call without the host's cost of launching it: ``CALLS`` calls captured in one CUDA graph,
    the replay timed (median of 5, after a warm-up replay). Off CUDA: :func:`seconds_per_call`. A call that cannot
    be captured gives the reason instead of a time."""
    if not torch.cuda.is_available():
        return seconds_per_call(function)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compilation and first allocations outside the capture
            function()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS):
                function()
    except Exception as error:  # noqa: BLE001 (recorded, not fatal: the eager time stands)
        return f"not captured: {type(error).__name__}: {error}"[:200]
    graph.replay()
    samples = []
    for _ in range(SAMPLES):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3 / CALLS)
    return statistics.median(samples)


def _rate(seconds, W_bytes: int, copy_GBps: float) -> dict:
    """A timing and the rate of reading ``W_bytes`` it implies, as a fraction of the copy rate."""
    if isinstance(seconds, str):
        return {"s": seconds, "fraction_of_copy": None}
    return {"s": seconds, "fraction_of_copy": W_bytes / seconds / 1e9 / copy_GBps}


def run_pytest(device, quick: bool) -> dict:
    if quick:
        return {"skipped": "rehearsal", "pass": True}
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(root / "tests")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=PYTEST_SECONDS)
    except subprocess.TimeoutExpired as stopped:  # the timings after it matter as much: they get the time left
        tail = (stopped.stdout or b"").decode(errors="replace")[-3000:]
        return {"returncode": None, "tail": f"{tail}\nstopped after {PYTEST_SECONDS} s", "pass": False}
    return {"returncode": done.returncode, "tail": done.stdout[-3000:] + done.stderr[-1000:],
            "pass": done.returncode == 0}


def _scale(kind: str, L: int, m: int, n: int, device) -> torch.Tensor | None:
    shapes = {"tensor": (L,), "channel": (L, m), "block": (L, -(-m // FP8_BLOCK), -(-n // FP8_BLOCK))}
    return None if kind == "none" else torch.rand(shapes[kind], device=device) + 0.5


def _dequantized(W: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    W = W.double()
    if scale is None:
        return W
    if scale.dim() == 1:
        return W * scale.double()[:, None, None]
    if scale.dim() == 2:
        return W * scale.double()[:, :, None]
    m, n = W.shape[-2:]
    expanded = scale.double().repeat_interleave(FP8_BLOCK, 1)[:, :m].repeat_interleave(FP8_BLOCK, 2)[:, :, :n]
    return W * expanded


def check_correctness(device, quick: bool) -> dict:
    """Largest entrywise error of every sketch variant, relative to ``sum |w x|``, against fp64 on the device."""
    L, m, n, b = (2, 70, 150, 5) if quick else (2, 1000, 3000, 20)
    variants = [(torch.float32, "none"), (torch.float16, "none"), (torch.bfloat16, "none")]
    variants += [(fp8, kind) for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2)
                 for kind in ("none", "tensor", "channel", "block")]
    errors = {}
    for dtype, kind in variants:
        W = (10 * torch.randn(L, m, n, device=device)).to(dtype)
        scale = _scale(kind, L, m, n, device)
        Wd = _dequantized(W, scale)
        for transpose in (False, True):
            X = torch.randn(L, m if transpose else n, b, device=device)
            Wo = Wd.mT if transpose else Wd
            out = torch.full((L, Wo.shape[1], b), float("nan"), device=device)
            sketch(W, X, transpose=transpose, scale=scale, scale_block=FP8_BLOCK, out=out)
            bound = Wo.abs() @ X.double().abs()
            error = ((out.double() - Wo @ X.double()).abs() / bound).max()
            name = f"{str(dtype)[6:]}_{kind}_{'WtX' if transpose else 'WX'}"
            errors[name] = float(error) if not out.isnan().any() else float("nan")
    worst = max(errors.values(), key=lambda error: (math.isnan(error), error))  # a NaN is the worst
    return {"relative_errors": errors, "worst": worst, "threshold": THRESHOLDS["sketch_error"],
            "pass": worst <= THRESHOLDS["sketch_error"]}


def measure_rates(device, quick: bool) -> dict:
    size = 1 << (22 if quick else 30)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_s = seconds_per_call(lambda: target.copy_(source))
    side = 256 if quick else 8192
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    matmul_s = seconds_per_call(lambda: a @ a)
    return {"copy_GBps": 2 * size / copy_s / 1e9, "bf16_matmul_TFLOPs": 2 * side**3 / matmul_s / 1e12, "pass": True}


def _rotation(W: torch.Tensor) -> list[torch.Tensor]:
    """W and copies of it, enough that the calls of one timing read four L2 caches' worth of other weights between
    two reads of the same copy (L2 is 50 MB: k/v weights fit in it), so no call finds its weights in L2; at most
    CALLS."""
    l2 = torch.cuda.get_device_properties(W.device).L2_cache_size if W.is_cuda else 0
    copies = max(1, min(CALLS, max(2, -(-4 * l2 // W.nbytes))))
    return [W] + [W.clone() for _ in range(copies - 1)]


def _rotated_rate(call, inputs: list, W_bytes: int, copy_GBps: float) -> dict:
    """``call(x)`` with x cycling through ``inputs`` (rotated copies of the weights): the GPU time of a call
    (CUDA graph, ``gpu``) and of one call from Python (``call``), as rates of reading ``W_bytes``."""
    cycle = itertools.cycle(inputs)

    def step():
        return call(next(cycle))

    gpu = _rate(graph_seconds_per_call(step), W_bytes, copy_GBps)
    return {"gpu": gpu, "call": _rate(seconds_per_call(step), W_bytes, copy_GBps) if torch.cuda.is_available() else gpu}


def _torch_baseline(W: torch.Tensor, scale, X: torch.Tensor, transpose: bool, copy_GBps: float) -> dict:
    """The same product in torch on rotated copies, as rates of reading W's stored bytes: an fp32 copy of the
    (dequantised) weights made once, then fp32 ``bmm`` at full precision; for bf16 weights also ``bmm`` in bf16
    with fp32 output (X rounded to bf16: not fp32-accurate) where torch offers it."""
    upcast = _rotation(_dequantized(W, scale).float())
    with linalg._full_precision_fp32_matmul():
        rates = {"fp32_bmm": _rotated_rate(lambda w: torch.bmm(w.mT if transpose else w, X), upcast, W.nbytes,
                                           copy_GBps)["gpu"]}
    del upcast
    if W.dtype == torch.bfloat16:
        Xb = X.to(torch.bfloat16)
        try:
            rates["bf16_bmm_fp32_out"] = _rotated_rate(
                lambda w: torch.bmm(w.mT if transpose else w, Xb, out_dtype=torch.float32), _rotation(W), W.nbytes,
                copy_GBps)["gpu"]
        except (TypeError, RuntimeError) as error:
            rates["bf16_bmm_fp32_out"] = f"not offered: {error}"[:200]
    return rates


# (label, dtype, scale) timed at every shape; the fp8 scale layouts only where a threshold applies
SKETCH_CASES = [("bf16", torch.bfloat16, "none"), ("fp8e4m3", torch.float8_e4m3fn, "none"),
                ("fp32", torch.float32, "none")]
FP8_SCALED = [(f"fp8e4m3_{kind}", torch.float8_e4m3fn, kind) for kind in ("tensor", "channel", "block")]


def time_sketch(device, quick: bool, copy_GBps: float) -> dict:
    """The sketch kernel (fp32 accurate) per Llama-70B shape and orientation for bf16, fp8 e4m3 (every scale layout
    at the shapes with a threshold) and fp32 weights, each with torch's time for the same product beside it
    (:func:`_torch_baseline`), every timing on rotated copies of the weights (:func:`_rotation`). Thresholds
    (issue 21): bf16 >= 0.8 of the copy rate at 8192×28672 and >= 0.7 at 8192², fp8 e4m3 (any scale) >= 0.6 in
    bytes at both, fp32 no slower than torch's fp32 ``bmm`` of the same weights (no fp32 sketch timing was committed
    before: gpu_check-2026-11-30*.json timed bf16 and fp8)."""
    shapes = {"small": (256, 688)} if quick else SHAPES_70B
    rows, lines = {}, []
    for name, (m, n) in shapes.items():
        row = {"shape": [m, n]}
        for label, dtype, kind in SKETCH_CASES + (FP8_SCALED if quick or name in SKETCH_TARGETS else []):
            W = torch.randn(1, m, n, device=device).to(dtype)
            scale = _scale(kind, 1, m, n, device)
            weights = _rotation(W)
            for transpose in (False, True):
                X = torch.randn(1, m if transpose else n, 20, device=device)
                entry = _rotated_rate(lambda w: sketch(w, X, transpose=transpose, scale=scale, scale_block=FP8_BLOCK),
                                      weights, W.nbytes, copy_GBps)
                entry["torch"] = _torch_baseline(W, scale, X, transpose, copy_GBps)
                key = f"{label}_{'WtX' if transpose else 'WX'}"
                row[key] = entry
                lines.append(f"  {name:14} {key:22} sketch {_fraction(entry['gpu'])} of copy rate; torch "
                             + ", ".join(f"{what} {_fraction(rate)}" for what, rate in entry["torch"].items()))
            del weights
        rows[name] = row
    checks = _sketch_checks(rows) if not quick else {}
    return {"shapes": rows, "checks": checks, "lines": lines, "threshold": THRESHOLDS["sketch"],
            "pass": all(check["pass"] for check in checks.values())}


def _fraction(rate) -> str:
    value = rate.get("fraction_of_copy") if isinstance(rate, dict) else None
    return f"{value:.2f}" if value is not None else str(rate)[:60]


SKETCH_TARGETS = {"down_proj": "8192x28672", "q_proj/o_proj": "8192x8192"}


def _sketch_checks(rows: dict) -> dict:
    """Issue 21's speed thresholds on the GPU times (fractions of the copy rate) of :func:`time_sketch`."""
    def gpu(shape, key):
        return rows[shape][key]["gpu"]["fraction_of_copy"] or 0.0

    checks = {}
    for shape, label in SKETCH_TARGETS.items():
        limit = THRESHOLDS["sketch"][f"bf16_{label}"]
        worst = min(gpu(shape, f"bf16_{o}") for o in ("WX", "WtX"))
        checks[f"bf16_{label}"] = {"worst": worst, "threshold": limit, "pass": worst >= limit}
        keys = [key for key in rows[shape] if key.startswith("fp8e4m3")]
        worst = min(gpu(shape, key) for key in keys)
        limit = THRESHOLDS["sketch"]["fp8e4m3_any_scale"]
        checks[f"fp8e4m3_{label}"] = {"worst": worst, "cases": keys, "threshold": limit, "pass": worst >= limit}
    slower = {f"{shape}_{key}": [gpu(shape, key), rows[shape][key]["torch"]["fp32_bmm"]["fraction_of_copy"]]
              for shape in rows for key in rows[shape] if key.startswith("fp32")}
    faster = [theirs is not None and mine >= theirs for mine, theirs in slower.values()]  # no torch time: a failure
    checks["fp32_no_slower_than_torch_fp32"] = {"sketch_and_torch": slower, "pass": all(faster)}
    return checks


def time_cosine(device, quick: bool, copy_GBps: float) -> dict:
    """``linalg.match``'s GPU path: ``gpu`` the product and max/argmax alone (CUDA graph), ``call`` one whole match
    from Python (with its NaN check, a host synchronisation)."""
    s = 64 if quick else 8192
    rows, worst = {}, float("inf")
    for L in (1, 8):
        Z = torch.linalg.qr(torch.randn(L, s, s, device=device, dtype=torch.float64)).Q
        W0 = torch.zeros(1, 1, 1, device=device).expand(L, s, s)  # unused by the small side's match
        basis = linalg.BaseBasis(W0=W0, sigma=torch.ones(L, s, device=device),
                                 Z=Z.float(), kind="explicit32")  # a cached (fp32) basis; left = small side
        basis_fp32 = basis.small_basis_fp32
        for k in (10, 32):
            Y = torch.linalg.qr(torch.randn(L, s, k, device=device, dtype=torch.float64)).Q
            Y32 = Y.float()

            def cosines(transposed: bool):
                """max/argmax of the cosines as ``Z^T Y`` ``[L, s, k]``, or ``transposed`` as ``Y^T Z``
                ``[L, k, s]`` (the other GEMM shape)."""
                with linalg._full_precision_fp32_matmul():
                    if transposed:
                        return (Y32.mT @ basis_fp32).abs().max(dim=-1)
                    return (basis_fp32.mT @ Y32).abs().max(dim=-2)

            gpu, gpu_transposed = (_rate(graph_seconds_per_call(lambda: cosines(transposed)), 4 * L * s * s,
                                         copy_GBps) for transposed in (False, True))
            call = _rate(seconds_per_call(lambda: linalg.match(basis, Y, "left", (0.5,), "triton")),
                         4 * L * s * s, copy_GBps)
            rows[f"L{L}_k{k}"] = {"gpu": gpu, "gpu_transposed": gpu_transposed, "call": call}
            worst = min(worst, gpu["fraction_of_copy"] if gpu["fraction_of_copy"] is not None else 0.0)
    return {"cases": rows, "worst_gpu_fraction": worst, "threshold": THRESHOLDS["cosine_fraction_of_copy"],
            "pass": quick or worst >= THRESHOLDS["cosine_fraction_of_copy"]}


def time_krylov(device, quick: bool) -> dict:
    s, (m, n) = (128, (256, 688)) if quick else (8192, (8192, 28672))
    A = torch.randn(s, s, device=device, dtype=torch.float64)
    gram = A @ A.mT
    torch.linalg.eigh(gram)
    if device.type == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    torch.linalg.eigh(gram)
    if device.type == "cuda":
        torch.cuda.synchronize()
    eigh_s = time.perf_counter() - begin
    W = torch.randn(1, m, n, device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float16)
    K = torch.linalg.qr(torch.randn(1, m, 20, device=device, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(1, m, 40, device=device, dtype=torch.float64)).Q
    B = torch.randn(1, 60, n, device=device, dtype=torch.float64)

    def products():
        WtK = linalg.product(W, K, transpose=True, backend="triton")
        return linalg.product(W, WtK, transpose=False, backend="triton")

    def rest():  # the step as truncated_svd takes it: Cholesky QR of the new block, eigh, one stopping read
        _, orthonormal = linalg.cholesky_orthonormalize(K, Q)
        torch.linalg.eigh(B @ B.mT)
        return torch.stack([(B[:, 0, 0] > 0).all(), orthonormal.all()]).tolist()

    def on_the_host():  # eigh of the Rayleigh–Ritz matrix on the CPU instead (its copy is the synchronisation)
        lam, Z = torch.linalg.eigh((B @ B.mT).cpu())
        return Z.to(B.device, non_blocking=True)

    products_s, rest_s = seconds_per_call(products), seconds_per_call(rest)
    share = products_s / (products_s + rest_s)
    return {"eigh_fp64_gram_s": eigh_s, "gram_size": s, "products_s": products_s, "orthonormalise_eigh_sync_s": rest_s,
            "products_share": share, "threshold": THRESHOLDS["krylov_products_share"],
            "parts_s": {"cholesky_qr": seconds_per_call(lambda: linalg.cholesky_orthonormalize(K, Q)),
                        "householder_qr": seconds_per_call(lambda: linalg.orthonormalize(K, Q)),
                        "eigh_device": seconds_per_call(lambda: torch.linalg.eigh(B @ B.mT)),
                        "eigh_host": seconds_per_call(on_the_host),
                        "sync": seconds_per_call(lambda: bool((B[:, :1, :1] > 0).all()))},
            "shape": [m, n], "pass": quick or share >= THRESHOLDS["krylov_products_share"]}


def time_layer(device, quick: bool) -> dict:
    """Seconds for one decoder layer against cached bases (built first, timed apart), tuned side only, each matrix
    analysed alone (L = 1). The layer runs twice: the first pass compiles the kernels for its shapes (once per
    process), the second is the time a scan pays per layer."""
    shapes = synthetic.llama_layer_shapes(256, 64, 688) if quick else synthetic.llama_layer_shapes(8192, 1024, 28672)
    shapes = dict(list(shapes.items())[:2]) if quick else shapes  # the rehearsal: two matrices
    generator = torch.Generator().manual_seed(2)
    pairs, build_s = [], 0.0
    for name, (m, n) in shapes.items():
        W0 = synthetic.random_weight(m, n, generator=generator).to(device).to(torch.bfloat16)[None]
        begin = time.perf_counter()
        basis = linalg.base_basis(W0)
        basis = linalg.BaseBasis(W0=W0, sigma=basis.sigma, Z=basis.small_basis_fp32, kind="explicit32")
        build_s += _synchronized(begin, device)
        A, B = synthetic.lora_update(m, n, 16, generator=generator, lora_alpha=32.0, sigma=7.5)
        A, B = A.to(device)[None], B.to(device)[None]
        pairs.append((W0, basis, (B, A, 2.0), (W0.float() + 2.0 * B @ A).to(torch.bfloat16)))
    passes = []
    for _ in range(2):
        lora_s = full_s = 0.0
        iterations = {"lora": [], "full": []}
        for W0, basis, lora, Wt in pairs:
            begin = time.perf_counter()
            result = lorafft.analyze(W0, lora=lora, k=10, basis=basis, backend="triton")["left"]
            lora_s += _synchronized(begin, device)
            iterations["lora"].append(result.iterations)
            begin = time.perf_counter()
            result = lorafft.analyze(W0, Wt, k=10, basis=basis, backend="triton")["left"]
            full_s += _synchronized(begin, device)
            iterations["full"].append(result.iterations)
        passes.append({"lora_s": lora_s, "full_s": full_s, "iterations": iterations})
    limit = THRESHOLDS["layer_seconds"]
    warm = passes[1]
    return {"layer_seconds_lora": warm["lora_s"], "layer_seconds_full": warm["full_s"],
            "iterations": warm["iterations"], "first_pass_with_compilation": passes[0],
            "base_cache_build_seconds": build_s, "threshold": limit,
            "pass": quick or max(warm["lora_s"], warm["full_s"]) < limit}


def _same_rows(mine, theirs) -> dict:
    """Rows of two analyses of the same weights: equal counts and argmax, and the largest max|cos| difference."""
    same = len(mine) == len(theirs) and all(
        (a.name, a.side, a.counts, a.argmax) == (b.name, b.side, b.counts, b.argmax) for a, b in zip(mine, theirs))
    difference = max((abs(x - y) for a, b in zip(mine, theirs) for x, y in zip(a.max_cos, b.max_cos)), default=0.0)
    return {"rows": len(mine), "counts_and_argmax_equal": same, "max_abs_difference": difference,
            "pass": same and bool(mine) and difference <= THRESHOLDS["scan_max_cos_difference"]}


def check_cli(device, quick: bool) -> dict:
    """The command line as a user types it on a GPU machine: ``lorafft demo --dir``, ``lorafft scan`` of the adapter
    (on the GPU by default), ``lorafft cache build --device``, ``lorafft scan --base-cache`` of the full fine-tune;
    each report against the same scan with ``--device cpu``."""
    import tempfile

    from lorafft.report import Report

    def lorafft_command(*args) -> dict:
        done = subprocess.run([sys.executable, "-m", "lorafft", *map(str, args), "--quiet"], capture_output=True,
                              text=True, timeout=300)
        return {"returncode": done.returncode, "stderr": done.stderr[-500:]}

    with tempfile.TemporaryDirectory() as directory:
        d = Path(directory)
        demo = d / "demo"
        commands = {"demo": lorafft_command("demo", "--dir", demo),
                    "scan_lora": lorafft_command("scan", demo / "lora", "--out", d / "lora.json"),
                    "scan_lora_cpu": lorafft_command("scan", demo / "lora", "--device", "cpu", "--out",
                                                     d / "lora_cpu.json"),
                    "cache_build": lorafft_command("cache", "build", demo / "base", "--device", device, "--out",
                                                   d / "cache"),
                    "scan_full_cached": lorafft_command("scan", demo / "base", demo / "full", "--base-cache",
                                                        d / "cache", "--out", d / "full.json"),
                    "scan_full_cpu": lorafft_command("scan", demo / "base", demo / "full", "--device", "cpu",
                                                     "--out", d / "full_cpu.json")}
        result = {"commands": commands}
        if all(c["returncode"] == 0 for c in commands.values()):
            for kind in ("lora", "full"):
                result[kind] = _same_rows(Report.load(d / f"{kind}.json").rows,
                                          Report.load(d / f"{kind}_cpu.json").rows)
    return {**result, "pass": all(result.get(kind, {}).get("pass", False) for kind in ("lora", "full"))}


def check_tracking(device, quick: bool) -> dict:
    """``lorafft.Tracker`` on a small PEFT LoRA BERT (2 layers, hidden 128, r = 8, random B) on the device: the rows
    of two tracked steps (the second warm-started) equal a CPU tracker's of the same weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    from lorafft.tracking import Tracker

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512)
    model = get_peft_model(BertModel(config), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value",
                                                                                             "dense"]))
    factors = [p for name, p in model.named_parameters() if "lora_B" in name]
    generator = torch.Generator().manual_seed(1)
    steps = [[torch.randn(p.shape, generator=generator) * 0.05 for p in factors] for _ in range(2)]
    rows = {}
    for where in ("cpu", str(device)):
        model.to(where)
        tracker = None
        for step, values in enumerate(steps, start=1):
            with torch.no_grad():
                for p, value in zip(factors, values):
                    p.copy_(value)
            tracker = tracker or Tracker(model)
            rows[(where, step)] = tracker.step(step)
    result = {f"step_{step}": _same_rows(rows[(str(device), step)], rows[("cpu", step)]) for step in (1, 2)}
    return {**result, "pass": all(entry["pass"] for entry in result.values())}


# Tile candidates of the sweep: (BLOCK_R, BLOCK_K for 16-bit W, BLOCK_K for fp8 W, warps, stages for 16-bit W,
# stages for fp8 W, fp8 W prefetched into registers, CTAs per SM that fit). The first is the default
# (kernels/sketch.py); the others change one thing or two: stages and 64-deep fp8 tiles, fp8 through the
# shared-memory pipeline, 256-row tiles (half the X traffic per W byte), 128-deep 16-bit tiles.
TILE_CANDIDATES = [(128, 64, 128, 4, 4, 2, True, 2), (128, 64, 64, 4, 3, 3, True, 2), (128, 64, 64, 4, 4, 3, False, 2),
                   (256, 64, 128, 8, 3, 2, True, 1), (128, 128, 128, 4, 2, 2, True, 2)]


def sweep_tiles(device, quick: bool, copy_GBps: float) -> dict:
    """The sketch kernel's GPU time (CUDA graph, rotated weights) at two Llama-70B shapes, both orientations, bf16
    and fp8 e4m3, for each tile candidate, as a fraction of the copy rate, with its largest error relative to fp64
    (a fast tile that is wrong does not count). Not in the default run: ``--only tiles``."""
    import lorafft.kernels.sketch as kernel

    names = ("BLOCK_R", "BLOCK_K", "NUM_WARPS", "NUM_STAGES", "PREFETCH", "CTAS_PER_SM")
    default = {name: getattr(kernel, name) for name in names}  # the dicts are replaced, not changed
    shapes = {"small": (256, 688)} if quick else {"down_proj": (8192, 28672), "q_proj/o_proj": (8192, 8192)}
    cases = []
    for name, (m, n) in shapes.items():
        W = torch.randn(1, m, n, device=device).to(torch.bfloat16)
        weights = {"bf16": W} if quick else {"bf16": W, "fp8": W.to(torch.float8_e4m3fn)}
        for transpose in (False, True):
            X = torch.randn(1, m if transpose else n, 20, device=device)
            for label, Wq in weights.items():
                Wd = Wq.double().mT if transpose else Wq.double()
                reference, bound = Wd @ X.double(), Wd.abs() @ X.double().abs()
                cases.append((f"{name}_{label}_{'WtX' if transpose else 'WX'}", _rotation(Wq), X, transpose,
                              reference, bound))
    results = {}
    try:
        for candidate in TILE_CANDIDATES[:2] if quick else TILE_CANDIDATES:
            r, k16, k8, warps, stages16, stages8, prefetch8, ctas = candidate
            kernel.BLOCK_R, kernel.NUM_WARPS = r, warps
            kernel.BLOCK_K = {**default["BLOCK_K"], 1: k8, 2: k16}
            kernel.NUM_STAGES = {**default["NUM_STAGES"], 1: stages8, 2: stages16}
            kernel.PREFETCH = {**default["PREFETCH"], 1: prefetch8}
            kernel.CTAS_PER_SM = {size: ctas for size in default["CTAS_PER_SM"]}
            entry = {}
            for case, rotation, X, transpose, reference, bound in cases:
                try:
                    error = float(((sketch(rotation[0], X, transpose=transpose).double() - reference).abs()
                                   / bound).max())
                    timing = _rotated_rate(lambda w: sketch(w, X, transpose=transpose), rotation,
                                           rotation[0].nbytes, copy_GBps)["gpu"]
                    entry[case] = {"fraction_of_copy": timing["fraction_of_copy"], "s": timing["s"], "error": error}
                except Exception as failure:  # noqa: BLE001 (a tile that does not fit is a result too)
                    entry[case] = {"error": f"{type(failure).__name__}: {failure}"[:200]}
            results[str(candidate)] = entry
    finally:
        for name, value in default.items():
            setattr(kernel, name, value)
    return {"candidates": results, "pass": True}


def _synchronized(begin: float, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def check_scan(device, quick: bool) -> dict:
    """``lorafft.scan`` of the synthetic trio on the device against the same scan on the CPU."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        trio = synthetic.write_trio(Path(directory))
        result = {kind: _same_rows(lorafft.scan(trio.base, getattr(trio, kind), eps=(0.5, 0.9), side="both",
                                                device=str(device)).rows,
                                   lorafft.scan(trio.base, getattr(trio, kind), eps=(0.5, 0.9), side="both",
                                                device="cpu").rows)
                  for kind in ("lora", "full")}
    return {**result, "pass": all(entry["pass"] for entry in result.values())}

WHOLE_MODEL_LAYERS = 4  # Llama-70B layers: 1.7 GB each in bf16, twice (base, full fine-tune), plus 1.3 GB of cache


def check_whole_model(device, quick: bool, out: Path) -> dict:
    """``benchmarks/whole_model.py`` on the device: 70B-shaped layers written to disk, ``cache build``, and scans of a
    LoRA adapter and a full fine-tune against the cache and without it, each in a fresh process, against its read
    floor, with the memory model's prediction beside the allocator's peak (issue 20's targets; quick: the tiny
    shapes, no thresholds)."""
    import shutil
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    import whole_model

    directory = Path(tempfile.mkdtemp(prefix="lorafft-whole-model-"))
    try:
        record = whole_model.run("quick" if quick else "70b", 1 if quick else WHOLE_MODEL_LAYERS, directory, out,
                                 str(device), "gpu_check.py --only whole_model")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    checks = {kind: entry["pass"] for kind, entry in record["agreement"].items()}
    if not quick:
        limits = THRESHOLDS["whole_model"]
        for scan in record["scans"]:
            name = scan["name"].replace(" ", "_")
            checks[f"{name}_md_share"] = scan["magnitude_direction_share"] < limits["magnitude_direction_share"]
            checks[f"{name}_device_within_prediction"] = (
                abs(scan["device_over_prediction"] - 1) <= limits["device_prediction_error"])
            checks[f"{name}_device_share"] = scan["device_share"] < limits["device_share"]
            if "cached" in scan["name"] and "uncached" not in scan["name"]:
                checks[f"{name}_ratio"] = scan["ratio"] <= limits["cached_over_read_floor"]
    return {**record, "checks": checks, "pass": all(checks.values())}


SECTIONS = ("pytest", "correctness", "rates", "sketch", "cosine", "krylov", "layer", "scan", "cli", "tracking")
EXTRA_SECTIONS = ("tiles", "whole_model")  # run only when named in --only


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU rehearsal: small sizes, no speed thresholds")
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default $OUT)")
    parser.add_argument("--only", nargs="+", metavar="SECTION", choices=SECTIONS + EXTRA_SECTIONS,
                        help=f"run only these sections: {', '.join(SECTIONS + EXTRA_SECTIONS)} (the last ones only "
                             "when named)")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out DIR is needed when $OUT is not set")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    global CALLS, SAMPLES
    CALLS, SAMPLES = (1, 1) if quick else (CALLS, SAMPLES)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
              "driver": _driver(), "torch": torch.__version__, "triton": _triton_version(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": quick, "thresholds": THRESHOLDS}
    copy = {"GBps": float("nan")}
    every_section = {
        "pytest": lambda: run_pytest(device, quick),
        "correctness": lambda: check_correctness(device, quick),
        "rates": lambda: measure_rates(device, quick),
        "sketch": lambda: time_sketch(device, quick, copy["GBps"]),
        "cosine": lambda: time_cosine(device, quick, copy["GBps"]),
        "krylov": lambda: time_krylov(device, quick),
        "layer": lambda: time_layer(device, quick),
        "scan": lambda: check_scan(device, quick),
        "cli": lambda: check_cli(device, quick),
        "tracking": lambda: check_tracking(device, quick),
        "tiles": lambda: sweep_tiles(device, quick, copy["GBps"]),
        "whole_model": lambda: check_whole_model(device, quick, args.out),
    }
    sections = {name: every_section[name] for name in args.only or SECTIONS}
    if "rates" not in sections and {"sketch", "cosine", "tiles"} & set(sections):
        sections = {"rates": every_section["rates"], **sections}  # their fractions are of the copy rate
    with open(args.out / "gpu_check.log", "w") as log:
        def say(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        say(f"gpu_check on {report['device']} (torch {report['torch']}, triton {report['triton']})")
        for name, section in sections.items():
            begin = time.perf_counter()
            try:
                report[name] = section()
            except Exception as error:  # recorded: one failure costs that section, not the device time
                report[name] = {"error": f"{type(error).__name__}: {error}"[:2000], "pass": False}
            report[name]["seconds"] = time.perf_counter() - begin
            for line in report[name].pop("lines", []):  # a section's own table (the sketch's rates beside torch's)
                say(line)
            copy["GBps"] = report.get("rates", {}).get("copy_GBps", copy["GBps"])
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
            verdict = "PASS" if report[name]["pass"] else "FAIL"
            say(f"{verdict} {name} ({report[name]['seconds']:.1f} s): {json.dumps(report[name])[:1500]}")
    return 0 if all(report[name]["pass"] for name in sections) else 1


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
    sys.exit(main())
