"""Building blocks of the causal video VAE: causal convolutions with an explicit time cache,
RMS norm, residual blocks, per-frame attention and the spatial/temporal resamplers.

Module and parameter names follow the original Wan 2.1 VAE (``residual.0.gamma``,
``residual.2.weight``, ``resample.1.weight``, ``time_conv`` ...) so that its public weights load
with an identity key map; see ``vae/convert.py`` for the diffusers layout.

Every layer that looks back in time takes ``cache: TimeCache | None``. With ``None`` the layer
sees the whole clip at once and zero-pads at the clip start; with a cache it sees one time chunk
and reads the frames it needs from the previous chunk out of the cache. Both give the same
result, which is what lets the VAE run chunk by chunk in memory that does not grow with length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_ONEDNN_MIN_AREA = 256
"""Frames smaller than this (16x16 px) run faster on PyTorch's default CPU kernel than on oneDNN."""
_NORM_EPS = 1e-12
"""The floor of F.normalize's norm, kept so that all-zero positions stay zero."""


def _use_onednn(x: torch.Tensor) -> bool:
    """Whether to call oneDNN's Conv3d directly on this CPU input.

    PyTorch sends a batch-1 Conv3d with a small C*T*H (our time chunks) to its slow reference
    kernel; oneDNN computes the same convolution 2-19x faster there, with autograd. It has no
    float64 kernel, and below 16x16 pixels its call overhead outweighs the gain.
    """
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.shape[-2] * x.shape[-1] >= _ONEDNN_MIN_AREA
        and torch.backends.mkldnn.is_available()
    )


class TimeCache:
    """The last input frames each causal layer saw, carried from one time chunk to the next.

    One cache belongs to one pass (one encode or one decode of one clip); make a new one per clip.
    Layers are the keys, so no counter has to be kept in step with the call order.
    """

    def __init__(self) -> None:
        self._frames: dict[nn.Module, torch.Tensor] = {}

    def past(self, layer: nn.Module) -> torch.Tensor | None:
        """Frames kept by `layer` at the end of the previous chunk, or None on the first chunk."""
        return self._frames.get(layer)

    def keep(self, layer: nn.Module, frames: torch.Tensor) -> None:
        self._frames[layer] = frames


