"""Static check of the GPU kernels for Hopper (sm_90), on a machine without a GPU: compile, read the SASS.

Triton bundles ptxas and cuobjdump, so every kernel variant is compiled here for ``GPUTarget("cuda", 90, 32)``
with the arguments a launch at Llama-70B shapes would pass (same integer specialisation: 1 and multiples of 16),
and its machine code is read: registers, spills (local-memory bytes and stack frame, and the LDL/STL that use
them), shared memory and the CTAs that fit an SM, and, for the main loop (one W tile of BLOCK_R × BLOCK_K), three
clocks against the HBM budget of an H200 SM:

* **HBM**: ``tile bytes × 132 / 4.3e12 × 1.98e9`` cycles, the time 132 SMs streaming W at the measured 4.3 TB/s copy
  rate give one SM for one tile at 1.98 GHz;
* **tensor**: the multiply-adds of the MMA instructions issued (their shapes from the SASS, padding included) at
  Hopper's dense rate per SM per clock (``MMA_RATES``; warpgroup ``HGMMA`` once per warpgroup, ``HMMA`` per warp);
* **shared memory**: bytes stored (``LDGSTS``, ``STS``) and read (``LDS``, ``LDSM``, and the MMA operands that come
  from shared memory) at 128 B per clock, a warp's access taking at least one 128-byte wavefront.

``roofline = max(tensor, shared) / HBM``: below 1 the tile's work fits in the time HBM takes to deliver it. The
issue cycles (main-loop instructions per warp × warps / 4 schedulers) are recorded beside it. The rates and their
sources are in ``docs/DESIGN.md``; what only a device run shows is in ``benchmarks/gpu_check.py``.

    python benchmarks/static_sm90.py                       # print the table
    python benchmarks/static_sm90.py --out DIR             # also DIR/static_sm90.json and DIR/<variant>.sass
    python benchmarks/static_sm90.py --only bf16 fp8e4m3_block --shapes 8192x28672
    python benchmarks/static_sm90.py --markdown A.json B.json --shapes 8192x28672   # static_sm90.md's tables
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

from lorafft.io.fp8 import FP8_BLOCK

SMS, HBM_BYTES_PER_S, CLOCK_HZ = 132, 4.3e12, 1.98e9  # H200: SMs, measured copy bandwidth, boost clock
SHARED_PER_SM, SHARED_RESERVED_PER_CTA, SHARED_BYTES_PER_CLOCK = 233472, 1024, 128  # 228 KB per SM
REGISTERS_PER_SM, THREADS_PER_SM, CTAS_PER_SM_MAX = 65536, 2048, 32
# Dense multiply-adds per clock per SM, by MMA instruction and input type: wgmma (HGMMA) 2048 for bf16/fp16, half
# that for tf32, twice for fp8; mma.sync (HMMA) at about half the wgmma rate (docs/DESIGN.md gives the sources).
MMA_RATES = {("HGMMA", "F16"): 2048, ("HGMMA", "BF16"): 2048, ("HGMMA", "TF32"): 1024, ("HGMMA", "E4M3"): 4096,
             ("HGMMA", "E5M2"): 4096, ("HMMA", "F16"): 1024, ("HMMA", "BF16"): 1024, ("HMMA", "TF32"): 512}
INPUT_BYTES = {"F16": 2, "BF16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1}
SHAPES = ((8192, 8192), (8192, 28672), (28672, 8192), (1024, 8192))  # Llama-70B: q/o, gate/up, down, k/v
COLUMNS = 20  # b of a Krylov block for k = 10: max(2k, k + 10)
OPS = ("HGMMA", "HMMA", "QGMMA", "FFMA", "FMUL", "FADD", "F2FP", "F2F", "PRMT", "LDG", "LDGSTS", "UTMALDG", "LDS",
       "LDSM", "STS", "LDL", "STL", "SHFL", "BAR")
MMA_OPS = ("HGMMA", "HMMA", "QGMMA")


@dataclass(frozen=True)
class Variant:
    """One sketch kernel specialisation: W's dtype as Triton names it and its scale."""

    dtype: str  # Triton pointer type of W: "bf16", "fp16", "fp32", "fp8e4nv", "fp8e5"
    scale: str = "none"  # "none", "tensor", "channel", "block"

    @property
    def name(self) -> str:
        short = {"fp8e4nv": "fp8e4m3", "fp8e5": "fp8e5m2"}.get(self.dtype, self.dtype)
        return short + ("" if self.scale == "none" else f"_{self.scale}")


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                "fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}
VARIANTS = (Variant("bf16"), Variant("fp16"), Variant("fp32"),
            *(Variant(fp8, scale) for fp8 in ("fp8e4nv", "fp8e5") for scale in ("none", "tensor", "channel",
                                                                                  "block")))


