"""lorafft: did this fine-tune change the model the way full fine-tuning does, or did it grow intruder dimensions?

Three levels of API (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2410.21228):

* :func:`scan` — checkpoints (or state dicts, or a PEFT adapter) in, a :class:`Report` out;
* :func:`analyze` — the intruder analysis on tensors you hold: one pair ``[m, n]`` or stacks ``[L, m, n]``;
* :mod:`lorafft.linalg` — the batched primitives: exact base basis, certified truncated SVD, max |cos|;
* :class:`Tracker` — the scan's rows for a model while it trains (:mod:`lorafft.tracking`).

The names above are imported on first use (PEP 562), so ``import lorafft`` and ``lorafft --help`` do not load torch.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {"analyze": "lorafft.analysis", "InputError": "lorafft.errors", "Report": "lorafft.report",
         "scan": "lorafft.scan", "Tracker": "lorafft.tracking"}

# the submodules ``lorafft.cache`` and the like reach after a plain ``import lorafft`` (the ``scan`` submodule is
# ``lorafft.scan``'s module: the attribute stays the function)
_SUBMODULES = frozenset({"adapters", "analysis", "arrays", "cache", "distributed", "errors", "integrations", "intervene",
                         "io", "journal", "linalg", "loading", "memory", "options", "pairing", "plots", "profiling",
                         "recipe", "report", "synthetic", "tracking", "updating"})

__all__ = ["InputError", "Report", "Tracker", "analyze", "scan", "__version__"]


def __getattr__(name: str):
    """``lorafft.scan`` and the other names of ``__all__``, imported from their module on first access; and the
    submodules (``lorafft.cache``, ``lorafft.intervene``, ...), imported on first access."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"lorafft.{name}")  # the import system sets the attribute
    raise AttributeError(f"module 'lorafft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


class _Package(types.ModuleType):
    """The package module, keeping ``lorafft.scan`` the function: importing the submodule ``lorafft.scan`` makes the
    import system set the package attribute of that name to the submodule, which would hide the function."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
