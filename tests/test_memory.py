"""The memory model that cuts batches (lorafft.memory), and what a scan does when the device still runs out of memory:
the batch is analysed in halves, the same rows, one warning."""

import warnings

import pytest
import torch

import lorafft
from lorafft import memory, pairing, recipe

LLAMA_70B = [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)]
H200_FREE = 139 * 2**30


@pytest.mark.parametrize("plan", [
    memory.Plan(device="cuda", base_itemsize=2, sources=(("full", 2),), torch_products=False),
    memory.Plan(device="cuda", base_itemsize=2, sources=(("lora", 16),), cached=True, torch_products=False),
    memory.Plan(device="cuda", base_itemsize=2, sources=(("lora", 16), ("full", 2)), torch_products=False),
    memory.Plan(device="cpu", sources=(("full", 4),)),
], ids=["full bf16", "lora cached", "two sources", "cpu fp32"])
def test_batch_size_is_the_largest_that_fits(plan):
    """For every 70B shape: the batch size's predicted peak is within the budget and one more matrix would not be;
    a budget too small for one matrix still gives one (what a scan must do at least)."""
    budget = int(0.8 * H200_FREE) if plan.device == "cuda" else 4 << 30
    for shape in LLAMA_70B:
        L = memory.batch_size(shape, budget, plan)
        assert memory.batch_peak(shape, L, plan) <= budget or L == 1
        assert memory.batch_peak(shape, L + 1, plan) > budget
        assert memory.batch_size(shape, 1, plan) == 1


def test_the_model_counts_both_batches_the_basis_and_the_workspace():
    """The terms a review found missing: the prefetched batch, the basis at its peak (16 s² fp64 plus the fp32 copy
    on a GPU), the eigen-solver's workspace, and an fp32 copy of 16-bit weights when torch multiplies."""
    shape, s = (8192, 8192), 8192
    gpu = memory.Plan(device="cuda", base_itemsize=2, sources=(("full", 2),), torch_products=False)
    scaling, inputs = memory.per_matrix(shape, gpu)
    assert inputs == 2 * 2 * s * s  # W0 and Wt as stored, bf16
    assert scaling >= 2 * inputs + (16 + 4) * s * s
    assert memory.per_batch(shape, 1, gpu) >= 8 * 2 * s * s  # ?syevd's workspace for one matrix
    cached = memory.per_matrix(shape, memory.Plan(device="cuda", base_itemsize=2, sources=(("full", 2),), cached=True,
                                                  torch_products=False))[0]
    assert cached < scaling  # a cached basis is read (4 s², twice), not built (16 s² + 4 s²)
    torch_copy = memory.per_matrix(shape, memory.Plan(device="cuda", base_itemsize=2, sources=(("full", 2),)))[0]
    assert torch_copy - scaling == 4 * s * s
    # a bf16 70B full fine-tune without a cache on an H200: the old budget put 67 q/o matrices in a batch
    assert memory.batch_peak(shape, 67, gpu) > 0.8 * H200_FREE >= memory.batch_peak(
        shape, memory.batch_size(shape, int(0.8 * H200_FREE), gpu), gpu)


def test_shape_batches_cut_by_the_model():
    pairs = [pairing.Pair(f"{i}.{shape}", f"{i}.{shape}", shape) for shape in LLAMA_70B for i in range(20)]
    sizes = {(8192, 8192): 7, (1024, 8192): 20, (28672, 8192): 3, (8192, 28672): 2}
    batches = pairing.shape_batches(pairs, sizes.__getitem__)
    assert all(len(batch) <= sizes[batch[0].shape] for batch in batches)
    assert sum(map(len, batches)) == len(pairs) and len(batches) == 3 + 1 + 7 + 10


def test_out_of_memory_splits_the_batch_into_halves_with_the_same_rows(trio, monkeypatch):
    """A device that cannot hold more than one matrix at a time (simulated): every batch is analysed in halves down
    to single matrices, the rows equal the unsplit scan's, and the scan warns once."""
    whole = lorafft.scan(trio.base, [trio.full, trio.lora], eps=(0.5, 0.9), side="both", seed=3)
    rows = recipe.Recipe.rows

    def small_device(self, loaded):
        if loaded.W0.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return rows(self, loaded)

    monkeypatch.setattr(recipe.Recipe, "rows", small_device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = lorafft.scan(trio.base, [trio.full, trio.lora], eps=(0.5, 0.9), side="both", seed=3)
    assert len([w for w in caught if "ran out of memory" in str(w.message)]) == 1
    assert len(split.rows) == len(whole.rows) == 2 * 14 * 2
    for mine, theirs in zip(split.rows, whole.rows):  # equal but for the rounding of batched BLAS calls
        mine, theirs = mine.to_dict(), theirs.to_dict()
        for key, value in theirs.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert mine[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
            else:
                assert mine[key] == value, key