def launch_arguments(variant: Variant, shape: tuple[int, int], transpose: bool):
    """``(args, constexprs, options)``: what :func:`lorafft.kernels.sketch.sketch` would pass for ``W [1, m, n]``
    (contiguous) times a ``[*, COLUMNS]`` block on an H200, as ``compile`` arguments."""
    import triton

    from lorafft.kernels import sketch as module

    m, n = shape
    R, K = (n, m) if transpose else (m, n)
    dtype = TORCH_DTYPES[variant.dtype]
    block_r, block_k = module.tiles_for(R, K, dtype)
    column_blocks = triton.cdiv(COLUMNS, module.X_COLUMNS)
    splits = module.split_count(triton.cdiv(R, block_r) * column_blocks, K, block_k,
                                module.CTAS_PER_SM[dtype.itemsize] * SMS)
    k_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_split)
    k_pad, x_columns = triton.cdiv(K, block_k) * block_k, column_blocks * module.BLOCK_M
    mode = {"none": module._NO_SCALE, "tensor": module._TENSOR, "block": module._BLOCK,
            "channel": module._NO_SCALE if transpose else module._ROW_CHANNEL}[variant.scale]
    s_strides = {module._NO_SCALE: (0, 0, 0), module._TENSOR: (1, 0, 0), module._ROW_CHANNEL: (m, 1, 0),
                 module._BLOCK: (triton.cdiv(m, FP8_BLOCK) * triton.cdiv(n, FP8_BLOCK),
                                 *((1, triton.cdiv(n, FP8_BLOCK)) if transpose
                                   else (triton.cdiv(n, FP8_BLOCK), 1)))}[mode]
    part = {torch.bfloat16: "bf16", torch.float16: "fp16"}[module.PART_DTYPE[dtype]]
    args = [("W", f"*{variant.dtype}"), ("XP", f"*{part}"), ("COLUMN", "*fp32"), ("OUT", "*fp32"), ("S", "*fp32"),
            ("R", R), ("K", K), ("NB", COLUMNS), ("SPLITS", splits), ("K_SPLIT", k_split),
            ("stride_wl", m * n), ("stride_wr", 1 if transpose else n), ("stride_wk", n if transpose else 1),
            ("stride_xl", k_pad * x_columns), ("stride_xk", x_columns), ("stride_cl", COLUMNS),
            ("stride_os", 0 if splits == 1 else R * COLUMNS), ("stride_ol", R * COLUMNS), ("stride_or", COLUMNS),
            ("stride_sl", s_strides[0]), ("stride_sr", s_strides[1]), ("stride_sk", s_strides[2])]
    constexprs = dict(SCALE_MODE=mode, SCALE_BLOCK=FP8_BLOCK, BLOCK_R=block_r, BLOCK_K=block_k,
                      BLOCK_M=module.BLOCK_M, BLOCK_C=triton.next_power_of_2(module.X_COLUMNS),
                      PARTS=module.X_PARTS, W_PARTS=module.W_PARTS[dtype], PREFETCH=module.PREFETCH[dtype.itemsize],
                      UPCAST=False)
    options = dict(num_warps=module.NUM_WARPS, num_stages=module.NUM_STAGES[dtype.itemsize])
    return args, constexprs, options


@functools.lru_cache(maxsize=None)
def _compile(key: tuple) -> dict:
    """SASS and resource usage of one specialisation (``key`` = frozen args, constexprs and options): compiled
    once."""
    import triton
    from triton.backends.compiler import GPUTarget

    from lorafft.kernels import sketch as module

    name, args, constexprs, options = key
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
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(options))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as directory:
        cubin = Path(directory) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = _run(tools / "cuobjdump", "--dump-sass", cubin)
        usage = _run(tools / "cuobjdump", "-res-usage", cubin)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    return {"sass": sass, "registers": int(found.group(1)), "spill_bytes": int(found.group(4)),
            "stack_bytes": int(found.group(2)), "shared_bytes": compiled.metadata.shared,
            "warps": dict(options)["num_warps"]}


