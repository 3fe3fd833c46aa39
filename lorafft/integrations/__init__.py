"""Integrations of intruder tracking (:mod:`lorafft.tracking`) with training frameworks, each an optional extra.

* :mod:`lorafft.integrations.transformers` — :class:`IntruderCallback`, a ``transformers.TrainerCallback``
  (``pip install 'lorafft[track]'``).
"""
