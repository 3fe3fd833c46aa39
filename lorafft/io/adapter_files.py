"""PEFT adapter directories: ``adapter_config.json`` (parsed, not interpreted) and the adapter's tensors.

What the config and tensors mean (ranks, α, patterns, DoRA) is :mod:`lorafft.adapters`' business; this module
only finds and opens the files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from lorafft.errors import InputError
from lorafft.io.checkpoint import Checkpoint, existing_path, first_file, open_file
from lorafft.io.jsonfile import CONFIG_BYTES, read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Adapter:
    """A PEFT adapter directory: its parsed ``adapter_config.json`` (uninterpreted) and its tensors."""

    path: str
    config: dict
    tensors: Checkpoint


def is_adapter(source) -> bool:
    """True if ``source`` is a directory containing ``adapter_config.json``."""
    return not isinstance(source, Mapping) and os.path.isfile(os.path.join(os.fspath(source), ADAPTER_CONFIG))


def open_adapter(source: str | os.PathLike) -> Adapter:
    """Open a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``)."""
    path = existing_path(source)
    if not is_adapter(path):
        raise InputError(path, f"not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    config = read_json_object(os.path.join(path, ADAPTER_CONFIG), max_bytes=CONFIG_BYTES)
    file = first_file(path, ADAPTER_WEIGHTS)
    if file is None:
        raise InputError(path, "no adapter_model.safetensors or adapter_model.bin")
    return Adapter(path, config, open_file(path, file))
