"""Synthetic checkpoints with realistic spectra: the one generator shared by the demo, the tests and the benchmarks.

Spectrum model (``random_weight``): a spiked random matrix whose spikes and bulk live in orthogonal subspaces,

    W = U diag(d) Vᵀ + P⊥ G Q⊥,

U [out, p], V [in, p] with orthonormal columns (QR of a Gaussian), G Gaussian, P⊥ = I - UUᵀ, Q⊥ = I - VVᵀ.
Because the two parts are orthogonal on both sides, the top singular values of W are the spikes (to fp32 rounding)
d_i = σ1·ρ^(i-1), i = 1..p, with ρ = 0.97: a slow decay like real LLM weights (MiniLM's query matrix has
σ11/σ1 = 0.73 ≈ 0.97^10) and a 3 % gap between neighbours, so a small fine-tune does not reorder or mix
the top singular vectors. Below them lies the Marchenko–Pastur bulk of the projected Gaussian, scaled so that
its edge is at BULK_EDGE·σ1, just under the last spike (a spiked model, not a power-law tail). Cost: one
Gaussian and four [out, in]·[in, p]-sized products, about 0.3 s for 4096×4096 and 1.5 s for 4096×11008 on
two CPU cores, with one temporary of the matrix's size.

``write_trio`` writes a small Llama-shaped base checkpoint, a full fine-tune of it, and a PEFT LoRA adapter
whose merged update ΔW = s·B·A adds intruder dimensions (Shuttleworth et al. 2410.21228).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

SIGMA1 = 5.0  # default σ1, like MiniLM's query matrix (5.27)
DECAY = 0.97  # ρ: ratio of neighbouring top singular values
SPIKES = 24  # p: number of exact top singular values; σ_p = ρ^23·σ1 ≈ 0.50·σ1
BULK_EDGE = 0.45  # largest bulk singular value, as a fraction of σ1
LORA_SIGMA = 1.5  # top singular value of the trio's LoRA update s·B·A, as a multiple of the base σ1


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] fp32 with orthonormal columns spanning a uniformly random subspace (cols ≤ rows)."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator)).Q


def random_weight(
    out_features: int,
    in_features: int,
    *,
    generator: torch.Generator,
    sigma1: float = SIGMA1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A weight [out, in] whose top p = min(SPIKES, out, in) singular values are σ1·ρ^(i-1) exactly (before
    rounding to ``dtype``), with random singular vectors and a Gaussian bulk below BULK_EDGE·σ1.

    The bulk's entries have standard deviation BULK_EDGE·σ1 / (√out + √in): with σ1 = 5, entries of a 256×256
    weight have standard deviation 0.095 overall, of a 4096×4096 one 0.018.
    """
    p = min(SPIKES, out_features, in_features)
    u = _orthonormal(out_features, p, generator)
    v = _orthonormal(in_features, p, generator)
    bulk = torch.randn(out_features, in_features, generator=generator)
    bulk.mul_(BULK_EDGE * sigma1 / (math.sqrt(out_features) + math.sqrt(in_features)))
    bulk.sub_(u @ (u.T @ bulk))  # P⊥ G
    bulk.sub_((bulk @ v) @ v.T)  # P⊥ G Q⊥ (leaves Uᵀ·bulk = 0)
    spikes = sigma1 * DECAY ** torch.arange(p, dtype=torch.float32)
    bulk.addmm_(u * spikes, v.T)
    return bulk.to(dtype)


def full_finetune_update(weight: torch.Tensor, *, generator: torch.Generator, strength: float = 0.05) -> torch.Tensor:
    """ΔW [out, in] fp32 like a full fine-tune's: dense Gaussian with ‖ΔW‖_F ≈ strength·‖W‖_F.

    Its energy is spread evenly over all directions: it couples two singular pairs of W only through
    u_iᵀ ΔW v_j ~ N(0, (strength·rms(W))²), e.g. 0.005 for a 256×256 ``random_weight`` with σ1 = 5, far below
    the 3 % gaps (≥ 0.1) between its top singular values, so the tuned top-10 vectors stay aligned with the base
    ones (no intruders at ε = 0.5, k = 10; max |cos| ≥ 0.98 in the trio).
    """
    weight = weight.float()
    rms = weight.norm() / math.sqrt(weight.numel())
    return torch.randn(weight.shape, generator=generator).mul_(strength * rms)


