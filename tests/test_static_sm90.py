"""Static check of the sketch kernel for Hopper (sm_90), compiled on this CPU with Triton's bundled ptxas: no
spills, tensor-core MMA, and an issue-time ratio that keeps up with H200 HBM (``benchmarks/static_sm90.py``).

To keep the suite fast this compiles one shape (8192×28672, down_proj of Llama-70B; the code does not depend on the
shape), both orientations, of six of the ten variants (every weight dtype; fp8 with each scale kind) and the split
kernel, in one subprocess: compiling needs Triton without its interpreter, which the other kernel tests switch on
in this process. ``python benchmarks/static_sm90.py`` runs
every shape (the committed table)."""

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
SUBSET = ("bf16", "fp16", "fp32", "fp8e4m3_tensor", "fp8e5m2_channel", "fp8e4m3_block")


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


def test_every_variant_compiles_for_sm90_on_tensor_cores_without_spills(table):
    sketches = {key: row for key, row in table.items() if row["kernel"] == "sketch"}
    assert len(sketches) == 2 * len(SUBSET)
    splits = [row for row in table.values() if row["kernel"] == "split"]
    assert len(splits) == len(static_sm90.SPLITS) and all(row["spill_bytes"] == 0 for row in splits)
    for (dtype, orientation), row in sketches.items():
        assert row["spill_bytes"] == 0, row["variant"]
        assert sum(row["loop_ops"].get(op, 0) for op in static_sm90.MMA_OPS) > 0, row["variant"]  # tensor cores
        assert row["ratio"] < 1.0, row["variant"]  # keeps up with HBM


def test_bf16_and_fp8_sketches_meet_the_issue_time_target(table):
    """bf16 and fp8 (every scale) at <= 0.5 of the HBM issue budget, both orientations."""
    for (dtype, orientation), row in table.items():
        if row["kernel"] == "sketch" and dtype.startswith(("bf16", "fp8")):
            assert row["ratio"] <= 0.5, (row["variant"], row["ratio"])


def test_no_scalar_fp32_products(table):
    """The products are MMA: FFMA in the main loop only for a 128×128 block scale (one per accumulator element)."""
    for (dtype, orientation), row in table.items():
        if row["kernel"] == "sketch":
            assert row["loop_ops"].get("FFMA", 0) <= (64 if dtype.endswith("block") else 0), row["variant"]


def test_sass_parsing_finds_the_loop():
    """The loop finder on a hand-made listing: the backward branch's range, not the straight-line code."""
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   HGMMA.64x32x16.F32.BF16 R40, gdesc[UR16], R40 ;",
        "        /*0020*/                   FFMA R2, R3, R4, R5 ;",
        "        /*0030*/               @P0 BRA 0x10 ;",
        "        /*0040*/                   EXIT ;",
    ])
    loop = static_sm90.main_loop(static_sm90.parse_sass(sass))
    assert [op for _, op, _ in loop] == ["HGMMA", "FFMA", "BRA"]
