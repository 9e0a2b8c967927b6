"""Model-size arithmetic behind ``dit-verify``: parameters, weight memory, FLOPs, training memory per GPU.

Parameter counts come from the module itself (built on the meta device, so no memory is allocated); FLOPs and
memory come from the formulas below, which docs/model-sizes.md explains and compares against measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import TIMESTEP_FREQ_DIM, DiTConfig, DiTModel, count_parameters

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2}
# Parameter counts a model card states for these presets. The dimensions do not give them, so a size report shows
# each beside the true count (docs/model-sizes.md).
MODEL_CARD_CLAIMS = {"dit-10l": 390_000_000, "dit-8l": 320_000_000, "dit-6l": 250_000_000,
                     "dit-legacy-30l": 150_000_000}


def parameter_breakdown(config: DiTConfig) -> dict[str, int]:
    """Trainable parameters by part; ``total`` = embeddings + num_layers * per_block + final_layer.

    The fixed position embedding is a buffer, not a parameter (the paper stores it as a frozen parameter, which
    adds ``pos_embed_buffer`` to its count).
    """
    model = DiTModel.on_meta(config)
    embeddings = sum(count_parameters(m) for m in (model.x_embedder, model.t_embedder, model.y_embedder,
                                                   model.g_embedder) if m is not None)
    return {
        "embeddings": embeddings,
        "per_block": count_parameters(model.blocks[0]),
        "blocks": count_parameters(model.blocks),
        "final_layer": count_parameters(model.final_layer),
        "total": count_parameters(model),
        "pos_embed_buffer": model.pos_embed.numel(),
    }


def weight_bytes(config: DiTConfig) -> dict[str, int]:
    """Weight memory in each engine precision; fp8 as the engine holds it (fast_paths.apply_fast_paths, applied on
    the meta device): the quantized weights in one byte each with an fp32 scale per output row (fc2 of a block-scaled
    MLP: per 128x128 tile), and every weight in bf16 (the quantized ones' too, for forwards below
    ``FastPaths.fp8_min_rows``); ``fp8_only`` with that at 0."""
    from .engine.fast_paths import FastPaths, apply_fast_paths
    from .engine.fp8 import Fp8BlockMlp, Fp8Linear

    out = {precision: n * count_parameters(DiTModel.on_meta(config)) for precision, n in BYTES_PER_PARAM.items()}
    for name, min_rows in (("fp8", FastPaths.fp8_min_rows), ("fp8_only", 0)):
        fp8 = apply_fast_paths(DiTModel.on_meta(config).to(torch.bfloat16),
                               FastPaths(joined_adaln=False, fp8_min_rows=min_rows), cuda=False, fp8=True).model
        quantized = [t for m in fp8.modules() if isinstance(m, Fp8Linear) for t in (m.weight, m.weight_scale)]
        quantized += [t for m in fp8.modules() if isinstance(m, Fp8BlockMlp) for t in (m.fc2_weight, m.fc2_scale)]
        out[name] = sum(t.numel() * t.element_size() for t in [*fp8.parameters(), *quantized])
    return out


def feature_cache_bytes_per_row(config: DiTConfig) -> int:
    """Device memory one image row with a feature cache holds in a 16-bit engine (engine.feature_cache)."""
    from .engine.feature_cache import FeatureCache

    return FeatureCache.bytes_per_row(config.num_tokens, config.hidden_dim, torch.float16)


def forward_flops(config: DiTConfig) -> dict[str, int]:
    """FLOPs of one forward pass for one image, counting matmuls only (one multiply-add = 2 FLOPs).

    Per block: 2N(4d^2 + 2d*ffn) for qkv, output projection and MLP, 4N^2 d for QK^T and AV, and 12 d^2 for the
    adaLN modulation (per image, not per token). Not counted: LayerNorm, softmax, GELU, residual adds, the
    position embedding. ``macs`` (FLOPs / 2) is the unit of the paper's "Gflops" column (DiT-XL/2: 118.6).
    """
    n, d, f, L = config.num_tokens, config.hidden_dim, config.ffn_dim, config.num_layers
    patch = config.patch_size ** 2
    parts = {
        "blocks_linear": L * 2 * n * (4 * d * d + 2 * d * f),
        "blocks_attention": L * 4 * n * n * d,
        "adaln": L * 2 * d * 6 * d + 2 * d * 2 * d,
        "embeddings": 2 * n * patch * config.in_channels * d + 2 * (TIMESTEP_FREQ_DIM * d + d * d),
        "final_linear": 2 * n * d * patch * config.out_channels,
    }
    total = sum(parts.values())
    return {**parts, "total": total, "macs": total // 2}


@dataclass(frozen=True)
class TrainingSetup:
    """The training recipe the memory estimate assumes, the one dit-train runs: bf16 autocast over fp32 weights."""

    batch_size: int = 32  # per device
    gradient_checkpointing: bool = False


def activation_bytes_per_token_layer(config: DiTConfig) -> int:
    """Bytes one block saves for backward per token under bf16 autocast: 32 d + 4 ffn.

    fp32 (LayerNorm runs in fp32 under autocast): the inputs and outputs of norm1 and norm2, 4 x 4d. bf16: qkv
    input 2d, q/k/v 6d (one buffer), attention output 2d (also the proj input: a view), proj output 2d (for its
    gate), fc1 input 2d, fc1 output 2 ffn, GELU output 2 ffn, fc2 output 2d. Flash attention keeps no N x N matrix;
    per-token scalars (LayerNorm statistics, attention log-sum-exp) are left out. tests/test_verify.py checks this
    against the tensors autograd actually saves.
    """
    return 32 * config.hidden_dim + 4 * config.ffn_dim


def training_memory(config: DiTConfig, setup: TrainingSetup) -> dict[str, int]:
    """Estimated peak bytes per GPU for one training step (data parallel: each GPU holds everything).

    Static: fp32 weights 4P, fp32 EMA 4P, AdamW's two fp32 states 8P. The peak is the larger of
    (a) the start of backward: static + bf16 weight copies cached by autocast 2P + saved activations + one block's
    working set, and (b) the optimizer step: static + fp32 grads 4P + one fp32 temporary of AdamW's foreach
    update 4P. With checkpointing a block keeps only its fp32 input (4 d per token) until its backward recomputes it.
    Not modelled: the CUDA context, allocator fragmentation, the input batch and the loss's fp32 temporaries.
    """
    p = count_parameters(DiTModel.on_meta(config))
    tokens = setup.batch_size * config.num_tokens
    layer = activation_bytes_per_token_layer(config) * tokens
    if setup.gradient_checkpointing:
        activations = config.num_layers * 4 * config.hidden_dim * tokens + layer
    else:
        activations = config.num_layers * layer
    static = {"weights": 4 * p, "ema": 4 * p, "adamw_states": 8 * p}
    at_backward = sum(static.values()) + 2 * p + activations + layer
    at_step = sum(static.values()) + 4 * p + 4 * p
    return {**static, "grads": 4 * p, "autocast_weight_copies": 2 * p, "activations": activations,
            "peak": max(at_backward, at_step)}


def size_report(name: str, config: DiTConfig, batch_size: int = 32) -> dict:
    """Everything ``dit-verify`` prints for one model, as plain JSON-able values."""
    params = parameter_breakdown(config)
    report = {
        "name": name,
        "config": config.to_dict(),
        "parameters": params["total"],
        "breakdown": params,
        "weight_bytes": weight_bytes(config),
        "feature_cache_bytes_per_row": feature_cache_bytes_per_row(config),
        "flops_per_image": forward_flops(config),
        "training_memory": {
            "batch_size_per_gpu": batch_size,
            "recipe": "bf16 autocast, fp32 weights and grads, AdamW, fp32 EMA",
            "without_checkpointing": training_memory(config, TrainingSetup(batch_size, False)),
            "with_checkpointing": training_memory(config, TrainingSetup(batch_size, True)),
        },
    }
    if name in MODEL_CARD_CLAIMS:
        report["model_card_claim"] = MODEL_CARD_CLAIMS[name]
    return report
