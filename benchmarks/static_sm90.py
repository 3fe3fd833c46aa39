"""Static check of the GPU kernels for Hopper (sm_90), on a machine without a GPU: compile, read the SASS.

Triton bundles ptxas and cuobjdump, so every kernel variant is compiled here for ``GPUTarget("cuda", 90, 32)``
with the arguments a launch at Llama-70B shapes would pass (same integer specialisation: 1 and multiples of 16),
and its machine code is counted: registers, local-memory spill bytes, tensor-core MMA (HGMMA/HMMA/QGMMA), FFMA,
instructions in the main loop per W tile, and the issue-time ratio

    ratio = issue cycles per tile / (tile bytes × 132 / 4.3e12 × 1.98e9)

where ``issue cycles per tile = loop instructions per warp per tile × warps / 4`` (each of an SM's four schedulers
issues about one instruction per cycle; with 4 warps that is the instructions per warp) and the denominator is the
cycles an H200 SM has per tile if all 132 SMs stream W at 4.3 TB/s at 1.98 GHz. Below 1 the kernel can keep up
with HBM; the tests ask <= 0.5 for bf16 and fp8. Timings need a device: ``benchmarks/gpu_check.py``.

    python benchmarks/static_sm90.py                     # print the table
    python benchmarks/static_sm90.py --out DIR           # also DIR/static_sm90.json and DIR/<variant>.sass
    python benchmarks/static_sm90.py --only bf16 fp8e4m3_block --shapes 8192x28672
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SMS, HBM_BYTES_PER_S, CLOCK_HZ = 132, 4.3e12, 1.98e9  # H200: SMs, measured copy bandwidth, boost clock
SHAPES = ((8192, 8192), (8192, 28672), (28672, 8192), (1024, 8192))  # Llama-70B: q/o, gate/up, down, k/v
COLUMNS = 20  # b of a Krylov block for k = 10: max(2k, k + 10)
OPS = ("HGMMA", "HMMA", "QGMMA", "FFMA", "FMUL", "FADD", "F2FP", "F2F", "PRMT", "LDG", "LDGSTS", "UTMALDG", "LDS",
       "LDSM", "STS", "LDL", "STL", "BAR")
MMA_OPS = ("HGMMA", "HMMA", "QGMMA")


@dataclass(frozen=True)
class Variant:
    """One sketch kernel specialisation: W's dtype as Triton names it, its scale, precision, orientation."""

    dtype: str  # Triton pointer type of W: "bf16", "fp16", "fp32", "fp8e4nv", "fp8e5"
    scale: str = "none"  # "none", "tensor", "channel", "block"
    precision: str = "split"  # "split" or "tf32x3"

    @property
    def name(self) -> str:
        short = {"fp8e4nv": "fp8e4m3", "fp8e5": "fp8e5m2"}.get(self.dtype, self.dtype)
        return short + ("" if self.scale == "none" else f"_{self.scale}") + (
            "" if self.precision == "split" else f"_{self.precision}")


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                "fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}
VARIANTS = (Variant("bf16"), Variant("fp16"), Variant("fp32"), Variant("fp32", precision="tf32x3"),
            *(Variant(fp8, scale) for fp8 in ("fp8e4nv", "fp8e5") for scale in ("tensor", "channel", "block")))