def lora_update(
    out_features: int,
    in_features: int,
    rank: int,
    *,
    generator: torch.Generator,
    lora_alpha: float,
    sigma: float,
    use_rslora: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors A [r, in], B [out, r] (fp32) whose update ΔW = s·B·A, s = α/r (α/√r with rsLoRA), has
    singular values sigma·ρ^(j-1), j = 1..r, along random directions.

    Random directions are nearly orthogonal to every singular vector of a base matrix (max |cos| ≈ √(2 ln n / n)),
    so with ``sigma`` comparable to or above the base σ1 each direction becomes a new top singular vector of
    W0 + ΔW that is an intruder dimension. The magnitude is split evenly between A and B.
    """
    scaling = lora_alpha / (math.sqrt(rank) if use_rslora else rank)
    root = (sigma * DECAY ** torch.arange(rank, dtype=torch.float32) / scaling).sqrt()
    lora_b = _orthonormal(out_features, rank, generator) * root
    lora_a = _orthonormal(in_features, rank, generator).T * root[:, None]
    return lora_a.contiguous(), lora_b.contiguous()


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path), metadata={"format": "pt"})


def write_checkpoint(
    state_dict: dict[str, torch.Tensor],
    directory,
    *,
    max_shard_bytes: int | None = None,
    config: dict | None = None,
) -> Path:
    """Write ``state_dict`` in the Hugging Face layout and return the directory.

    One ``model.safetensors``, or, when the tensors exceed ``max_shard_bytes``, shards
    ``model-0000i-of-0000N.safetensors`` filled greedily in ``state_dict`` order (a tensor larger than the limit
    gets a shard of its own) plus ``model.safetensors.index.json`` with ``metadata.total_size`` (bytes of all
    tensors) and ``weight_map`` (tensor name → shard file). ``config`` is written as ``config.json``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {name: t.numel() * t.element_size() for name, t in state_dict.items()}
    total = sum(sizes.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        _save(state_dict, directory / "model.safetensors")
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        used = 0
        for name, tensor in state_dict.items():
            if shards[-1] and used + sizes[name] > max_shard_bytes:
                shards.append({})
                used = 0
            shards[-1][name] = tensor
            used += sizes[name]
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save(shard, directory / filename)
            weight_map.update(dict.fromkeys(shard, filename))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_peft_adapter(
    directory,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int,
    lora_alpha: float,
    target_modules: list[str],
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write a PEFT LoRA adapter as ``save_pretrained`` does and return the directory.

    ``modules`` maps a module name of the base model (``model.layers.0.self_attn.q_proj``) to its factors
    (A [r, in], B [out, r]); they are stored as ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``
    in ``adapter_model.safetensors``, next to ``adapter_config.json``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (lora_a, lora_b) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
    _save(tensors, directory / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": sorted(target_modules),
        "use_rslora": use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


@dataclass(frozen=True)
class Trio:
    """Directories of a synthetic base checkpoint, its full fine-tune, and a PEFT LoRA adapter on the base."""

    base: Path
    full: Path
    lora: Path


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_layer_shapes(hidden: int, kv: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """The seven projection weights of one Llama decoder layer, ``{module: (out, in)}``: q, o ``[hidden, hidden]``,
    k, v ``[kv, hidden]`` (kv = key/value heads × head dim), gate, up ``[intermediate, hidden]``, down
    ``[hidden, intermediate]``."""
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }


def write_trio(
    directory,
    *,
    hidden: int = 256,
    intermediate: int = 688,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 1,
    vocab: int = 512,
    lora_rank: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Trio:
    """Write ``base/``, ``full/`` and ``lora/`` under ``directory``; deterministic given ``seed``.

    base/: a Llama-shaped checkpoint (``LlamaForCausalLM`` names and ``config.json``): per layer
    ``self_attn.{q,o}_proj`` [hidden, hidden], ``self_attn.{k,v}_proj`` [kv_heads·head_dim, hidden] (GQA),
    ``mlp.{gate,up}_proj`` [intermediate, hidden], ``mlp.down_proj`` [hidden, intermediate], 1-D RMSNorm weights,
    plus ``model.embed_tokens.weight`` and ``lm_head.weight`` [vocab, hidden], all 2-D ones from
    ``random_weight`` (σ1 = SIGMA1), in ``dtype``, written in at least two shards with an index.
    full/: every 2-D weight + ``full_finetune_update`` (same layout and sharding); norms unchanged.
    lora/: a rank-``lora_rank`` PEFT adapter on q, k, v, o, gate, up, down with α = 2r (s = 2) whose update's
    top singular value is LORA_SIGMA·σ1, so every adapted matrix gets ``lora_rank`` intruder dimensions; the full fine-tune has none
    (``tests/test_synthetic.py::test_trio_demo_property`` checks both at the defaults against an fp64 SVD).
    """
    directory = Path(directory)
    generator = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes = llama_layer_shapes(hidden, kv, intermediate)
    base = {"model.embed_tokens.weight": random_weight(vocab, hidden, generator=generator)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for module, shape in shapes.items():
            base[f"{prefix}.{module}.weight"] = random_weight(*shape, generator=generator)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            base[f"{prefix}.{norm}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    base["model.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    base["lm_head.weight"] = random_weight(vocab, hidden, generator=generator)
    base = {name: t.to(dtype) for name, t in base.items()}

    full = {
        name: (t.float() + full_finetune_update(t, generator=generator)).to(dtype) if t.ndim == 2 else t
        for name, t in base.items()
    }

    lora_alpha = 2 * lora_rank
    adapter = {}
    for layer in range(layers):
        for module, shape in shapes.items():
            lora_a, lora_b = lora_update(
                *shape, lora_rank, generator=generator, lora_alpha=lora_alpha, sigma=LORA_SIGMA * SIGMA1
            )
            adapter[f"model.layers.{layer}.{module}"] = (lora_a.to(dtype), lora_b.to(dtype))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    shard_bytes = sum(t.numel() * t.element_size() for t in base.values()) // 2
    trio = Trio(directory / "base", directory / "full", directory / "lora")
    write_checkpoint(base, trio.base, max_shard_bytes=shard_bytes, config=config)
    write_checkpoint(full, trio.full, max_shard_bytes=shard_bytes, config=config)
    write_peft_adapter(
        trio.lora,
        adapter,
        r=lora_rank,
        lora_alpha=lora_alpha,
        target_modules=list(LORA_TARGETS),
        base_model_name_or_path=str(trio.base),
    )
    return trio


# ---------------------------------------------------------------------------------------------------------------
# FP8 checkpoints and mixture-of-experts weights

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_SCALE_SUFFIX = {"tensor": "_scale", "channel": "_scale", "block": "_scale_inv"}


def quantize_fp8(weight: torch.Tensor, scheme: str, *, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``weight [out, in]`` as float8_e4m3fn and fp32 scales with ``weight ≈ q * scale``.

    scheme ``"tensor"``: scale ``[1]`` (compressed-tensors per tensor); ``"channel"``: ``[out, 1]`` (per output
    channel); ``"block"``: ``[ceil(out/block), ceil(in/block)]``, one per tile, the last ones partial (DeepSeek-V3's
    ``weight_scale_inv``). Each scale is the amax of its group / 448, so the group's largest entry maps to 448;
    an all-zero group gets scale 1.
    """
    w = weight.float()
    rows, cols = w.shape
    if scheme == "tensor":
        amax = w.abs().amax().reshape(1)
    elif scheme == "channel":
        amax = w.abs().amax(dim=1, keepdim=True)
    elif scheme == "block":
        tiles = (-(-rows // block), -(-cols // block))
        padded = torch.nn.functional.pad(w.abs(), (0, tiles[1] * block - cols, 0, tiles[0] * block - rows))
        amax = padded.reshape(tiles[0], block, tiles[1], block).amax(dim=(1, 3))
    else:
        raise ValueError(f"unknown FP8 scheme {scheme!r} (expected 'tensor', 'channel' or 'block')")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scheme == "block":
        expanded = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    else:
        expanded = scale
    q = (w / expanded).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.contiguous()


def _quantizable(name: str, tensor: torch.Tensor) -> bool:
    """The default choice of tensors to store in FP8: 2-D floating ``*.weight`` other than embeddings and
    ``lm_head`` (which FP8 checkpoints, DeepSeek-V3's and compressed-tensors', keep in bf16)."""
    from lorafft.pairing import is_embedding

    return tensor.ndim == 2 and tensor.is_floating_point() and name.endswith(".weight") and not is_embedding(name)


def write_fp8_checkpoint(
    state_dict: dict[str, torch.Tensor],
    directory,
    *,
    scheme: str = "channel",
    block: int = 128,
    quantize=_quantizable,
    max_shard_bytes: int | None = None,
    config: dict | None = None,
) -> Path:
    """Write ``state_dict`` as an FP8 checkpoint (``write_checkpoint``'s layout) and return the directory.

    Each tensor for which ``quantize(name, tensor)`` is true is stored float8_e4m3fn (``quantize_fp8``) beside
    its fp32 scale: ``<name>_scale`` for ``scheme`` "tensor" / "channel" (compressed-tensors), ``<name>_scale_inv``
    for "block" (DeepSeek-V3, 128×128 tiles). Other tensors are stored as given. ``config`` gets a
    ``quantization_config`` naming the scheme.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if quantize(name, tensor):
            out[name], out[name + FP8_SCALE_SUFFIX[scheme]] = quantize_fp8(tensor, scheme, block=block)
        else:
            out[name] = tensor
    if config is not None:
        quantization = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                         "weight_block_size": [block, block]} if scheme == "block" else
                        {"quant_method": "compressed-tensors", "format": "float-quantized",
                         "weights": {"type": "float", "num_bits": 8, "strategy": scheme}})
        config = dict(config, quantization_config=quantization)
    return write_checkpoint(out, directory, max_shard_bytes=max_shard_bytes, config=config)


def moe_state_dict(
    *,
    hidden: int = 64,
    intermediate: int = 48,
    experts: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A tiny mixture-of-experts state dict with the three expert layouts found in checkpoints, one per layer,
    every expert matrix a ``random_weight`` (its torch ``[out, in]`` form):

    - layer 0, per expert (Mixtral): ``model.layers.0.block_sparse_moe.experts.<e>.w1/w3.weight`` ``[I, H]``,
      ``.w2.weight`` ``[H, I]``;
    - layer 1, stacked ``[E, in, out]`` (GPT-OSS, Llama 4): ``model.layers.1.mlp.experts.gate_up_proj``
      ``[E, H, 2I]``, ``.down_proj`` ``[E, I, H]`` (biases left out);
    - layer 2, stacked ``[E, out, in]`` (vLLM / transformers fused experts): ``model.layers.2.mlp.experts.gate_up_proj``
      ``[E, 2I, H]``, ``.down_proj`` ``[E, H, I]``;

    plus a 1-D ``post_attention_layernorm.weight`` per layer. Deterministic given ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)

    def stack(out_features: int, in_features: int, transposed: bool) -> torch.Tensor:
        matrices = [random_weight(out_features, in_features, generator=generator) for _ in range(experts)]
        return torch.stack([m.T if transposed else m for m in matrices]).contiguous()

    state: dict[str, torch.Tensor] = {}
    for e in range(experts):
        prefix = f"model.layers.0.block_sparse_moe.experts.{e}"
        state[f"{prefix}.w1.weight"] = random_weight(intermediate, hidden, generator=generator)
        state[f"{prefix}.w2.weight"] = random_weight(hidden, intermediate, generator=generator)
        state[f"{prefix}.w3.weight"] = random_weight(intermediate, hidden, generator=generator)
    for layer, transposed in ((1, True), (2, False)):
        prefix = f"model.layers.{layer}.mlp.experts"
        state[f"{prefix}.gate_up_proj"] = stack(2 * intermediate, hidden, transposed)
        state[f"{prefix}.down_proj"] = stack(hidden, intermediate, transposed)
    for layer in range(3):
        norm = 1 + 0.1 * torch.randn(hidden, generator=generator)
        state[f"model.layers.{layer}.post_attention_layernorm.weight"] = norm
    return {name: t.to(dtype) for name, t in state.items()}


# ---------------------------------------------------------------------------------------------------------------
# Fused projections (Phi-3)


def phi3_config(
    *,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 96,
    layers: int = 1,
    vocab: int = 128,
) -> dict:
    """A ``config.json`` for a tiny Phi-3 (``Phi3ForCausalLM``, model_type ``phi3``): what transformers needs to
    split its fused ``qkv_proj`` (``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` = hidden / heads)
    and ``gate_up_proj`` (``intermediate_size``)."""
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def phi3_state_dict(config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A Phi-3-shaped state dict for ``config`` (``phi3_config``), deterministic given ``seed``.

    Per layer: ``self_attn.qkv_proj.weight`` ``[(h + 2·kv)·d, H]``, rows ``[q; k; v]`` as ``Phi3Attention`` splits
    them, each block its own ``random_weight`` (so q, k and v each have the realistic spectrum of an unfused
    projection); ``self_attn.o_proj.weight`` ``[H, h·d]``; ``mlp.gate_up_proj.weight`` ``[2I, H]``, rows
    ``[gate; up]`` (``Phi3MLP``: ``chunk(2)``, gate first), each half a ``random_weight``; ``mlp.down_proj.weight``
    ``[H, I]``; two 1-D RMSNorm weights. Plus ``model.embed_tokens.weight``, ``model.norm.weight`` and
    ``lm_head.weight``.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads, intermediate = config["num_key_value_heads"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]

    def blocks(*rows: int) -> torch.Tensor:
        return torch.cat([random_weight(r, hidden, generator=generator) for r in rows])

    state = {"model.embed_tokens.weight": random_weight(vocab, hidden, generator=generator)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        kv = kv_heads * head_dim
        state[f"{prefix}.self_attn.qkv_proj.weight"] = blocks(heads * head_dim, kv, kv)
        state[f"{prefix}.self_attn.o_proj.weight"] = random_weight(hidden, heads * head_dim, generator=generator)
        state[f"{prefix}.mlp.gate_up_proj.weight"] = blocks(intermediate, intermediate)
        state[f"{prefix}.mlp.down_proj.weight"] = random_weight(hidden, intermediate, generator=generator)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{prefix}.{norm}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    state["model.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    state["lm_head.weight"] = random_weight(vocab, hidden, generator=generator)
    return {name: t.to(dtype) for name, t in state.items()}


def write_phi3_checkpoint(
    directory,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    config: dict | None = None,
    seed: int = 0,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a Phi-3-shaped checkpoint (fused ``qkv_proj`` and ``gate_up_proj``) with its ``config.json`` and return
    the directory. ``config`` defaults to ``phi3_config()``, ``state_dict`` to ``phi3_state_dict(config, seed=seed)``
    (pass a modified copy of that to write a fine-tune)."""
    config = phi3_config() if config is None else config
    state_dict = phi3_state_dict(config, seed=seed) if state_dict is None else state_dict
    return write_checkpoint(state_dict, directory, max_shard_bytes=max_shard_bytes, config=config)
