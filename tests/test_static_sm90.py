"""Static check of the sketch kernel for Hopper (sm_90), compiled on this CPU with Triton's bundled ptxas: warpgroup
MMA for 16-bit and fp8 weights, tensor-core and shared-memory cycles per W tile within issue 21's share of the H200's
HBM budget, no spills, and the CTAs per SM the launcher sizes its grid by (``benchmarks/static_sm90.py``).

To keep the suite fast this compiles one shape (8192×28672, down_proj of Llama-70B; the code does not depend on the
shape), both orientations, of seven of the eleven variants (every weight dtype; fp8 with each scale kind) and the
split kernel, in one subprocess: compiling needs Triton without its interpreter, which the other kernel tests switch
on in this process. ``python benchmarks/static_sm90.py`` runs every shape (the committed table)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import static_sm90  # noqa: E402

SHAPE = "8192x28672"
SUBSET = ("bf16", "fp16", "fp32", "fp8e4m3", "fp8e4m3_tensor", "fp8e5m2_channel", "fp8e4m3_block")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("static_sm90")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_sm90.py"), "--shapes", SHAPE, "--out", str(out),
                    "--only", *SUBSET, "split"],
                   env=env, check=True, capture_output=True, text=True)
    rows = json.loads((out / "static_sm90.json").read_text())["variants"]
    return {(row["dtype"], row["orientation"]): row for row in rows}


def test_every_variant_meets_the_targets(table):
    """Every variant compiled: no spill (local bytes, stack frame, LDL/STL), and 16-bit and fp8 weights on HGMMA
    only, with tensor and shared-memory cycles <= 0.6 (16-bit) / 0.8 (fp8) of the HBM budget per tile."""
    sketches = [row for row in table.values() if row["kernel"] == "sketch"]
    assert len(sketches) == 2 * len(SUBSET)
    assert len([row for row in table.values() if row["kernel"] == "split"]) == len(static_sm90.SPLITS)
    assert {row["variant"]: static_sm90.check(row) for row in table.values() if static_sm90.check(row)} == {}
    for row in sketches:  # fp32 too: on tensor cores, within the HBM budget
        assert row["mma"] and row["roofline"] < 1.0, row["variant"]


def test_one_mma_per_w_tile_and_part(table):
    """The three parts of X share one MMA per k-step: one HGMMA.64x128x16 per 16 of the W tile's depth and part of
    W (three for fp32's bf16 parts), none for X's parts one by one."""
    for row in table.values():
        if row["kernel"] == "sketch":
            expected = row["block"][1] // 16 * (3 if row["dtype"] == "fp32" else 1)
            assert [(entry["kind"][:17], entry["per_tile"]) for entry in row["mma"]] == [
                ("HGMMA.64x128x16.F", expected)], row["variant"]


def test_launcher_assumes_the_ctas_that_fit(table):
    """``CTAS_PER_SM`` (the grid's one wave) is what fits an SM for every variant of that weight size."""
    from lorafft.kernels import sketch as module

    for size, assumed in module.CTAS_PER_SM.items():
        fits = [row["ctas_per_sm"] for row in table.values()
                if row["kernel"] == "sketch" and static_sm90.TORCH_DTYPES[row["w_dtype"]].itemsize == size]
        assert fits and min(fits) == assumed, (size, fits)


def test_no_scalar_fp32_products(table):
    """The products are MMA: FFMA in the main loop only for a 128×128 block scale (one per accumulator element)."""
    for (dtype, orientation), row in table.items():
        if row["kernel"] == "sketch":
            assert row["loop_ops"].get("FFMA", 0) <= (64 if dtype.endswith("block") else 0), row["variant"]


SASS = "\n".join([
    "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
    "        /*0010*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;",
    "        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4].tnspA, R24 ;",
    "        /*0030*/                   HGMMA.64x64x16.F32 R56, R120, gdesc[UR8].tnspB, R56 ;",
    "        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;",
    "        /*0048*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;",
    "        /*0050*/                   LDS.U8 R2, [R3] ;",
    "        /*0060*/               @!PT LDS RZ, [RZ] ;",
    "        /*0070*/                   FFMA R2, R3, R4, R5 ;",
    "        /*0080*/               @P0 BRA 0x10 ;",
    "        /*0090*/                   EXIT ;",
])


def test_sass_parsing_finds_the_loop_and_prices_it():
    """On a hand-made listing: the loop is the backward branch's range; an HGMMA runs once per warpgroup with
    operands from shared memory unless the SASS names registers for A; an HMMA runs per warp at half the rate;
    a never-executed ``@!PT`` placeholder costs nothing; a narrow access takes a whole wavefront."""
    loop = static_sm90.main_loop(static_sm90.parse_sass(SASS))
    assert [op for _, op, _, _ in loop] == ["LDGSTS", "HGMMA", "HGMMA", "HMMA", "WARPGROUP", "LDS", "FFMA", "BRA"]
    costs = static_sm90.tile_costs(loop, warps=4)
    assert costs["mma_drains"] == 1
    assert [(e["kind"], e["a_operand"]) for e in costs["mma"]] == [
        ("HGMMA.64x128x16.F32.BF16", "shared"), ("HGMMA.64x64x16.F32", "registers"),
        ("HMMA.16816.F32.BF16", "registers")]
    assert costs["tensor_cycles"] == 64 * 128 * 16 / 2048 + 64 * 64 * 16 / 2048 + 4 * 16 * 8 * 16 / 1024
    assert costs["shared_stored"] == 4 * 32 * 16
    assert costs["shared_read"] == (64 + 128) * 16 * 2 + 64 * 16 * 2 + 4 * 32
    assert costs["shared_cycles"] == 4 * 512 / 128 + ((64 + 128) * 16 * 2 + 64 * 16 * 2) / 128 + 4 * 1


def test_checks_fail_on_the_kernel_they_replaced():
    """The targets flag what issue 21 found in the kernel before it (records as the static analysis gave them for
    the old tiles): bf16 on mma.sync, fp8 with three 24-HGMMA groups and 1 CTA per SM, fp32 with a stack frame."""
    old_bf16 = {"kernel": "sketch", "dtype": "bf16", "spill_bytes": 0, "stack_bytes": 0, "local_ops": 0,
                "mma": [{"kind": "HMMA.16816.F32.BF16", "a_operand": "registers", "per_tile": 96}],
                "ratios": {"tensor": 0.771, "shared": 0.739}}
    old_fp8 = {**old_bf16, "dtype": "fp8e4m3_tensor", "ratios": {"tensor": 1.542, "shared": 2.057},
               "mma": [{"kind": "HGMMA.64x128x16.F32", "a_operand": "shared", "per_tile": 24}]}
    old_fp32 = {**old_bf16, "dtype": "fp32", "stack_bytes": 80, "local_ops": 35}
    assert static_sm90.check(old_bf16) == ["MMA ['HMMA.16816.F32.BF16']", "tensor 0.771 > 0.6", "shared 0.739 > 0.6"]
    assert static_sm90.check(old_fp8) == ["tensor 1.542 > 0.8", "shared 2.057 > 0.8"]
    assert static_sm90.check(old_fp32) == ["stack_bytes 80", "local_ops 35"]
    assert static_sm90.ctas_per_sm(212992, 160, 4) == 1 and static_sm90.ctas_per_sm(98304, 128, 4) == 2
