"""torchrun: two ranks (gloo, CPU) split the batches; rank 0 writes the report of a single-process run."""

import json
import os
import subprocess
import sys

from lorafft.distributed import assign

SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _run(*command):
    """A child process with one BLAS thread, as torchrun gives its ranks: bit-identical results need equal threads."""
    return subprocess.run([*map(str, command)], env={**os.environ, **SINGLE_THREADED}, capture_output=True,
                          text=True, timeout=300)


def test_two_ranks_write_the_single_process_report(trio, tmp_path):
    arguments = ["-m", "lorafft", "scan", trio.base, trio.lora, "--side", "both", "--eps", "0.5", "0.9",
                 "--max-batch-bytes", "1e-9", "--quiet"]
    single = _run(sys.executable, *arguments, "--out", tmp_path / "single.json")
    assert single.returncode == 0, single.stderr
    ranks = _run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 *arguments, "--out", tmp_path / "two.json")
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    assert ranks.stdout.count("intruders (max|cos| < ε)") == 1  # only rank 0 reports
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("single.json", "two.json"))
    assert two["matrices"] == one["matrices"]
    assert two["totals"] == one["totals"] and two["totals_by_side"]["left"]["0.5"] == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.json", "two.json"]  # journals gone


def test_assignment_balances_cost():
    costs = [9.0, 7.0, 6.0, 5.0, 5.0, 4.0, 1.0]
    owners = assign(costs, 3)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    assert sorted(loads) == [12.0, 12.0, 13.0]
    assert assign(costs, 1) == [0] * len(costs)
