"""lorafft: did this fine-tune change the model the way full fine-tuning does, or did it grow intruder dimensions?

Three levels of API (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2410.21228):

* :func:`scan` — checkpoints (or state dicts, or a PEFT adapter) in, a :class:`Report` out;
* :func:`analyze` — the intruder analysis on tensors you hold: one pair ``[m, n]`` or stacks ``[L, m, n]``;
* :mod:`lorafft.linalg` — the batched primitives: exact base basis, certified truncated SVD, max |cos|.
"""

__version__ = "0.1.0"

from lorafft.analysis import analyze
from lorafft.errors import InputError
from lorafft.report import Report
from lorafft.scan import scan

__all__ = ["InputError", "Report", "analyze", "scan", "__version__"]
