"""The diffusion transformer: spacetime patches, 3D RoPE, adaLN timestep conditioning, text cross-attention.

The structure and parameter names follow the Wan 2.1 transformer (original layout), so its public
weights load through `dit/convert.py` with no renaming beyond the diffusers map:

    patch_embedding                     Conv3d, kernel = stride = patch_size
    text_embedding.{0,2}                Linear -> GELU(tanh) -> Linear on the text hidden states
    time_embedding.{0,2}                Linear -> SiLU -> Linear on the sinusoidal timestep
    time_projection.1                   SiLU -> Linear to six modulation vectors, shared by all blocks
    blocks.N.modulation                 per-block learned offset added to those six vectors
    blocks.N.self_attn.{q,k,v,o,norm_q,norm_k}
    blocks.N.norm3                      affine LayerNorm before cross-attention (cross_attn_norm)
    blocks.N.cross_attn.{q,k,v,o,norm_q,norm_k}
    blocks.N.ffn.{0,2}                  Linear -> GELU(tanh) -> Linear
    head.head, head.modulation          adaLN output head

Two optional additions, off for Wan's shapes. `abs_pos` adds a fixed sin-cos embedding of each token's
grid index to the patch embedding (no parameters; see DiTConfig.abs_pos). `pooled_text` adds a masked
mean of the embedded text, through `text_pool.{0,2}` (Linear -> SiLU -> Linear), to the timestep
embedding, so every block's adaLN modulation and the head see the prompt as well as the cross-attention
does. Global attributes (what, which colour, which way) reach every token without first learning to
attend (SD3 and Flux condition the modulation on a pooled text vector for the same reason; the DiT paper
found adaLN conditioning faster to train than cross-attention).

Differences from Wan, all in `init_weights`: the adaLN path starts at zero (time_projection's Linear,
every block's `modulation`, cross-attention's output projection and the head), so a fresh block is the
identity and a fresh model predicts zero; Wan's released weights overwrite all of it.

Timesteps (float in [0, 1000], ARCHITECTURE.md) come per sample (B,), per latent frame (B, T') or per
token (B, L). Internally they become G groups of consecutive tokens (G = 1, frames, or L), and the
modulation is computed once per group, so per-sample timesteps cost no (B, L, 6, D) tensor.
The timestep embedding and the modulation arithmetic run in float32 whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import RmsNorm
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from dit.attention import attention, self_attention
from dit.layers import (
    apply_rope,
    gated_residual,
    layer_norm,
    linear_fp32,
    modulate,
    rope_angles,
    timestep_embedding,
    unpatchify,
)

CHECKPOINT_POLICIES = ("full", "attention")


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
@dataclass
class DiTConfig:
    patch_size: tuple[int, ...] = (1, 2, 2)
    """Spacetime patch (pt, ph, pw) in latent units; tokens are (T'/pt)(H'/ph)(W'/pw)."""
    in_channels: int = 16
    """Latent channels C going in."""
    out_channels: int = 16
    """Channels predicted per latent position (usually = in_channels)."""
    dim: int = 1536
    """Transformer width D."""
    ffn_dim: int = 8960
    """Hidden width of the GELU-tanh MLP."""
    freq_dim: int = 256
    """Size of the sinusoidal timestep embedding fed to the time MLP."""
    text_dim: int = 4096
    """Width Dt of the text encoder's hidden states."""
    num_heads: int = 12
    """Attention heads; dim / num_heads is the head size, split over (t, h, w) by RoPE."""
    num_layers: int = 30
    """Number of transformer blocks."""
    qk_norm: bool = True
    """RMSNorm on queries and keys (over the whole width, as in Wan)."""
    cross_attn_norm: bool = True
    """Affine LayerNorm before cross-attention (Wan: True)."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm and RMSNorm."""
    text_len: int = 512
    """Longest text sequence S the model accepts (the text encoder's max_length)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Wan: 10000)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
    pooled_text: bool = False
    """Add the masked mean of the embedded text (through a small MLP) to the timestep embedding, so the
    adaLN modulation sees the prompt (module docstring). Wan has no such path: False for its weights."""
    abs_pos: bool = False
    """Add a fixed sin-cos embedding of each token's (t, h, w) grid index to the patch embedding (DiT and
    Latte have one; Wan relies on RoPE alone). RoPE tells a token only where others are relative to it;
    this tells it which frame and which part of the frame it is in, which a prompt's "moving left" needs
    at high noise (start on the right, end on the left). No parameters: Wan's weights load either way."""
    self_cond: bool = False
    """Self-conditioning (Chen et al. 2022): the patch embedding also reads the model's previous estimate
    of the clean latents (`x0_prev`, C more input channels; zeros where there is none yet), so a sampler
    step can refine what the step before it committed to instead of guessing again from the noise."""
    checkpoint_policy: str = "full"
    """With gradient_checkpointing: "full" keeps only block inputs (least memory); "attention" also keeps
    the attention kernels' outputs and recomputes the rest (faster when attention dominates: long videos)."""

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size={self.patch_size}: must be three positive ints (pt, ph, pw)")
        for name in (
            "in_channels",
            "out_channels",
            "dim",
            "ffn_dim",
            "freq_dim",
            "text_dim",
            "num_heads",
            "num_layers",
            "text_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim}: must be divisible by num_heads={self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"dim/num_heads={head_dim}: must be even and >= 6 (RoPE splits it over t, h, w)")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim}: must be even (cos and sin halves)")
        if self.checkpoint_policy not in CHECKPOINT_POLICIES:
            raise ValueError(
                f"checkpoint_policy={self.checkpoint_policy!r}: must be one of {CHECKPOINT_POLICIES}"
            )
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps}: must be > 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}: valid names are {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm over the whole width (Wan's `norm_q`, `norm_k`)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RmsNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = RmsNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b l (n d) -> b n l d", n=self.num_heads)  # (B, heads, L, Dh)

    def forward_self(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], frames: int | None = None
    ) -> torch.Tensor:
        """`frames`: attend only within each of that many token frames (see `attention.self_attention`)."""
        q = apply_rope(rearrange(self.norm_q(self.q(x)), "b l (n d) -> b l n d", n=self.num_heads), *rope)
        k = apply_rope(rearrange(self.norm_k(self.k(x)), "b l (n d) -> b l n d", n=self.num_heads), *rope)
        q, k = (rearrange(t, "b l n d -> b n l d") for t in (q, k))  # (B, heads, L, Dh)
        out = self_attention(q, k, self.heads(self.v(x)), frames=frames)  # (B, heads, L, Dh)
        return self.o(rearrange(out, "b n l d -> b l (n d)"))  # (B, L, D)

    def forward_cross(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.heads(self.norm_q(self.q(x)))  # (B, heads, L, Dh)
        k = self.heads(self.norm_k(self.k(context)))  # (B, heads, S, Dh)
        out = attention(q, k, self.heads(self.v(context)), key_mask=context_mask)  # (B, heads, L, Dh)
        return self.o(rearrange(out, "b n l d -> b l (n d)"))  # (B, L, D)


class DiTBlock(nn.Module):
    """adaLN self-attention, plain cross-attention to text, adaLN GELU-tanh MLP (Wan's block)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.cross_attn = Attention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        time_mod: torch.Tensor,  # (B, G, 6, D) float32, shared by all blocks
        context: torch.Tensor,  # (B, S, D)
        context_mask: torch.Tensor | None,  # (B, S) bool, None = no padding
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin (L, Dh/2)
        frames: int | None = None,  # self-attention within each of this many token frames; None = all tokens
    ) -> torch.Tensor:
        assert time_mod.dtype == torch.float32, "modulation must stay float32"
        mod = time_mod + self.modulation.float()[:, None]  # (B, G, 6, D)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(dim=2)  # each (B, G, D)

        h = modulate(layer_norm(x, eps=self.eps), shift_sa, scale_sa)  # (B, L, D)
        x = gated_residual(x, self.self_attn.forward_self(h, rope, frames), gate_sa)  # (B, L, D)

        h = layer_norm(x, self.norm3) if self.norm3 is not None else x
        x = x + self.cross_attn.forward_cross(h, context, context_mask)  # (B, L, D)

        h = modulate(layer_norm(x, eps=self.eps), shift_ff, scale_ff)  # (B, L, D)
        return gated_residual(x, self.ffn(h), gate_ff)  # (B, L, D)


class Head(nn.Module):
    """adaLN output head: LayerNorm, shift/scale from the time embedding, Linear to patch values."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        # x (B, L, D); time_emb (B, G, D) float32 (the time MLP output, before time_projection)
        assert time_emb.dtype == torch.float32, "head modulation must stay float32"
        shift, scale = (time_emb[:, :, None] + self.modulation.float()[:, None]).unbind(dim=2)  # (B, G, D)
        h = modulate(layer_norm(x, eps=self.eps), shift, scale)  # (B, L, D)
        return self.head(h)  # (B, L, pt*ph*pw*C_out)


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------
def trim_padding(text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the trailing text positions that are padding in every sample: (B, S, Dt), (B, S) -> (B, S', Dt) and
    the mask (B, S'), or None when no position left is padding (so attention takes the unmasked kernels).

    Masked keys change nothing, so this is exact; it matters because encoders pad every prompt to
    max_length (512 for Wan's T5) while captions are tens of tokens, and cross-attention's key/value
    projections and products would otherwise be paid for the padding in every block. Under torch.compile
    the text is kept whole (masked): the trimmed length depends on the mask's values, which a compiled
    graph cannot, so it would break the graph and recompile for every new length.
    """
    if torch.compiler.is_compiling():
        return text, text_mask
    used, full = torch.stack([text_mask.any(dim=0), text_mask.all(dim=0)]).cpu()  # (S,) each: one device sync
    positions = used.nonzero()  # (n, 1) positions some sample uses
    length = int(positions.max()) + 1 if positions.numel() else 1  # all padding: keep one (masked) position
    return text[:, :length], None if bool(full[:length].all()) else text_mask[:, :length]


def _save_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: keep the fused attention kernels' outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
_CHECKPOINT_CONTEXTS = {
    "full": noop_context_fn,
    "attention": functools.partial(create_selective_checkpoint_contexts, _save_attention),
}


@dataclass
class DiTState:
    """What `DiT.embed` hands to the blocks and the head; G timestep groups of consecutive tokens (G = 1,
    latent frames or L), so a contiguous slice of tokens goes with a slice of groups (dit/parallel.py)."""

    tokens: torch.Tensor  # (B, L, D)
    time_emb: torch.Tensor  # (B, G, D) float32: the head's modulation input
    time_mod: torch.Tensor  # (B, G, 6, D) float32: the six modulation vectors shared by all blocks
    context: torch.Tensor  # (B, S, D) embedded text
    context_mask: torch.Tensor | None  # (B, S) bool; None = no padding
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin (L, Dh/2)
    grid: tuple[int, int, int]  # token grid (T'', H'', W'')
    frame_local: bool = False  # self-attention only within each token frame (temporal guidance's weak model)


class DiT(nn.Module):
    """`model(x, t, text, text_mask)`: latents (B, C, T', H', W') -> prediction (B, C_out, T', H', W')."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(
            cfg.in_channels * (2 if cfg.self_cond else 1), d, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.text_pool = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d)) if cfg.pooled_text else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.init_weights()

    def init_weights(self) -> None:
        """Every initialisation in one place: Wan's scheme, with the adaLN path zeroed (see module doc)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for layer in (*self.text_embedding, *self.time_embedding):
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        # Zero adaLN: every gate is 0 and the unguarded cross-attention output is 0, so each block is the
        # identity at step 0, and the head predicts 0; gradients still reach all of these parameters.
        nn.init.zeros_(self.time_projection[1].weight)
        nn.init.zeros_(self.time_projection[1].bias)
        if self.text_pool is not None:  # starts as no change to the timestep embedding
            nn.init.zeros_(self.text_pool[2].weight)
            nn.init.zeros_(self.text_pool[2].bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)
            nn.init.zeros_(block.cross_attn.o.weight)
            nn.init.zeros_(block.cross_attn.o.bias)
        nn.init.zeros_(self.head.modulation)
        nn.init.zeros_(self.head.head.weight)
        nn.init.zeros_(self.head.head.bias)

    # -- shapes ------------------------------------------------------------------------------------
    def validate_latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Check a latent grid (T', H', W') against the patch size; return the token grid (T'', H'', W'')."""
        grid = []
        for name, size, patch in zip(
            ("frames", "height", "width"), (frames, height, width), self.cfg.patch_size, strict=True
        ):
            if size < 1 or size % patch:
                lower = max(patch, size // patch * patch)
                raise ValueError(
                    f"latent {name}={size}: must be a positive multiple of the patch size {patch}; "
                    f"nearest valid sizes are {lower} and {lower + patch}"
                )
            grid.append(size // patch)
        return tuple(grid)

    def _timestep_groups(self, t: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """Timesteps (B,), (B, T') or (B, L) -> (B, G): one per group of consecutive tokens."""
        frames = grid[0] * self.cfg.patch_size[0]
        num_tokens = math.prod(grid)
        if t.ndim == 1 and t.shape[0] == batch:
            return t[:, None]  # (B, 1)
        if t.ndim == 2 and t.shape == (batch, frames):
            # A temporal patch takes the timestep of its first latent frame (pt = 1 by default).
            return t[:, :: self.cfg.patch_size[0]]  # (B, T'')
        if t.ndim == 2 and t.shape == (batch, num_tokens):
            return t  # (B, L)
        raise ValueError(
            f"timestep shape {tuple(t.shape)}: must be (B,)=({batch},), per latent frame (B, T')=({batch}, "
            f"{frames}) or per token (B, L)=({batch}, {num_tokens})"
        )

    # -- forward, in three steps ----------------------------------------------------------------------
    # `forward` is embed -> run_blocks -> finish. The steps are public so that dit/parallel.py can shard
    # the state between them (sequence parallelism) without the model knowing about ranks.
    def embed(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
        x0_prev: torch.Tensor | None = None, frame_local: bool = False,
    ) -> DiTState:
        """Latents (B, C, T', H', W'), timesteps, text (B, S, Dt) and mask (B, S) -> everything the blocks read.

        `x0_prev` (B, C, T', H', W'): the previous clean-latent estimate of a self-conditioned model (None
        reads as zeros: no estimate yet). `frame_local`: the blocks' self-attention stays inside each token
        frame (see `forward`)."""
        batch, _, frames, height, width = x.shape
        if self.cfg.self_cond:
            x = torch.cat([x, torch.zeros_like(x) if x0_prev is None else x0_prev.to(x.dtype)], dim=1)  # (B, 2C, ...)
        elif x0_prev is not None:
            raise ValueError("x0_prev: this DiT has no self-conditioning input (its config has self_cond=False)")
        grid = self.validate_latent_shape(frames, height, width)
        if text.shape[1] > self.cfg.text_len:
            raise ValueError(f"text length {text.shape[1]}: must be <= text_len={self.cfg.text_len}")

        text, context_mask = trim_padding(text, text_mask)  # (B, S', Dt), (B, S') or None

        tokens = self.patch_embedding(x)  # (B, D, T'', H'', W'')
        tokens = rearrange(tokens, "b d t h w -> b (t h w) d")  # (B, L, D)
        context = self.text_embedding(text.to(tokens.dtype))  # (B, S, D)
        angles = rope_angles(grid, self.cfg.head_dim, self.cfg.rope_theta, x.device)  # (L, Dh/2)
        if self.cfg.abs_pos:
            # RoPE's axis split and frequencies over the whole width: sin and cos of (t, h, w) per channel pair.
            position = rope_angles(grid, self.cfg.dim, self.cfg.rope_theta, x.device)  # (L, D/2)
            tokens = tokens + torch.cat([position.sin(), position.cos()], dim=1).to(tokens.dtype)  # (B, L, D)

        # Float32 island: timestep embedding, time MLP and the six shared modulation vectors.
        groups = self._timestep_groups(t, batch, grid)  # (B, G)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freq = timestep_embedding(groups.flatten(), self.cfg.freq_dim)  # (B*G, F)
            time_emb = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], freq)))
            time_emb = rearrange(time_emb, "(b g) d -> b g d", b=batch)  # (B, G, D)
            if self.text_pool is not None:
                time_emb = time_emb + self.pool_text(context, context_mask)[:, None]  # (B, G, D)
            time_mod = linear_fp32(self.time_projection[1], F.silu(time_emb))  # (B, G, 6D)
        time_mod = rearrange(time_mod, "b g (six d) -> b g six d", six=6)  # (B, G, 6, D)
        assert time_emb.dtype == time_mod.dtype == torch.float32

        return DiTState(
            tokens=tokens,
            time_emb=time_emb,
            time_mod=time_mod,
            context=context,
            context_mask=context_mask,
            rope=(angles.cos(), angles.sin()),  # (L, Dh/2) each
            grid=grid,
            frame_local=frame_local,
        )

    def pool_text(self, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """Embedded text (B, S, D) and its mask (None = no padding) -> the pooled vector (B, D), float32."""
        context = context.float()
        if context_mask is None:
            pooled = context.mean(dim=1)  # (B, D)
        else:
            weights = context_mask.float()[:, :, None]  # (B, S, 1)
            pooled = (context * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B, D)
        return linear_fp32(self.text_pool[2], F.silu(linear_fp32(self.text_pool[0], pooled)))  # (B, D)

    def run_blocks(self, state: DiTState) -> torch.Tensor:
        """The transformer blocks on `state.tokens` (B, L, D), checkpointed when the config asks -> (B, L, D)."""
        tokens = state.tokens
        frames = state.grid[0] if state.frame_local else None
        args = (state.time_mod, state.context, state.context_mask, state.rope, frames)
        for block in self.blocks:
            if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(
                    block,
                    tokens,
                    *args,
                    use_reentrant=False,
                    context_fn=_CHECKPOINT_CONTEXTS[self.cfg.checkpoint_policy],
                )
            else:
                tokens = block(tokens, *args)  # (B, L, D)
        return tokens

    def head_tokens(self, state: DiTState, tokens: torch.Tensor) -> torch.Tensor:
        """The adaLN head on block outputs (B, L, D) -> patch values (B, L, pt*ph*pw*C_out)."""
        return self.head(tokens, state.time_emb)  # (B, L, pt*ph*pw*C_out)

    def finish(self, state: DiTState, tokens: torch.Tensor) -> torch.Tensor:
        """Block outputs (B, L, D) -> prediction (B, C_out, T', H', W')."""
        out = self.head_tokens(state, tokens)  # (B, L, pt*ph*pw*C_out)
        return unpatchify(out, state.grid, self.cfg.patch_size)  # (B, C_out, T', H', W')

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
        x0_prev: torch.Tensor | None = None, frame_local: bool = False,
    ) -> torch.Tensor:
        """`frame_local`: every self-attention stays inside its token frame, so no frame sees another (the
        weak prediction temporal guidance steers away from, dit/sampling.py)."""
        state = self.embed(x, t, text, text_mask, x0_prev, frame_local)
        return self.finish(state, self.run_blocks(state))  # (B, C_out, T', H', W')

    # -- bookkeeping -------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, text_len: int) -> float:
        """Forward FLOPs per video token (multiply-add = 2) at L = seq_len video and S = text_len text tokens.

        Counts every matmul and both attention products; a training step (forward + backward) is 3x this.
        Text-side work (text MLP, cross-attention k/v projections) is spread over the L video tokens.
        """
        c = self.cfg
        d, patch = c.dim, math.prod(c.patch_size)
        per_layer = (
            2 * 4 * d * d  # self-attention q, k, v, o
            + 2 * 2 * seq_len * d  # self-attention QK^T and PV
            + 2 * 2 * d * d  # cross-attention q, o
            + 2 * 2 * text_len * d  # cross-attention QK^T and PV
            + 2 * 2 * d * d * text_len / seq_len  # cross-attention k, v on the text
            + 2 * 2 * d * c.ffn_dim  # MLP
        )
        embed = 2 * c.in_channels * patch * d + 2 * d * c.out_channels * patch
        text_mlp = 2 * (c.text_dim * d + d * d) * text_len / seq_len
        return c.num_layers * per_layer + embed + text_mlp

    def to_compute_dtype(self, dtype: torch.dtype) -> DiT:
        """Cast to `dtype` but keep the float32 islands (time MLP, time projection, modulation) in float32."""
        self.to(dtype)
        for name, param in self.named_parameters():
            if name.startswith(("time_embedding", "time_projection", "text_pool")) or name.endswith("modulation"):
                param.data = param.data.float()
        return self

    # -- weights on disk ---------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> DiT:
        """Load a `save_pretrained` folder in compute `dtype`, whatever dtype the file stores (weights/demo
        is float16 on disk): float32 by default, as CausalVAE.from_pretrained; bf16/fp16 keep the float32 islands."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = DiTConfig(**json.loads((folder / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(load_file(folder / "model.safetensors"), strict=True, assign=True)
        model.to_compute_dtype(dtype)
        return model.to(device) if device is not None else model


# ----------------------------------------------------------------------------------------------------
# Size presets
# ----------------------------------------------------------------------------------------------------
PRESETS: dict[str, DiTConfig] = {
    # Seconds on a CPU: the tests use it.
    "debug": DiTConfig(
        in_channels=4,
        out_channels=4,
        dim=48,
        ffn_dim=96,
        freq_dim=32,
        text_dim=64,  # the embedded default text encoder's width
        num_heads=2,
        num_layers=2,
        text_len=64,
    ),
    # Trains on 2 CPU cores at 64x64x17 pixels: latents (T', H', W') = (5, 8, 8), 5*4*4 = 80 tokens.
    "demo": DiTConfig(
        in_channels=8,
        out_channels=8,
        dim=192,
        ffn_dim=512,
        freq_dim=64,
        text_dim=64,
        num_heads=4,
        num_layers=4,
        text_len=64,
    ),
    "small": DiTConfig(dim=512, ffn_dim=2048, freq_dim=256, text_dim=4096, num_heads=8, num_layers=12),
    "base": DiTConfig(dim=1024, ffn_dim=4096, freq_dim=256, text_dim=4096, num_heads=16, num_layers=24),
    "wan2.1-1.3b": DiTConfig(
        dim=1536, ffn_dim=8960, freq_dim=256, text_dim=4096, num_heads=12, num_layers=30
    ),
    "wan2.1-14b": DiTConfig(
        dim=5120, ffn_dim=13824, freq_dim=256, text_dim=4096, num_heads=40, num_layers=40
    ),
}
