"""A whole model scanned as users scan it: synthetic Llama-shaped checkpoints written to disk, ``cache build``, and
scans of a LoRA adapter and of a full fine-tune against the cache and without it, each timed against the time to
read what it reads (issue 20).

Writes, under ``--dir``: ``base/`` and ``full/`` (``--layers`` Llama decoder layers at ``--shape`` 7b or 70b, bf16,
sharded safetensors with an index and a ``config.json``), ``lora/`` (a PEFT adapter, r = 16, α = 32, on all seven
projections) and ``cache/``. Each scan runs as a command in a fresh process (``lorafft scan ... --profile --out``),
so its peak resident memory is its own (the child's ``VmHWM``); the report's ``profile`` gives the wall time and each stage's
busy seconds (``lorafft.profiling``). The **read floor** of a scan is the time to read every byte it reads: the same
files through the same loader (``lorafft.loading.BatchLoader``, the same batches, cached bases included), in a fresh
process, no analysis. Both run on files the page cache holds (they were just written): the ratio compares like with
like, and the floor is the loader's, not the disk's.

Writes ``whole_model.json`` under ``--out``: the machine and versions, the files' sizes, ``cache_build`` (seconds,
peak RSS), and ``scans``, one entry per scan: ``name``, ``seconds``, ``read_floor_seconds``, ``ratio``, ``stages``,
``stage_share`` (the stages' sum over the wall time; they overlap), ``magnitude_direction_share``, ``peak_rss_bytes``
and ``predicted_rss_bytes`` (the process's baseline plus :mod:`lorafft.memory`'s host bytes for the largest batch: both
batches' inputs, the basis, the blocks, the workspace, and the loader's mapped shards), and on CUDA
``peak_device_bytes`` (the scan's allocator peak) beside ``predicted_device_bytes`` (the memory model's peak for its
largest batch), both from the report's ``profile.memory``; and ``agreement``, per kind, the scan against the cache
beside the one without it (other paths, other bases): counts equal away from thresholds, every max|cos| within the
two certified bounds. The same code is ``gpu_check.py --only whole_model``.

    python benchmarks/whole_model.py --shape 7b --layers 2 --dir /tmp/lorafft-7b --out benchmarks/results
    python benchmarks/whole_model.py --quick --dir /tmp/lorafft-quick --out /tmp    # the CPU rehearsal (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, key/value width (heads × head_dim), intermediate
    "7b": (4096, 4096, 11008),
    "70b": (8192, 1024, 28672),
    "quick": (96, 32, 256),
}
RANK = 16
WORKER = "benchmarks/whole_model.py"


def write_model(directory: Path, shape: str, layers: int, seed: int = 0) -> dict[str, Path]:
    """``base/``, ``full/`` and ``lora/`` under ``directory`` (kept when already there for these settings)."""
    from lorafft import synthetic
    from lorafft.io.writer import write_checkpoint

    marker = directory / "written.json"
    settings = {"shape": shape, "layers": layers, "seed": seed}
    paths = {name: directory / name for name in ("base", "full", "lora")}
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return paths
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    hidden, kv, intermediate = SHAPES[shape]
    generator = torch.Generator().manual_seed(seed)
    base, full, adapter = {}, {}, {}
    for layer in range(layers):
        for module, (m, n) in synthetic.llama_layer_shapes(hidden, kv, intermediate).items():
            name = f"model.layers.{layer}.{module}"
            W0 = synthetic.random_weight(m, n, generator=generator)
            base[f"{name}.weight"] = W0.to(torch.bfloat16)
            full[f"{name}.weight"] = (W0 + synthetic.full_finetune_update(W0, generator=generator)).to(torch.bfloat16)
            adapter[name] = synthetic.lora_update(m, n, RANK, generator=generator, lora_alpha=2.0 * RANK,
                                                  sigma=synthetic.LORA_SIGMA * synthetic.SIGMA1)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "torch_dtype": "bfloat16"}
    shard = max(1, sum(t.numel() * t.element_size() for t in base.values()) // max(2, layers))
    write_checkpoint(base, paths["base"], max_shard_bytes=shard, config=config)
    write_checkpoint(full, paths["full"], max_shard_bytes=shard, config=config)
    synthetic.write_peft_adapter(paths["lora"], adapter, r=RANK, lora_alpha=2.0 * RANK,
                                 target_modules=list(synthetic.LORA_TARGETS),
                                 base_model_name_or_path=os.path.abspath(paths["base"]))
    marker.write_text(json.dumps(settings))
    return paths


def _run(arguments: list[str], env: dict) -> tuple[float, int, str]:
    """``(seconds, peak RSS bytes, stdout)`` of ``python benchmarks/whole_model.py --child ARGUMENTS`` run to its end:
    the child reports its own peak (``VmHWM``: the resident high-water mark of its own memory map, which an
    ``os.wait4`` maximum would not give: Linux carries the parent's resident size at the fork over the exec)."""
    import tempfile

    argv = [sys.executable, str(Path(__file__).resolve()), "--child", *arguments]  # from any working directory
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        if done.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(argv)} failed: {errors.read()[-2000:]}")
    seconds = time.perf_counter() - start
    *output, last = done.stdout.strip().splitlines()
    return seconds, json.loads(last)["peak_rss_bytes"], "\n".join(output)