def launch_arguments(variant: Variant, shape: tuple[int, int], transpose: bool):
    """``(args, constexprs, block)``: what :func:`lorafft.kernels.sketch.sketch` would pass for ``W [1, m, n]``
    (contiguous) times a ``[*, COLUMNS]`` block on an H200, as ``compile`` arguments."""
    import triton

    from lorafft.kernels import sketch as module

    m, n = shape
    R, K = (n, m) if transpose else (m, n)
    block_r, block_k, block_b = module.tiles_for(R, K, TORCH_DTYPES[variant.dtype])
    tiles = (1, triton.cdiv(R, block_r), triton.cdiv(COLUMNS, block_b))
    splits = max(1, min(triton.cdiv(4 * SMS, tiles[0] * tiles[1] * tiles[2]), K // (8 * block_k)))
    k_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_split)
    tf32 = variant.precision == "tf32x3"
    parts = 1 if tf32 else module.X_PARTS
    k_pad, b_pad = triton.cdiv(K, block_k) * block_k, tiles[2] * block_b
    mode = {"none": module._NO_SCALE, "tensor": module._TENSOR, "block": module._BLOCK,
            "channel": module._NO_SCALE if transpose else module._ROW_CHANNEL}[variant.scale]
    s_strides = {module._NO_SCALE: (0, 0, 0), module._TENSOR: (1, 0, 0), module._ROW_CHANNEL: (m, 1, 0),
                 module._BLOCK: (triton.cdiv(m, 128) * triton.cdiv(n, 128), *((1, triton.cdiv(n, 128))
                                 if transpose else (triton.cdiv(n, 128), 1)))}[mode]
    part = "fp32" if tf32 else {torch.bfloat16: "bf16", torch.float16: "fp16"}[
        module.PART_DTYPE[TORCH_DTYPES[variant.dtype]]]
    args = [("W", f"*{variant.dtype}"), ("XP", f"*{part}"), ("COLUMN", "*fp32"), ("OUT", "*fp32"), ("S", "*fp32"),
            ("R", R), ("K", K), ("NB", COLUMNS), ("SPLITS", splits), ("K_SPLIT", k_split),
            ("stride_wl", m * n), ("stride_wr", 1 if transpose else n), ("stride_wk", n if transpose else 1),
            ("stride_xl", parts * k_pad * b_pad), ("stride_xp", k_pad * b_pad), ("stride_xk", b_pad),
            ("stride_os", 0 if splits == 1 else R * COLUMNS), ("stride_ol", R * COLUMNS), ("stride_or", COLUMNS),
            ("stride_sl", s_strides[0]), ("stride_sr", s_strides[1]), ("stride_sk", s_strides[2])]
    constexprs = dict(SCALE_MODE=mode, SCALE_BLOCK=module.FP8_BLOCK, BLOCK_R=block_r, BLOCK_K=block_k,
                      BLOCK_B=block_b, W_PARTS=module.W_PARTS[TORCH_DTYPES[variant.dtype]],
                      PRECISION=variant.precision, UPCAST=False)
    return args, constexprs, (block_r, block_k, block_b)


@functools.lru_cache(maxsize=None)
def _compile(key: tuple) -> dict:
    """SASS and resource usage of one specialisation (``key`` = frozen args and constexprs): compiled once."""
    import triton
    from triton.backends.compiler import GPUTarget

    from lorafft.kernels import sketch as module

    name, args, constexprs, stages = key
    fn = getattr(module, name)
    signature, consts, attrs = {}, {}, {}
    for index, (arg, value) in enumerate(args):  # Triton's launch-time specialisation of pointers and integers
        if isinstance(value, str):
            signature[arg], attrs[(index,)] = value, [["tt.divisibility", 16]]
        elif value == 1:
            signature[arg], consts[(index,)] = "constexpr", 1
        else:
            signature[arg] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for arg, value in constexprs:
        signature[arg], consts[(fn.arg_names.index(arg),)] = "constexpr", value
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=module.NUM_WARPS, num_stages=stages))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as directory:
        cubin = Path(directory) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = _run(tools / "cuobjdump", "--dump-sass", cubin)
        usage = _run(tools / "cuobjdump", "-res-usage", cubin)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    return {"sass": sass, "registers": int(found.group(1)), "spill_bytes": int(found.group(4)),
            "stack_bytes": int(found.group(2)), "shared_bytes": compiled.metadata.shared}


def _run(*command) -> str:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, check=True).stdout


INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """``[(address, opcode, operands)]`` of every instruction in a cuobjdump listing."""
    return [(int(m.group(1), 16), m.group(2), m.group(4)) for m in map(INSTRUCTION.match, sass.splitlines()) if m]


