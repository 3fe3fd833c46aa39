"""Block sizes shared by the kernel launchers."""

import triton


def block_size(n: int, cap: int) -> int:
    """Smallest power of two >= n, clamped to [16, cap] (``tl.dot`` needs every block dimension >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))