def _run(*command) -> str:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, check=True).stdout


INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*"
                         r"([^;]*);")


def parse_sass(sass: str) -> list[tuple[int, str, str, str]]:
    """``[(address, opcode, modifiers, operands)]`` of every instruction in a cuobjdump listing that can execute
    (``@!PT``, never true, marks placeholders)."""
    return [(int(m.group(1), 16), m.group(3), m.group(4), m.group(5)) for m in map(INSTRUCTION.match,
                                                                                   sass.splitlines())
            if m and (m.group(2) or "").strip() != "@!PT"]


def main_loop(instructions: list[tuple]) -> list[tuple]:
    """The instructions of the largest loop (a backward ``BRA``'s range) that contains a tensor-core MMA, or
    of the largest loop when none does."""
    loops = []
    for address, opcode, _, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            body = [i for i in instructions if int(target.group(1), 16) <= i[0] <= address]
            loops.append(body)
    with_mma = [body for body in loops if any(i[1] in MMA_OPS for i in body)]
    return max(with_mma or loops or [[]], key=len)


def count(instructions) -> dict[str, int]:
    ops: dict[str, int] = {}
    for _, opcode, _, _ in instructions:
        ops[opcode] = ops.get(opcode, 0) + 1
    return ops


_ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _shared_access(opcode: str, modifiers: str) -> int:
    """Bytes one warp moves through shared memory with one ``LDGSTS``/``STS``/``LDS`` (4 per thread unless the
    width says otherwise) or ``LDSM``/``STSM`` (128 per 8×8 matrix); 0 for other instructions."""
    parts = modifiers.split(".")[1:]
    if opcode in ("LDGSTS", "STS", "LDS"):
        return 32 * next((_ACCESS_BYTES[p] for p in parts if p in _ACCESS_BYTES), 4)
    if opcode in ("LDSM", "STSM"):
        return 128 * next((int(p) for p in parts if p in ("2", "4")), 1)
    return 0


def mma_work(opcode: str, modifiers: str, operands: str, warps: int) -> dict:
    """One MMA instruction of the SASS for a CTA of ``warps`` warps: its kind, tensor-core cycles per SM and the
    bytes of its operands read from shared memory (an ``HGMMA`` runs once per warpgroup, its A operand from
    registers when the SASS names registers for it; ``HMMA`` keeps both operands in registers, per warp)."""
    inputs = next((p for p in modifiers.split(".")[::-1] if p in INPUT_BYTES), "F16")  # fp16 is left unnamed
    if opcode == "HGMMA":
        M, N, K = map(int, re.match(r"\.(\d+)x(\d+)x(\d+)", modifiers).groups())
        a_in_registers = re.match(r"R\d+,\s*R\d+,", operands) is not None
        copies = warps // 4
        read = copies * (N * K + (0 if a_in_registers else M * K)) * INPUT_BYTES[inputs]
        return {"kind": opcode + modifiers, "a_operand": "registers" if a_in_registers else "shared",
                "cycles": copies * M * N * K / MMA_RATES[(opcode, inputs)], "shared_read": read}
    if opcode == "HMMA":
        digits = re.match(r"\.(\d+)", modifiers).group(1)  # 16816: m16 n8 k16; 1688: m16 n8 k8
        M, N, K = int(digits[:2]), int(digits[2]), int(digits[3:])
        return {"kind": opcode + modifiers, "a_operand": "registers",
                "cycles": warps * M * N * K / MMA_RATES[(opcode, inputs)], "shared_read": 0}
    raise ValueError(f"no rate for {opcode}{modifiers}")


