"""Many processes, one report: ``torchrun`` spreads a scan's batches over ranks with torch.distributed.

``torchrun --nproc-per-node N -m lorafft scan ...`` (and the same across nodes with ``--nnodes`` and a rendezvous
endpoint) starts N copies of the scan. Every rank pairs the checkpoints (headers only), cuts the same global
batches, and computes the batches assigned to it, reading only those tensors; rank 0 gathers the rows and writes
the one report, identical to a single-process run's (every matrix draws its own random stream).

A scan of a 70B model takes hours, and ranks finish at different times: the process group is made with a timeout of
:data:`TIMEOUT` (``$LORAFFT_DIST_TIMEOUT`` seconds overrides it), not NCCL's default 10 minutes, and the rows are
gathered and the end awaited on a CPU (gloo) group of the same timeout, so a rank that finishes early waits for the
others without a GPU collective that could time out or hold device memory.
"""

from __future__ import annotations

import datetime
import functools
import os

import torch

TIMEOUT = datetime.timedelta(days=7)


def _timeout() -> datetime.timedelta:
    seconds = os.environ.get("LORAFFT_DIST_TIMEOUT")
    return TIMEOUT if not seconds else datetime.timedelta(seconds=float(seconds))



def world() -> tuple[int, int]:
    """``(rank, world size)``; joins the process group torchrun describes in the environment (NCCL with CUDA, else
    gloo) when there is more than one process. ``(0, 1)`` outside torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL works on the current device: one GPU per local rank
            torch.cuda.set_device(local_device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=_timeout())
    return dist.get_rank(), dist.get_world_size()


@functools.cache
def _group():
    """The CPU (gloo) group every rank gathers rows and waits on, with the long timeout (made once)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=_timeout())


def local_device() -> torch.device:
    """This process's device for a scan: ``cuda:$LOCAL_RANK`` (``cuda:0`` outside torchrun) when CUDA is available,
    else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def assign(costs: list[float], size: int) -> list[int]:
    """The rank that computes each batch: longest-processing-time-first, each batch to the least loaded rank."""
    owners, load = [0] * len(costs), [0.0] * size
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(size), key=lambda r: load[r])
        owners[index] = rank
        load[rank] += costs[index]
    return owners


def gather(rows_by_batch: dict[int, list], rank: int, size: int) -> dict[int, list] | None:
    """Every rank's ``{batch index: rows}`` merged on rank 0 (None on the other ranks)."""
    if size == 1:
        return rows_by_batch
    import torch.distributed as dist

    parts = [None] * size if rank == 0 else None
    dist.gather_object(rows_by_batch, parts, dst=0, group=_group())
    if rank != 0:
        return None
    return {index: rows for part in parts for index, rows in part.items()}


def barrier(size: int) -> None:
    """Wait for every rank (no-op for one process)."""
    if size > 1:
        import torch.distributed as dist

        dist.barrier(group=_group())