class CausalConv3d(nn.Conv3d):
    """A Conv3d that is causal in time: output frame t sees input frames t - k + 1 .. t.

    Space is zero-padded symmetrically; time gets the k - 1 frames before the chunk from the
    cache, or zeros at the clip start.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        *,
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        # Wan's convention: `padding` names the symmetric padding, and the causal version puts
        # both halves of the time padding before the clip. Space is padded by F.pad together with
        # time (one copy), which measured faster on CPU than the convolution's own padding.
        self.context = 2 * pad_t
        self.space_pad = (pad_w, pad_w, pad_h, pad_h)

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        missing = self.context
        if self.context > 0 and cache is not None:
            past = cache.past(self)
            if past is not None:
                x = torch.cat([past, x], dim=2)  # (B, C, past + T, H, W)
                missing -= past.shape[2]
            # a copy, so the cache does not keep this whole chunk alive
            cache.keep(self, x[:, :, -self.context :].clone())
        if x.shape[2] == 1 and missing == self.context and self.stride[0] == 1:
            # An image, or a clip's first frame: every earlier tap would multiply zero padding, so
            # the last tap alone, as a 2D convolution, gives the same frame at 1/k of the cost.
            out = F.conv2d(F.pad(x[:, :, 0], self.space_pad), self.weight[:, :, -1], self.bias, self.stride[1:])
            return out.unsqueeze(2)  # (B, C', 1, H, W)
        if missing > 0 or any(self.space_pad):
            x = F.pad(x, (*self.space_pad, missing, 0))  # (B, C, context + T, H + 2p, W + 2p)
        if _use_onednn(x):
            return torch.ops.aten.mkldnn_convolution(
                x, self.weight, self.bias, [0, 0, 0], self.stride, self.dilation, self.groups
            )  # (B, C', T, H, W)
        return super().forward(x)  # (B, C', T, H, W)


class RMSNorm(nn.Module):
    """Normalise each position's channel vector to unit RMS, times a learned per-channel gain.

    `video=True` expects (B, C, T, H, W); otherwise (B, C, H, W). The gain's shape differs
    between the two (as in Wan), which matters for loading its weights.
    """

    def __init__(self, dim: int, *, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The sum of squares over hundreds of channels needs float32. x * rsqrt(sum x^2) equals
        # F.normalize(x), whose norm over a short channel axis is up to 70x slower on CPU.
        squares = x.float().square().sum(dim=1, keepdim=True)  # (B, 1, T, H, W)
        normed = (x.float() * torch.rsqrt(squares.clamp_min(_NORM_EPS**2))).type_as(x)
        return normed * (self.scale * self.gamma)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal 3x3x3 conv, twice, plus a (1x1x1 projected) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        # Indices 0..6 are part of the weight names (residual.2.weight, residual.6.weight).
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        h = self.shortcut(x)  # (B, C', T, H, W)
        return run_layers(self.residual, x, cache) + h  # (B, C', T, H, W)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (so it is causal by construction)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        b, _, _, h, w = x.shape
        frames = rearrange(x, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
        qkv = self.to_qkv(self.norm(frames))  # (B*T, 3C, H, W)
        q, k, v = rearrange(qkv, "n (three c) h w -> three n (h w) c", three=3)  # each (B*T, H*W, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B*T, H*W, C)
        out = self.proj(rearrange(out, "n (h w) c -> n c h w", h=h, w=w))  # (B*T, C, H, W)
        return x + rearrange(out, "(b t) c h w -> b c t h w", b=b)  # (B, C, T, H, W)


class Downsample(nn.Module):
    """Halve H and W (strided 3x3 conv), and with `time=True` also halve time.

    Time: the first frame passes through alone; after it, frames (2j - 2, 2j - 1, 2j) are merged
    into one by a stride-2 conv. So 1 + 2k frames become 1 + k, and frame 0 of a clip is an image.
    """

    def __init__(self, dim: int, *, time: bool) -> None:
        super().__init__()
        # The pad-then-conv pair is a Sequential only so the weight name is `resample.1.weight`.
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if time else None

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        b = x.shape[0]
        x = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*T, C, H/2, W/2)
        x = rearrange(x, "(b t) c h w -> b c t h w", b=b)  # (B, C, T, H/2, W/2)
        if self.time_conv is None:
            return x
        past = cache.past(self) if cache is not None else None
        if cache is not None:
            cache.keep(self, x[:, :, -1:].clone())
        if past is None:  # the clip starts in this chunk: its first frame passes through
            head, context = x[:, :, :1], x
        else:  # the last frame of the previous chunk opens the first window of this one
            head, context = x[:, :, :0], torch.cat([past, x], dim=2)
        if context.shape[2] < 3:
            return head
        return torch.cat([head, self.time_conv(context)], dim=2)  # (B, C, 1 + (T-1)/2, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W (nearest, then 3x3 conv to half the channels), and with `time=True` also time.

    Time: the first frame stays one frame; every later frame becomes two, produced by a causal
    conv with twice the channels over the frames after the first (the first frame is not part of
    its context, as in Wan). So 1 + k frames become 1 + 2k, mirroring `Downsample`.
    """

    def __init__(self, dim: int, *, time: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if time else None

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        b = x.shape[0]
        if self.time_conv is not None:
            started = cache is not None and cache.past(self) is not None
            if cache is not None:  # only the entry's presence is read: the clip's first frame was seen
                cache.keep(self, x[:, :, -1:].clone())
            head, rest = (x[:, :, :0], x) if started else (x[:, :, :1], x[:, :, 1:])
            if rest.shape[2] > 0:
                rest = self.time_conv(rest, cache)  # (B, 2C, T-1, H, W)
                rest = rearrange(rest, "b (two c) t h w -> b c (t two) h w", two=2)  # (B, C, 2(T-1), H, W)
            x = torch.cat([head, rest], dim=2)  # (B, C, 1 + 2(T-1), H, W)
        x = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*T, C/2, 2H, 2W)
        return rearrange(x, "(b t) c h w -> b c t h w", b=b)  # (B, C/2, T, 2H, 2W)


_TAKES_CACHE = (CausalConv3d, ResidualBlock, AttentionBlock, Downsample, Upsample)


def run_layers(layers: nn.Sequential, x: torch.Tensor, cache: TimeCache | None) -> torch.Tensor:
    """Apply a Sequential in order, handing the time cache to the members that look back in time."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, _TAKES_CACHE) else layer(x)
    return x