def tile_costs(loop: list[tuple], warps: int) -> dict:
    """Per main-loop iteration (one W tile) of a CTA: the MMA instructions by kind, tensor-core cycles, the waits
    that drain every warpgroup MMA in flight (``WARPGROUP.DEPBAR.LE gsb0, 0x0``), and shared-memory bytes stored and
    read with the cycles they take (a warp access at least one wavefront)."""
    mma: dict[str, dict] = {}
    tensor = stored = read = wavefronts = drains = 0
    for _, opcode, modifiers, operands in loop:
        if opcode + modifiers == "WARPGROUP.DEPBAR.LE" and re.search(r"gsb0,\s*0x0\b", operands):
            drains += 1
        if opcode in MMA_OPS:
            work = mma_work(opcode, modifiers, operands, warps)
            entry = mma.setdefault(work["kind"], {"kind": work["kind"], "a_operand": work["a_operand"],
                                                  "per_tile": 0})
            entry["per_tile"] += 1
            tensor += work["cycles"]
            read += work["shared_read"]
            wavefronts += work["shared_read"] / SHARED_BYTES_PER_CLOCK
        access = _shared_access(opcode, modifiers)
        if access:
            stored += warps * access if opcode in ("LDGSTS", "STS", "STSM") else 0
            read += warps * access if opcode in ("LDS", "LDSM") else 0
            wavefronts += warps * max(1.0, access / SHARED_BYTES_PER_CLOCK)
    return {"mma": list(mma.values()), "mma_drains": drains, "tensor_cycles": tensor, "shared_stored": stored,
            "shared_read": read, "shared_cycles": wavefronts}


