"""Where a scan's time goes: per-stage busy seconds (``lorafft scan --profile``, the report's ``profile``).

Stages (:data:`STAGES`): ``read`` (the reader thread reading tensors and cached bases from files), ``to_device``
(pinning and copying a batch to the device, and waiting for the copy), ``base_basis`` (computing a base basis),
``tuned_topk`` (the certified top-k of the tuned matrices), ``match`` (max |cos| against the base basis and the
counts), ``magnitude_direction`` (DoRA's ΔM and ΔD), ``write`` (journal rows, cache entries, the report). Each is its
own busy time: the reader thread's stages overlap the analysis', so the stages may add up to more than the wall time.

Memory beside the time: the batches the scan cut and the peak its memory model (:mod:`lorafft.memory`) predicts
for the largest, and on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``: since the process started
or the caller last reset it), so that the prediction can be held against what the device held.

Timing costs nothing when no :class:`Profile` is active. When one is, a stage on a CUDA device synchronises the
device at its start and end, so that its seconds are the device's work and not only the launches: profiling slows a
GPU scan a little, and says so.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time

STAGES = ("read", "to_device", "base_basis", "tuned_topk", "match", "magnitude_direction", "write")
_ACTIVE: contextvars.ContextVar[Profile | None] = contextvars.ContextVar("lorafft_profile", default=None)


class Profile:
    """Busy seconds per stage, accumulated from any thread; ``wall`` seconds once :meth:`finish` is called."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.memory: dict | None = None
        self.wall = 0.0
        self._start = time.perf_counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str, device=None):
        """Time the block as stage ``name`` (one of :data:`STAGES`), the CUDA ``device`` synchronised around it."""
        _synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(device)
            with self._lock:
                self.seconds[name] += time.perf_counter() - start

    def plan(self, device, batches: int, predicted_peak_bytes: int) -> None:
        """Record the scan's ``batches`` and the memory model's peak for its largest batch on ``device``."""
        self.memory = {"device": str(device), "batches": batches, "predicted_peak_bytes": predicted_peak_bytes}

    def finish(self) -> dict:
        """The record a report keeps: ``{"wall_seconds", "stages": {stage: seconds}}``, and ``memory`` when
        :meth:`plan` was told (with ``peak_allocated_bytes`` on CUDA)."""
        self.wall = time.perf_counter() - self._start
        record = {"wall_seconds": self.wall, "stages": dict(self.seconds)}
        if self.memory is not None:
            record["memory"] = dict(self.memory)
            if self.memory["device"].startswith("cuda"):
                import torch

                record["memory"]["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.memory["device"]))
        return record


def _synchronize(device) -> None:
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)


@contextlib.contextmanager
def active(profile: Profile | None):
    """Make ``profile`` the current one for :func:`stage` in this thread (and contexts copied from it)."""
    token = _ACTIVE.set(profile)
    try:
        yield profile
    finally:
        _ACTIVE.reset(token)


def current() -> Profile | None:
    """The active profile, to hand to another thread (threads do not inherit it)."""
    return _ACTIVE.get()


def stage(name: str, device=None, profile: Profile | None = None):
    """A context timing stage ``name`` in ``profile`` (default: the active one); nothing when there is none."""
    profile = profile or _ACTIVE.get()
    return contextlib.nullcontext() if profile is None else profile.stage(name, device)
