"""Reading and writing checkpoints: the only code that knows about files, shards and dtypes.

Every file is untrusted: each problem with one is an :class:`~lorafft.errors.InputError` naming that file, raised
before the data is used. Read in the order of the data flow:

- ``jsonfile.py`` — the one parser of untrusted JSON (safetensors headers, shard indexes, model and adapter configs,
  the base-cache index, reports), with size and depth limits;
- ``safetensors.py`` — the safetensors header validated rule by rule, then a lazily mapped shard;
- ``torch_bin.py`` — ``.bin``/``.pt``/``.pth`` files (``weights_only=True``) and in-memory state dicts;
- ``shard.py`` — the reader interface (:class:`~lorafft.io.shard.Shard`) and a checkpoint's name -> shard map;
- ``fp8.py`` — FP8 scale schemes and :func:`dequantize`;
- ``fused.py`` — the row layouts of fused projections (Phi-3, GPT-NeoX, BLOOM, Falcon) from ``config.json``;
- ``views.py`` — what the analysis sees: FP8 weights dequantized, stacked experts per expert, fused weights split,
  behind one small view protocol;
- ``checkpoint.py`` — :class:`Checkpoint` and :func:`open_checkpoint`: directories, files, indexes, state dicts;
- ``adapter_files.py`` — PEFT adapter directories (:func:`open_adapter`);
- ``hub.py`` — Hugging Face Hub ids found in the local Hub cache (or downloaded), and the base an adapter names;
- ``writer.py`` — the one writer: atomic files and directories, safetensors files, checkpoint layouts.
"""

from lorafft.io.adapter_files import Adapter, is_adapter, open_adapter
from lorafft.io.checkpoint import Checkpoint, open_checkpoint
from lorafft.io.fp8 import dequantize
from lorafft.io.jsonfile import read_json_object
from lorafft.io.torch_bin import STATE_DICT

__all__ = ["Adapter", "Checkpoint", "STATE_DICT", "dequantize", "is_adapter", "open_adapter", "open_checkpoint",
           "read_json_object"]