def ctas_per_sm(shared_bytes: int, registers: int, warps: int) -> int:
    """CTAs of this size that fit one SM: shared memory (228 KB, 1 KB reserved per CTA), registers (64K, allocated
    per warp in units of 256 after rounding to 8 per thread), threads (2048), and at most 32."""
    per_warp = -(-(-(-registers // 8) * 8 * 32) // 256) * 256
    return min(SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_CTA), REGISTERS_PER_SM // (per_warp * warps),
               THREADS_PER_SM // (32 * warps), CTAS_PER_SM_MAX)


# Issue 21's targets per W tile, by W's dtype: tensor-core and shared-memory cycles within this fraction of the HBM
# budget (16-bit weights, fp8; fp32 only without spills).
TARGETS = {"bf16": 0.6, "fp16": 0.6, "fp8": 0.8}


def check(row: dict) -> list[str]:
    """What a record of the table misses of the targets: spills (local bytes, stack frame, LDL/STL), and for 16-bit
    and fp8 weights warpgroup MMA only (``HGMMA``, no ``HMMA``) within TARGETS of the HBM budget."""
    misses = [f"{key} {row[key]}" for key in ("spill_bytes", "stack_bytes", "local_ops") if row[key]]
    target = next((value for prefix, value in TARGETS.items() if row["dtype"].startswith(prefix)), None)
    if row["kernel"] != "sketch" or target is None:
        return misses
    kinds = [entry["kind"] for entry in row["mma"]]
    if not kinds or not all(kind.startswith("HGMMA") for kind in kinds):
        misses.append(f"MMA {kinds}")
    misses += [f"{clock} {row['ratios'][clock]} > {target}" for clock in ("tensor", "shared")
               if row["ratios"][clock] > target]
    return misses


def resources(compiled: dict, instructions: list[tuple]) -> dict:
    """Registers, spills (local bytes, stack frame, and the LDL/STL anywhere in the kernel), shared memory and the
    CTAs that fit an SM."""
    ops = count(instructions)
    return {"registers": compiled["registers"], "spill_bytes": compiled["spill_bytes"],
            "stack_bytes": compiled["stack_bytes"], "local_ops": ops.get("LDL", 0) + ops.get("STL", 0),
            "shared_bytes": compiled["shared_bytes"],
            "ctas_per_sm": ctas_per_sm(compiled["shared_bytes"], compiled["registers"], compiled["warps"])}


def analyse(variant: Variant, shape: tuple[int, int], transpose: bool, out_dir: Path | None = None) -> dict:
    """One record of the table (the fields of ``static_sm90.json``)."""
    args, constexprs, options = launch_arguments(variant, shape, transpose)
    compiled = _compile(("_sketch_kernel", tuple(args), tuple(sorted(constexprs.items())),
                         tuple(sorted(options.items()))))
    instructions = parse_sass(compiled["sass"])
    loop = main_loop(instructions)
    loop_ops, whole = count(loop), count(instructions)
    warps = options["num_warps"]
    block_r, block_k = constexprs["BLOCK_R"], constexprs["BLOCK_K"]
    tile_bytes = block_r * block_k * TORCH_DTYPES[variant.dtype].itemsize
    costs = tile_costs(loop, warps)
    cycles = {"hbm": tile_bytes * SMS / HBM_BYTES_PER_S * CLOCK_HZ, "tensor": costs["tensor_cycles"],
              "shared": costs["shared_cycles"], "issue": len(loop) * warps / 4}
    orientation = "WtX" if transpose else "WX"
    name = f"sketch_{variant.name}_{orientation}_{shape[0]}x{shape[1]}"
    if out_dir is not None:
        (out_dir / f"{name}.sass").write_text(compiled["sass"])
    return {
        "variant": name, "kernel": "sketch", "dtype": variant.name, "w_dtype": variant.dtype,
        "orientation": orientation, "shape": list(shape),
        "block": [block_r, block_k], "x_rows": constexprs["BLOCK_M"],
        "x_columns": constexprs["BLOCK_M"] // constexprs["PARTS"], "stages": options["num_stages"], "warps": warps,
        "w_prefetched": constexprs["PREFETCH"], **resources(compiled, instructions),
        "mma": costs["mma"], "mma_drains_per_tile": costs["mma_drains"],
        "shared_bytes_per_tile": {"stored": costs["shared_stored"], "read": costs["shared_read"]},
        "ops": {op: whole[op] for op in OPS if op in whole},
        "loop_ops": {op: loop_ops[op] for op in OPS if op in loop_ops},
        "instructions_per_tile": len(loop), "bytes_per_tile": tile_bytes,
        "cycles_per_tile": {key: round(value, 1) for key, value in cycles.items()},
        "ratios": {key: round(cycles[key] / cycles["hbm"], 3) for key in ("tensor", "shared", "issue")},
        "roofline": round(max(cycles["tensor"], cycles["shared"]) / cycles["hbm"], 3),
    }


SPLITS = (("fp32", "bf16"), ("fp64", "bf16"), ("fp32", "fp16"), ("fp64", "fp16"))


def analyse_split(x_dtype: str, part_dtype: str, out_dir: Path | None = None) -> dict:
    """Record of the kernel that splits X ``[1, 28672, 20]`` into stacked parts (registers, spills, instruction
    mix; no roofline: it reads X, not W)."""
    from lorafft.kernels import sketch as module

    K = 28672
    args = [("X", f"*{x_dtype}"), ("M", "*fp32"), ("XP", f"*{part_dtype}"), ("COLUMN", "*fp32"), ("K", K),
            ("NB", COLUMNS), ("K_PAD", K), ("stride_xl", K * COLUMNS), ("stride_xk", COLUMNS), ("stride_xb", 1),
            ("stride_pl", K * module.BLOCK_M), ("stride_pk", module.BLOCK_M), ("stride_cl", COLUMNS)]
    constexprs = dict(PARTS=module.X_PARTS, COLUMN_TOP=module.COLUMN_TOP, BLOCK_K=64, BLOCK_M=module.BLOCK_M)
    compiled = _compile(("_split_kernel", tuple(args), tuple(sorted(constexprs.items())),
                         (("num_stages", 1), ("num_warps", 4))))
    name = f"split_{x_dtype}_to_{part_dtype}"
    if out_dir is not None:
        (out_dir / f"{name}.sass").write_text(compiled["sass"])
    instructions = parse_sass(compiled["sass"])
    ops = count(instructions)
    return {"variant": name, "kernel": "split", "dtype": f"{x_dtype}->{part_dtype}", "orientation": None,
            "shape": [K, COLUMNS], **resources(compiled, instructions),
            "ops": {op: ops[op] for op in OPS if op in ops}}


def _mma_label(row: dict) -> str:
    return " + ".join(f"{entry['per_tile']} {entry['kind']}" + (" (A regs)" if entry["a_operand"] == "registers"
                                                                 else "") for entry in row["mma"])


def markdown(records: list[dict], shapes: list[tuple[int, int]] | None = None) -> str:
    """The tables of ``static_sm90.md`` from static_sm90.json records of several Triton versions (the first one's
    numbers in full, the others' roofline and spills beside them), sketch rows of ``shapes`` only if given."""
    first, others = records[0], records[1:]
    by_name = [{row["variant"]: row for row in record["variants"]} for record in others]
    versions = " / ".join(record["triton"] for record in records)
    lines = [f"| variant | MMA per tile | drains | regs | spill + stack | smem (KB) | CTAs/SM | HBM cyc | "
             f"tensor cyc | smem cyc | issue cyc | roofline ({versions}) |", "|---" * 12 + "|"]
    for row in first["variants"]:
        if row["kernel"] != "sketch" or (shapes and tuple(row["shape"]) not in shapes):
            continue
        cycles = row["cycles_per_tile"]
        roofline = " / ".join(str(r["roofline"]) for r in [row] + [names[row["variant"]] for names in by_name])
        lines.append(f"| {row['variant']} | {_mma_label(row)} | {row['mma_drains_per_tile']} | "
                     f"{row['registers']} | "
                     f"{row['spill_bytes'] + row['stack_bytes']} | "
                     f"{row['shared_bytes'] / 1024:.0f} | {row['ctas_per_sm']} | {cycles['hbm']:.0f} | "
                     f"{cycles['tensor']:.0f} | {cycles['shared']:.0f} | {cycles['issue']:.0f} | {roofline} |")
    lines += ["", f"| split kernel | regs ({versions}) | spill + stack bytes ({versions}) |", "|---|---|---|"]
    for row in first["variants"]:
        if row["kernel"] == "split":
            rows = [row] + [names[row["variant"]] for names in by_name]
            lines.append(f"| {row['variant']} | {' / '.join(str(r['registers']) for r in rows)} | "
                         f"{' / '.join(str(r['spill_bytes'] + r['stack_bytes']) for r in rows)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write static_sm90.json and <variant>.sass here")
    parser.add_argument("--only", nargs="+", help="variant names (bf16, fp32, fp8e4m3_block, ..., split)")
    parser.add_argument("--shapes", nargs="+", help="m x n shapes, e.g. 8192x28672")
    parser.add_argument("--markdown", nargs="+", type=Path, metavar="JSON",
                        help="print the markdown tables of these static_sm90.json files instead")
    args = parser.parse_args()
    if args.markdown:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else None
        print(markdown([json.loads(path.read_text()) for path in args.markdown], shapes))
        return
    variants = [v for v in VARIANTS if not args.only or v.name in args.only]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    import triton

    rows = []
    print(f"triton {triton.__version__}, sm_90; cycles per W tile; roofline = max(tensor, shared) / HBM")
    print(f"{'variant':40} {'MMA per tile':44} {'regs':>4} {'stack':>5} {'CTAs':>4} {'HBM':>5} {'tensor':>6} "
          f"{'shared':>6} {'issue':>5} {'roof':>5}")
    for variant in variants:
        for shape in shapes:
            for transpose in (False, True):
                row = analyse(variant, shape, transpose, args.out)
                rows.append(row)
                cycles = row["cycles_per_tile"]
                print(f"{row['variant']:40} {_mma_label(row):44} {row['registers']:4} {row['stack_bytes']:5} "
                      f"{row['ctas_per_sm']:4} {cycles['hbm']:5.0f} {cycles['tensor']:6.0f} {cycles['shared']:6.0f} "
                      f"{cycles['issue']:5.0f} {row['roofline']:5.2f}", flush=True)
    for x_dtype, part_dtype in SPLITS if not args.only or "split" in args.only else ():
        row = analyse_split(x_dtype, part_dtype, args.out)
        rows.append(row)
        print(f"{row['variant']:40} {'':44} {row['registers']:4} {row['stack_bytes']:5}", flush=True)
    if args.out:
        record = {"triton": triton.__version__, "target": "sm_90", "sms": SMS, "hbm_bytes_per_s": HBM_BYTES_PER_S,
                  "clock_hz": CLOCK_HZ, "shared_bytes_per_clock": SHARED_BYTES_PER_CLOCK,
                  "mma_rates": {f"{op}.{inputs}": rate for (op, inputs), rate in MMA_RATES.items()},
                  "columns": COLUMNS, "variants": rows}
        (args.out / "static_sm90.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main()
