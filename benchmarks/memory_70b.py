"""Peak host memory of a CPU scan at true Llama-70B shapes, against the checkpoint size and the largest matrix.

Writes (once) a synthetic base checkpoint of two decoder layers with Llama-70B's shapes (hidden 8192, k/v 1024 wide,
intermediate 28672; bf16; sharded at 2 GB) and a rank-16 PEFT LoRA adapter on all seven projections, then scans
it in a child process (``python -m lorafft scan``) and reads that process's peak resident set size. Results go
to ``benchmarks/results/memory_70b.json``.

    python benchmarks/memory_70b.py --dir /tmp/lorafft-70b          # about 15 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from lorafft import synthetic

HIDDEN, KV, INTERMEDIATE, LAYERS, RANK = 8192, 1024, 28672, 2, 16
SHAPES = synthetic.llama_layer_shapes(HIDDEN, KV, INTERMEDIATE)


def write(directory: Path) -> None:
    """The base (bf16, sharded) and a rank-16 adapter, unless already there."""
    if (directory / "base" / "model.safetensors.index.json").exists():
        return
    generator = torch.Generator().manual_seed(0)
    state, modules = {}, {}
    for layer in range(LAYERS):
        for module, (rows, cols) in SHAPES.items():
            name = f"model.layers.{layer}.{module}"
            state[f"{name}.weight"] = synthetic.random_weight(rows, cols, generator=generator, dtype=torch.bfloat16)
            modules[name] = synthetic.lora_update(rows, cols, RANK, generator=generator, lora_alpha=2 * RANK,
                                                  sigma=synthetic.LORA_SIGMA * synthetic.SIGMA1)
    synthetic.write_checkpoint(state, directory / "base", max_shard_bytes=2 << 30)
    synthetic.write_peft_adapter(directory / "lora", modules, r=RANK, lora_alpha=2 * RANK,
                                 target_modules=sorted({m.split(".")[-1] for m in SHAPES}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="where the synthetic checkpoint is (or will be) written")
    parser.add_argument("--max-batch-bytes", default="1", help="passed to lorafft scan, in GB (default: 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_70b.json"))
    args = parser.parse_args()
    directory = Path(args.dir)
    write(directory)
    checkpoint_bytes = sum(f.stat().st_size for f in (directory / "base").glob("*.safetensors"))
    largest = max(rows * cols for rows, cols in SHAPES.values())
    for leftover in ("report.json", "report.json.journal"):  # this script's own outputs from an earlier run
        (directory / leftover).unlink(missing_ok=True)
    start = time.perf_counter()
    scan = subprocess.run([sys.executable, "-m", "lorafft", "scan", str(directory / "base"), str(directory / "lora"),
                           "--out", str(directory / "report.json"), "--max-batch-bytes", args.max_batch_bytes,
                           "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if scan.returncode != 0:
        sys.exit(f"scan failed: {scan.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    result = {
        "checkpoint_bytes": checkpoint_bytes,
        "largest_matrix": list(max(SHAPES.values(), key=lambda s: s[0] * s[1])),
        "largest_matrix_fp32_bytes": 4 * largest,
        "max_batch_bytes": float(args.max_batch_bytes) * 2**30,
        "peak_rss_bytes": peak,
        "peak_over_checkpoint": peak / checkpoint_bytes,
        "peak_over_largest_fp32": peak / (4 * largest),
        "scan_seconds": seconds,
        "matrices": LAYERS * len(SHAPES),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(scan.stdout)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
