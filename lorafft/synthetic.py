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
whose merged update ΔW = s·B·A adds intruder dimensions (Shuttleworth et al. 2410.21228); ``write_run`` grows that
adapter's update along a mock training run (the README's Figure 5 example); all through
:mod:`lorafft.io.writer` (``write_checkpoint`` is re-exported here for the tests and benchmarks that build their own
checkpoints). Test-only builders (FP8, mixture-of-experts, Phi-3) live in ``tests/fixtures/checkpoints.py``.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafft.io.writer import write_checkpoint, write_json, write_safetensors

SIGMA1 = 5.0  # default σ1, like MiniLM's query matrix (5.27)
RUN_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # write_run's steps: the fraction t of the adapter's update reached
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
    write_safetensors(directory / "adapter_model.safetensors", tensors, {"format": "pt"})
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
    write_json(directory / "adapter_config.json", config)
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
    top singular value is LORA_SIGMA·σ1, so every adapted matrix gets ``lora_rank`` intruder dimensions; the full
    fine-tune has none
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
        base_model_name_or_path=os.path.abspath(trio.base),  # found from any working directory
    )
    return trio


def write_run(lora, directory, fractions=RUN_FRACTIONS) -> list[Path]:
    """A mock training run of the PEFT adapter ``lora`` (one ``write_trio`` wrote): for each t of ``fractions`` an
    adapter whose update is t·s·B·A (its B scaled by t), in ``directory/step-<t>`` (``step-0.25``, ...). As t grows
    the update's top singular value t·LORA_SIGMA·σ1 climbs past the base's σ1: the intruder rises to the top of the
    spectrum, as in the paper's Figure 5. Returns the step directories in order."""
    lora = Path(lora)
    tensors = load_file(lora / "adapter_model.safetensors")
    steps = []
    for fraction in fractions:
        step = Path(directory) / f"step-{fraction:g}"
        step.mkdir(parents=True, exist_ok=True)
        scaled = {name: t * fraction if ".lora_B." in name else t for name, t in tensors.items()}
        write_safetensors(step / "adapter_model.safetensors", scaled, {"format": "pt"})
        shutil.copy(lora / "adapter_config.json", step / "adapter_config.json")
        steps.append(step)
    return steps