def main_loop(instructions: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions of the largest loop (a backward ``BRA``'s range) that contains a tensor-core MMA, or
    of the largest loop when none does."""
    loops = []
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            body = [i for i in instructions if int(target.group(1), 16) <= i[0] <= address]
            loops.append(body)
    with_mma = [body for body in loops if any(op in MMA_OPS for _, op, _ in body)]
    return max(with_mma or loops or [[]], key=len)


def count(instructions) -> dict[str, int]:
    ops: dict[str, int] = {}
    for _, opcode, _ in instructions:
        ops[opcode] = ops.get(opcode, 0) + 1
    return ops


def analyse(variant: Variant, shape: tuple[int, int], transpose: bool, out_dir: Path | None = None) -> dict:
    """One record of the table (the fields of ``static_sm90.json``)."""
    from lorafft.kernels import sketch as module

    args, constexprs, (block_r, block_k, block_b) = launch_arguments(variant, shape, transpose)
    stages = module.NUM_STAGES[TORCH_DTYPES[variant.dtype].itemsize]
    compiled = _compile(("_sketch_kernel", tuple(args), tuple(sorted(constexprs.items())), stages))
    instructions = parse_sass(compiled["sass"])
    loop = count(main_loop(instructions))
    whole = count(instructions)
    per_tile = sum(loop.values())
    tile_bytes = block_r * block_k * TORCH_DTYPES[variant.dtype].itemsize
    budget = tile_bytes * SMS / HBM_BYTES_PER_S * CLOCK_HZ
    orientation = "WtX" if transpose else "WX"
    name = f"sketch_{variant.name}_{orientation}_{shape[0]}x{shape[1]}"
    if out_dir is not None:
        (out_dir / f"{name}.sass").write_text(compiled["sass"])
    return {
        "variant": name, "kernel": "sketch", "dtype": variant.name, "orientation": orientation, "shape": list(shape),
        "block": [block_r, block_k], "x_columns": block_b, "stages": stages, "warps": module.NUM_WARPS,
        "registers": compiled["registers"], "spill_bytes": compiled["spill_bytes"],
        "shared_bytes": compiled["shared_bytes"],
        "ops": {op: whole[op] for op in OPS if op in whole},
        "loop_ops": {op: loop[op] for op in OPS if op in loop},
        "instructions_per_tile": per_tile, "bytes_per_tile": tile_bytes,
        "ratio": round(per_tile * module.NUM_WARPS / 4 / budget, 3),
    }


SPLITS = (("fp32", "bf16"), ("fp64", "bf16"), ("fp32", "fp16"), ("fp64", "fp16"), ("fp32", "fp32"))


def analyse_split(x_dtype: str, part_dtype: str, out_dir: Path | None = None) -> dict:
    """Record of the kernel that splits X ``[1, 28672, 20]`` into parts (registers, spills, instruction mix; no
    ratio: it reads X, not W)."""
    from lorafft.kernels import sketch as module

    K, parts = 28672, 1 if part_dtype == "fp32" else module.X_PARTS
    block_b = module.BLOCK_B[4 if part_dtype == "fp32" else 2]  # tf32x3 (fp32 W) / 16-bit W's X^T tile
    args = [("X", f"*{x_dtype}"), ("M", "*fp32"), ("XP", f"*{part_dtype}"), ("COLUMN", "*fp32"), ("K", K),
            ("NB", COLUMNS), ("K_PAD", K), ("B_PAD", block_b), ("stride_xl", K * COLUMNS),
            ("stride_xk", COLUMNS), ("stride_xb", 1), ("stride_pl", parts * K * block_b),
            ("stride_pp", K * block_b)]
    constexprs = dict(PARTS=parts, COLUMN_TOP=module.COLUMN_TOP, BLOCK_K=64, BLOCK_B=block_b)
    compiled = _compile(("_split_kernel", tuple(args), tuple(sorted(constexprs.items())), 1))
    name = f"split_{x_dtype}_to_{part_dtype}"
    if out_dir is not None:
        (out_dir / f"{name}.sass").write_text(compiled["sass"])
    ops = count(parse_sass(compiled["sass"]))
    return {"variant": name, "kernel": "split", "dtype": f"{x_dtype}->{part_dtype}", "orientation": None,
            "shape": [K, COLUMNS], "registers": compiled["registers"], "spill_bytes": compiled["spill_bytes"],
            "ops": {op: ops[op] for op in OPS if op in ops}, "instructions_per_tile": None, "bytes_per_tile": None,
            "ratio": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write static_sm90.json and <variant>.sass here")
    parser.add_argument("--only", nargs="+", help="variant names (bf16, fp32_tf32x3, fp8e4m3_block, ..., split)")
    parser.add_argument("--shapes", nargs="+", help="m x n shapes, e.g. 8192x28672")
    args = parser.parse_args()
    variants = [v for v in VARIANTS if not args.only or v.name in args.only]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    import triton

    rows = []
    print(f"triton {triton.__version__}, sm_90; ratio = issue cycles / HBM cycles per tile (<= 1 keeps up)")
    print(f"{'variant':44} {'regs':>4} {'spill':>5} {'MMA':>4} {'FFMA':>5} {'instr/tile':>10} {'B/tile':>6} "
          f"{'ratio':>6}")
    for variant in variants:
        for shape in shapes:
            for transpose in (False, True):
                row = analyse(variant, shape, transpose, args.out)
                rows.append(row)
                mma = sum(row["loop_ops"].get(op, 0) for op in MMA_OPS)
                print(f"{row['variant']:44} {row['registers']:4} {row['spill_bytes']:5} {mma:4} "
                      f"{row['loop_ops'].get('FFMA', 0):5} {row['instructions_per_tile']:10} "
                      f"{row['bytes_per_tile']:6} {row['ratio']:6.3f}", flush=True)
    for x_dtype, part_dtype in SPLITS if not args.only or "split" in args.only else ():
        row = analyse_split(x_dtype, part_dtype, args.out)
        rows.append(row)
        print(f"{row['variant']:44} {row['registers']:4} {row['spill_bytes']:5}", flush=True)
    if args.out:
        record = {"triton": triton.__version__, "target": "sm_90", "sms": SMS, "hbm_bytes_per_s": HBM_BYTES_PER_S,
                  "clock_hz": CLOCK_HZ, "columns": COLUMNS, "variants": rows}
        (args.out / "static_sm90.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main()