def child(arguments: list[str]) -> int:
    """In this process: ``lorafft ARGUMENTS`` (or ``floor REPORT DEVICE``, or ``baseline``: what a scan process holds
    before it reads anything), then a last line ``{"peak_rss_bytes": ...}`` from ``/proc/self/status``."""
    if arguments[0] == "baseline":
        import lorafft.scan  # noqa: F401
        code = 0
    elif arguments[0] == "floor":
        print(json.dumps(read_floor(arguments[1], arguments[2])))
        code = 0
    else:
        from lorafft.cli import main as lorafft_main

        code = lorafft_main(arguments)
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_bytes": peak}), flush=True)
    return code


def scans(paths: dict[str, Path], cache: Path) -> list[tuple[str, list[str]]]:
    """The four scans: LoRA and full fine-tune, against the cache and without it."""
    return [(f"{kind} {'cached' if cached else 'uncached'}",
             [str(paths["base"]), str(paths[kind])] + (["--base-cache", str(cache)] if cached else []))
            for kind in ("lora", "full") for cached in (True, False)]


def measure(paths: dict[str, Path], out: Path, device: str) -> dict:
    """Build the cache, run every scan and its read floor, each in a fresh process; the JSON record."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    cache = paths["base"].parent / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    build_seconds, build_rss, _ = _run(["cache", "build", str(paths["base"]), "--out", str(cache), "--device", device,
                                        "--quiet"], env)
    _, baseline, _ = _run(["baseline"], env)
    record = {"cache_build": {"seconds": build_seconds, "peak_rss_bytes": build_rss}, "baseline_rss_bytes": baseline,
              "scans": []}
    for name, arguments in scans(paths, cache):
        report = out / f"whole-model-{name.replace(' ', '-')}.json"
        seconds, rss, _ = _run(["scan", *arguments, "--device", device, "--profile", "--quiet", "--out", str(report)],
                               env)
        _, _, floor_out = _run(["floor", str(report), device], env)
        data = json.loads(report.read_text())
        floor = json.loads(floor_out.strip().splitlines()[-1])
        profile = data["profile"]
        stages = profile["stages"]
        wall = profile["wall_seconds"]
        record["scans"].append({
            "name": name, "seconds": wall, "process_seconds": seconds,
            "read_floor_seconds": floor["seconds"], "ratio": wall / floor["seconds"],
            "stages": stages, "stage_share": sum(stages.values()) / wall,
            "magnitude_direction_share": stages["magnitude_direction"] / wall,
            "peak_rss_bytes": rss, "predicted_rss_bytes": baseline + floor["predicted_host_bytes"],
            "rss_over_prediction": rss / (baseline + floor["predicted_host_bytes"]),
            **_device_memory(profile, device),
            "batches": floor["batches"], "max_batch_bytes": data["options"]["max_batch_bytes"],
            "totals": data["totals"], "methods": sorted({row.get("method") for row in data["matrices"]}),
        })
    record["agreement"] = {kind: agreement(out / f"whole-model-{kind}-cached.json",
                                           out / f"whole-model-{kind}-uncached.json") for kind in ("lora", "full")}
    for name, _ in scans(paths, cache):
        (out / f"whole-model-{name.replace(' ', '-')}.json").unlink()
    return record


CACHED_BASIS_ERROR = 1e-5  # a cache's fp32 basis's own error on max|cos|, which the certified bounds leave out


def agreement(first: Path, second: Path) -> dict:
    """Two reports of the same weights (against the cache and without it: other paths, other bases): every count
    equal where no max|cos| of the row lies near a threshold, and every max|cos| within the two certified bounds
    plus :data:`CACHED_BASIS_ERROR` (the bounds certify the tuned vectors; the cached basis is fp32: measured 1.3e-8
    on MiniLM's stored side, up to 4e-7 in ``--quick``'s comparison, on a side derived from it, ``u = W0 v / σ``, where
    small σ amplify it)."""
    from lorafft.report import Report

    mine, theirs = Report.load(first).rows, Report.load(second).rows
    counted = [(a, b) for a, b in zip(mine, theirs) if not any(a.near_threshold) and not any(b.near_threshold)]
    beyond = [(a.name, a.side, abs(x - y), bx + by) for a, b in zip(mine, theirs)
              for x, y, bx, by in zip(a.max_cos, b.max_cos, a.error_bound, b.error_bound)
              if abs(x - y) > bx + by + CACHED_BASIS_ERROR]
    same = len(mine) == len(theirs) and all((a.name, a.side) == (b.name, b.side) for a, b in zip(mine, theirs))
    counts = all(a.counts == b.counts for a, b in counted)
    return {"rows": len(mine), "rows_compared_for_counts": len(counted), "counts_equal": counts,
            "max_abs_difference": max((abs(x - y) for a, b in zip(mine, theirs) for x, y in zip(a.max_cos, b.max_cos)),
                                      default=0.0),
            "beyond_bounds": beyond[:5], "pass": same and counts and not beyond}


def _device_memory(profile: dict, device: str) -> dict:
    """On CUDA: the scan's allocator peak beside the memory model's prediction for its largest batch (both from the
    report's ``profile.memory``), their ratio, and the device's total memory."""
    if not device.startswith("cuda"):
        return {}
    memory = profile["memory"]
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return {"peak_device_bytes": memory["peak_allocated_bytes"],
            "predicted_device_bytes": memory["predicted_peak_bytes"],
            "device_over_prediction": memory["peak_allocated_bytes"] / max(1, memory["predicted_peak_bytes"]),
            "device_total_bytes": total, "device_share": memory["peak_allocated_bytes"] / total}


def read_floor(report_path: str, device: str) -> dict:
    """In this process: read every byte a scan read (its report names inputs and options) through the same loader
    and batches, no analysis; the memory model's prediction for its largest batch beside it."""
    import contextlib

    from lorafft import linalg, memory, pairing
    from lorafft.cache import BaseCache
    from lorafft.options import ScanOptions
    from lorafft.scan import _Inputs
    from lorafft.loading import BatchLoader

    data = json.loads(Path(report_path).read_text())
    recorded = {key: value for key, value in data["options"].items() if key in ScanOptions.__dataclass_fields__}
    settings = ScanOptions(**recorded)
    device = torch.device(device)
    native = linalg.resolve_backend(device) == "triton"
    cache = None if settings.base_cache is None else BaseCache(settings.base_cache)
    with contextlib.ExitStack() as stack:
        inputs = _Inputs.open(data["inputs"]["base"], data["inputs"]["tuned"], settings, stack, {})
        plan = inputs.plan(device, native, settings.k, cache is not None)
        batches = pairing.shape_batches(inputs.matrices,
                                        lambda shape: memory.batch_size(shape, settings.max_batch_bytes, plan))
        loader = BatchLoader(inputs.base, inputs.sources, inputs.pairs_by_source, device=device, native=native,
                             fp8_stored=True, read_bases=None if cache is None else cache.read)
        start = time.perf_counter()
        for _, loaded in loader.batches(batches):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            del loaded
        seconds = time.perf_counter() - start
    host = max(memory.host_peak(tuple(batch[0].shape), len(batch), plan) for batch in batches) + sum(
        _largest_shard(path) for path in [data["inputs"]["base"], *data["inputs"]["tuned"]])
    return {"seconds": seconds, "batches": len(batches), "predicted_host_bytes": host}


def _largest_shard(directory: str) -> int:
    """Bytes of the largest weights file of a checkpoint directory: what the loader may hold mapped (a shard stays
    mapped until its last tensor is read)."""
    return max((entry.stat().st_size for entry in os.scandir(directory) if entry.name.endswith(".safetensors")),
               default=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["7b", "70b"], default="7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dir", default="/tmp/lorafft-whole-model", help="where the checkpoints are written")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="where whole_model.json goes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: the CPU rehearsal the tests run")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # worker: one measured run
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    command = " ".join(["python", WORKER, *(argv if argv is not None else sys.argv[1:])])
    record = run("quick" if args.quick else args.shape, args.layers, Path(args.dir), Path(args.out), args.device,
                 command)
    for scan in record["scans"]:
        print(f"{scan['name']:>15}: {scan['seconds']:7.2f} s, read floor {scan['read_floor_seconds']:6.2f} s "
              f"(x{scan['ratio']:.1f}), stages {100 * scan['stage_share']:.0f}% of wall, ΔM/ΔD "
              f"{100 * scan['magnitude_direction_share']:.1f}%, peak RSS {scan['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"(x{scan['rss_over_prediction']:.2f} of the prediction)" + (
                  f", device peak {scan['peak_device_bytes'] / 2**30:.2f} GiB (x{scan['device_over_prediction']:.2f})"
                  if "peak_device_bytes" in scan else ""))
    return 0


def run(shape: str, layers: int, directory: Path, out: Path, device: str, command: str) -> dict:
    """Write the checkpoints (``shape``: a key of :data:`SHAPES`), measure every scan, write ``whole_model.json``
    under ``out`` and return its record (what ``gpu_check.py --only whole_model`` calls)."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = write_model(directory, shape, layers)
    record = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "cpu_count": os.cpu_count(), "device": device, "shape": shape, "layers": layers,
              "torch": torch.__version__,
              "checkpoint_bytes": {name: sum(f.stat().st_size for f in path.iterdir()) for name, path in
                                   paths.items()},
              "write_seconds": time.perf_counter() - start, **measure(paths, out, device)}
    (out / "whole_model.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    sys.exit(main())
