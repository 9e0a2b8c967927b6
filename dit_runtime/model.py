"""The Diffusion Transformer of Peebles & Xie (2023), with named presets.

A pure ``nn.Module``: no device, precision, compile or I/O logic lives here. Parameter names follow the
paper authors' code (facebookresearch/DiT ``models.py``) so their checkpoints load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# Frequencies in the sinusoidal timestep embedding before its MLP (the paper's value).
TIMESTEP_FREQ_DIM = 256
# Period of the slowest timestep frequency, as in the Transformer position encoding.
TIMESTEP_MAX_PERIOD = 10_000
# LayerNorm epsilon in every adaLN block and the final layer (the paper's value).
NORM_EPS = 1e-6
# A guidance scale w is embedded as the sinusoid of (w - 1) x this: scales of [1, 10] then span the timesteps'
# frequencies as timesteps of [0, 1000) do, and w = 1 (no guidance) embeds as timestep 0 does.
GUIDANCE_EMBED_SCALE = 100.0


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a DiT. Field names are the ones our users' training code already uses."""

    hidden_dim: int = 1024
    num_layers: int = 10
    num_heads: int = 16
    ffn_dim: int = 4096
    input_size: int = 32  # latent (or pixel) side length; 32 = a 256x256 image through the SD VAE
    patch_size: int = 2
    in_channels: int = 4  # 4 for SD-VAE latents; 1 or 3 for pixel-space models
    num_classes: int = 1000
    learn_sigma: bool = True  # also predict the variance interpolation (output channels = 2 x input)
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance; > 0 adds the null class
    # A few-step student's guidance scale joins the conditioning (GuidanceEmbedder), so a guided image is one row.
    guidance_embed: bool = False
    # A student trained for several step counts takes its count as an input too (StepsEmbedder).
    steps_embed: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("hidden_dim", "num_layers", "num_heads", "ffn_dim", "input_size", "patch_size",
                     "in_channels", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.hidden_dim % self.num_heads:
                problems.append(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")
            if self.input_size % self.patch_size:
                problems.append(f"input_size ({self.input_size}) must be divisible by patch_size ({self.patch_size})")
            if self.hidden_dim % 4:
                problems.append(f"hidden_dim ({self.hidden_dim}) must be divisible by 4 for the 2D position embedding")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            problems.append(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")
        if problems:
            raise ValueError("invalid DiT config: " + "; ".join(problems))

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def null_class(self) -> int:
        """Label of the unconditional ("null") class used for classifier-free guidance."""
        return self.num_classes

    @property
    def supports_guidance(self) -> bool:
        return self.class_dropout_prob > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DiT config keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)


def _paper(hidden_dim: int, num_layers: int, num_heads: int, patch_size: int) -> DiTConfig:
    return DiTConfig(hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=4 * hidden_dim,
                     patch_size=patch_size)


def _digits(hidden_dim: int, num_layers: int, num_heads: int) -> DiTConfig:
    # 16x16 grey digits (scikit-learn's 8x8 scans upsampled), patch 2: 64 tokens. Small enough to train on a CPU.
    return DiTConfig(hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=4 * hidden_dim,
                     input_size=16, patch_size=2, in_channels=1, num_classes=10, learn_sigma=False)


PRESETS: dict[str, DiTConfig] = {
    # The model card's sizes: 1024 wide, 16 heads, FFN 4096.
    "dit-10l": DiTConfig(hidden_dim=1024, num_layers=10, num_heads=16, ffn_dim=4096),  # recommended
    "dit-8l": DiTConfig(hidden_dim=1024, num_layers=8, num_heads=16, ffn_dim=4096),  # lighter
    "dit-6l": DiTConfig(hidden_dim=1024, num_layers=6, num_heads=16, ffn_dim=4096),  # quick experiments
    # A model card's 30-layer size: narrower and deeper, the largest of the four (docs/model-sizes.md).
    "dit-legacy-30l": DiTConfig(hidden_dim=640, num_layers=30, num_heads=10, ffn_dim=2560),
    # The paper's sizes (Table 1), 256x256 images as 32x32x4 latents.
    "DiT-XL/2": _paper(1152, 28, 16, 2),
    "DiT-XL/4": _paper(1152, 28, 16, 4),
    "DiT-XL/8": _paper(1152, 28, 16, 8),
    "DiT-L/2": _paper(1024, 24, 16, 2),
    "DiT-L/4": _paper(1024, 24, 16, 4),
    "DiT-B/2": _paper(768, 12, 12, 2),
    "DiT-B/4": _paper(768, 12, 12, 4),
    "DiT-S/2": _paper(384, 12, 6, 2),
    "DiT-S/4": _paper(384, 12, 6, 4),
    "DiT-S/8": _paper(384, 12, 6, 8),
    # Pixel-space digit models that train on a CPU; the shipped checkpoints use these.
    "dit-digits-s": _digits(hidden_dim=96, num_layers=4, num_heads=4),
    "dit-digits-m": _digits(hidden_dim=128, num_layers=6, num_heads=4),
    # For tests: the smallest model that still exercises every part (learned sigma, guidance, 4 channels).
    "dit-tiny": DiTConfig(hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64, input_size=8, patch_size=2,
                          in_channels=4, num_classes=10),
}


def get_preset(name: str) -> DiTConfig:
    """The config of a named preset, with an error that lists the names when it is unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: per-sample affine transform of normalised tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM,
                       max_period: int = TIMESTEP_MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of (possibly fractional) timesteps t: (N,) -> (N, dim), in fp32.

    Frequencies are the paper's, ``max_period ** (-i / half)``; diffusers' DiT uses ``-i / (half - 1)``
    (``downscale_freq_shift=1``), the only place its function differs from the paper's.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (grid_size**2, embed_dim), in the paper's (w, h) order, in fp64."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # the paper builds the grid w first

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10_000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0))
        out = pos.reshape(-1)[:, None] * omega[None]  # (T, D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (T, D/2)

    return torch.cat([one_axis(grid_w), one_axis(grid_h)], dim=1)  # (T, D)


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) -> tokens (N, T, D) through a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, H/p, W/p) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies through a two-layer MLP."""

    def __init__(self, hidden_dim: int, freq_dim: int = TIMESTEP_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.freq_dim)  # (N, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; one extra row is the null class, used for label dropout and guidance."""

    def __init__(self, num_classes: int, hidden_dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)  # (N, D)


class GuidanceEmbedder(nn.Module):
    """A student's guidance scale -> a vector added to the conditioning; the last layer starts at zero, so a student
    initialised from its teacher computes the teacher's function until training moves it."""

    def __init__(self, hidden_dim: int, freq_dim: int = TIMESTEP_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w_freq = timestep_embedding((w.float() - 1.0) * GUIDANCE_EMBED_SCALE, self.freq_dim)  # (N, F)
        return self.mlp(w_freq.to(self.mlp[0].weight.dtype))  # (N, D)

    @torch.no_grad()
    def reset(self) -> None:
        """The timestep MLP's initialisation, with a zero last layer: adds nothing until trained."""
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)


class StepsEmbedder(GuidanceEmbedder):
    """A student's step count -> a vector added to the conditioning, as the guidance scale is (a count of n embeds
    as a scale of n would: 1 step as no guidance, 8 steps across the timesteps' frequencies)."""


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, through scaled_dot_product_attention."""

    def __init__(self, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(x)  # (N, T, D)


class Mlp(nn.Module):
    """Two-layer feed-forward network with tanh-approximate GELU."""

    def __init__(self, hidden_dim: int, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (N, T, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: shift, scale and gate for attention and MLP."""

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(hidden_dim, num_heads)
        self.norm2 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(hidden_dim, ffn_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 6 * hidden_dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D) tokens, c: (N, D) conditioning."""
        return self.modulated(x, self.adaLN_modulation(c))

    def modulated(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """The block given its adaLN output (N, 6D): shift, scale and gate for attention, then for the MLP."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patches."""

    def __init__(self, hidden_dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(hidden_dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, self.adaLN_modulation(c))

    def modulated(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """The layer given its adaLN output (N, 2D): shift and scale."""
        shift, scale = modulation.chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class DiTModel(nn.Module):
    """Class-conditional Diffusion Transformer: ``forward(x, t, y)`` predicts noise (and variance)."""

    def __init__(self, hidden_dim: int = 1024, num_layers: int = 10, num_heads: int = 16, ffn_dim: int = 4096,
                 input_size: int = 32, patch_size: int = 2, in_channels: int = 4, num_classes: int = 1000,
                 learn_sigma: bool = True, class_dropout_prob: float = 0.1, guidance_embed: bool = False,
                 steps_embed: bool = False):
        super().__init__()
        self.config = DiTConfig(hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim,
                                input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                                num_classes=num_classes, learn_sigma=learn_sigma,
                                class_dropout_prob=class_dropout_prob, guidance_embed=guidance_embed,
                                steps_embed=steps_embed)
        cfg = self.config
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_dim)
        self.t_embedder = TimestepEmbedder(hidden_dim)
        self.y_embedder = LabelEmbedder(num_classes, hidden_dim, class_dropout_prob)
        self.g_embedder = GuidanceEmbedder(hidden_dim) if guidance_embed else None
        self.s_embedder = StepsEmbedder(hidden_dim) if steps_embed else None
        # Fixed, not learned; a persistent buffer so checkpoints carry it as the paper's do.
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_tokens, hidden_dim))
        self.blocks = nn.ModuleList(DiTBlock(hidden_dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.final_layer = FinalLayer(hidden_dim, patch_size, cfg.out_channels)
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.initialize_weights()

    @classmethod
    def from_config(cls, config: DiTConfig) -> "DiTModel":
        return cls(**config.to_dict())

    @classmethod
    def from_preset(cls, name: str) -> "DiTModel":
        return cls.from_config(get_preset(name))

    @classmethod
    def on_meta(cls, config: DiTConfig) -> "DiTModel":
        """The model with shapes but no storage (built on the meta device), its fixed ``pos_embed`` computed: to count
        parameters at no memory cost, to check a state dict against, or to assign loaded weights into."""
        with torch.device("meta"):
            model = cls.from_config(config)
        model.reset_pos_embed()
        return model

    def initialize_weights(self) -> None:
        """The paper's initialisation: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layers."""
        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier)
        self.reset_pos_embed()
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.init_student_embedders()

    def init_student_embedders(self) -> None:
        """The guidance and step-count embeddings a student adds to its teacher, each adding nothing yet."""
        for embedder in (self.g_embedder, self.s_embedder):
            if embedder is not None:
                embedder.reset()

    @torch.no_grad()
    def reset_pos_embed(self) -> None:
        """(Re)compute the fixed position embedding, e.g. after building on the meta device."""
        grid = self.config.input_size // self.config.patch_size
        pos = sincos_pos_embed_2d(self.config.hidden_dim, grid).to(torch.float32).unsqueeze(0)
        if self.pos_embed.is_meta:
            self.pos_embed = pos
        else:
            self.pos_embed.copy_(pos)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (N, T, p*p*C) -> image (N, C, H, W)."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = self.config.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def condition(self, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None,
                  steps: torch.Tensor | None = None) -> torch.Tensor:
        """Conditioning vector c = embed(t) + embed(y) (+ embed(w), a student's guidance scale; + embed(steps), its
        step count), computed once per forward and shared by all blocks. A model without those embeddings ignores
        ``w`` and ``steps``."""
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for embedder, value, name in ((self.g_embedder, w, "w, its guidance scale"),
                                      (self.s_embedder, steps, "steps, its step count")):
            if embedder is not None:
                if value is None:
                    raise ValueError(f"this model is a student that takes {name} as an input: pass one per sample")
                c = c + embedder(value)
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                w: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) noisy input; t: (N,) per-sample timesteps; y: (N,) labels; w: (N,) guidance scales and
        steps: (N,) step counts (a student's; ignored without their embeddings) -> (N, C_out, H, W)."""
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, T, D)
        c = self.condition(t, y, w, steps).to(x.dtype)  # (N, D)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         guidance_scale: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance in one batched pass over the conditional and null halves.

        x: (N, C, H, W), t: (N,), y: (N,), guidance_scale: (N,) per sample. Returns (N, C_out, H, W): the guided
        noise ``eps_null + s * (eps_cond - eps_null)`` on every input channel, and the conditional variance output.
        """
        n = x.shape[0]
        null = torch.full_like(y, self.config.null_class)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, C_out, H, W)
        return apply_guidance(out[:n], out[n:], guidance_scale, self.config.in_channels)


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: torch.Tensor,
                   eps_channels: int) -> torch.Tensor:
    """Guided output from conditional and null outputs (N, C_out, H, W); variance channels stay conditional."""
    s = guidance_scale.to(cond.dtype).view(-1, 1, 1, 1)
    eps = uncond[:, :eps_channels] + s * (cond[:, :eps_channels] - uncond[:, :eps_channels])
    return torch.cat([eps, cond[:, eps_channels:]], dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
