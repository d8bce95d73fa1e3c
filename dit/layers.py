"""Tensor helpers of the DiT: patchify, the timestep embedding, 3D RoPE and the float32 adaLN arithmetic.

Pure functions, no parameters: `dit/model.py` composes them into blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Latents (B, C, T', H', W') -> tokens (B, L, pt*ph*pw*C), t-major then h then w."""
    pt, ph, pw = patch_size
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]
) -> torch.Tensor:
    """Tokens (B, L, pt*ph*pw*C) on a (T'', H'', W'') token grid -> latents (B, C, T', H', W')."""
    pt, ph, pw = patch_size
    t, h, w = grid
    return rearrange(
        tokens, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw
    )


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) float32, [cos | sin] halves as in Wan."""
    half = dim // 2
    freqs = max_period ** (-torch.arange(half, dtype=torch.float64, device=t.device) / half)  # (dim/2,)
    angles = t.double()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()  # (N, dim)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head-dim channels given to (t, h, w): h and w get 2*(Dh//6) each, t the rest (Wan's split)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(
    grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device
) -> torch.Tensor:
    """Rotation angles for every token of a (T'', H'', W'') grid -> (L, Dh/2) float32.

    Computed for whatever grid arrives, so there is no position table and no maximum size.
    Each axis rotates its own share d_axis of the head dim with frequencies theta^(-2i/d_axis);
    angles are formed in float64 so large positions stay exact.
    """
    positions = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64, device=device) for n in grid), indexing="ij"
    )
    angles = []
    for pos, axis_dim in zip(positions, rope_split(head_dim), strict=True):
        inv_freq = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        angles.append(pos.reshape(-1, 1) * inv_freq)  # (L, d_axis/2)
    return torch.cat(angles, dim=1).float()  # (L, Dh/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, L, heads, Dh) by angle a: cos, sin (L, Dh/2) of a.

    In float32, cast back, so bf16 activations keep exact relative-position behaviour; cos and sin are
    constants, so autograd keeps no activation for them. Eager PyTorch runs it as one complex product
    (one kernel); under torch.compile it is written in real arithmetic, which inductor fuses into the
    neighbouring kernels but cannot generate for complex tensors (it would fall back to eager there).
    """
    if torch.compiler.is_compiling():
        return rotate_pairs(x, cos, sin)
    pairs = torch.view_as_complex(
        rearrange(x.float(), "b l n (d two) -> b l n d two", two=2)
    )  # (B, L, heads, Dh/2)
    rotated = torch.view_as_real(pairs * torch.complex(cos, sin)[:, None])  # (B, L, heads, Dh/2, 2)
    return rearrange(rotated, "b l n d two -> b l n (d two)").to(x.dtype)  # (B, L, heads, Dh)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in real arithmetic: (a, b) -> (a cos - b sin, a sin + b cos) per channel pair."""
    a, b = rearrange(x.float(), "b l n (d two) -> b l n d two", two=2).unbind(-1)  # (B, L, heads, Dh/2) each
    cos, sin = cos[:, None], sin[:, None]  # (L, 1, Dh/2)
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (B, L, heads, Dh/2, 2)
    return rearrange(rotated, "b l n d two -> b l n (d two)").to(x.dtype)  # (B, L, heads, Dh)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm | None = None, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm in x's dtype with float32 statistics (PyTorch's kernels accumulate in float32 for bf16/fp16).

    Keeping the output in x's dtype halves what autograd stores for bf16 models; the modulation that
    follows is still float32 arithmetic (see `modulate`).
    """
    if norm is None:
        return F.layer_norm(x, x.shape[-1:], eps=eps)
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, D) times (1 + scale) plus shift, shift/scale (B, G, D) float32 for G groups of tokens.

    Float32 shift/scale promote the arithmetic to float32 (one fused addcmul); the result is cast back.
    """
    grouped = rearrange(x, "b (g n) d -> b g n d", g=shift.shape[1])  # (B, G, L/G, D)
    out = torch.addcmul(shift[:, :, None], grouped, 1 + scale[:, :, None])  # (B, G, L/G, D) float32
    return rearrange(out, "b g n d -> b (g n) d").to(x.dtype)  # (B, L, D)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y in float32 (the gate (B, G, D) is float32, as in Wan), result in x's dtype."""
    g = gate.shape[1]
    out = torch.addcmul(
        rearrange(x, "b (g n) d -> b g n d", g=g), rearrange(y, "b (g n) d -> b g n d", g=g), gate[:, :, None]
    )  # (B, G, L/G, D) float32
    return rearrange(out, "b g n d -> b (g n) d").to(x.dtype)  # (B, L, D)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in float32 whatever the parameters' dtype: the timestep path's float32 island."""
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())
