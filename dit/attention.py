"""The one attention function every attention in the DiT goes through.

Layout: q, k, v and the output are (B, heads, L, Dh), the layout PyTorch's
`scaled_dot_product_attention` takes natively, so the default path has no transposes.
Backends that want (B, L, heads, Dh) (xformers, flash-attention) transpose on the way in and out.

Backends:
  - "sdpa"     PyTorch SDPA: always available; on CUDA we rank its kernels cuDNN, flash, memory-efficient,
               math (first that takes the call wins). The default and the fallback.
  - "flash"    the `flash_attn` package (extra: `pip install flash-attn`), CUDA + fp16/bf16 only.
  - "xformers" `xformers.ops.memory_efficient_attention` (extra: `pip install -e ".[xformers]"`),
               CUDA + fp16/bf16 only.
  - "auto"     SDPA on Hopper and newer (its cuDNN kernel is the fastest there); on older GPUs flash if
               installed and the call qualifies, else xformers likewise, else SDPA.

Masked calls (cross-attention to padded text) always go through SDPA: the text is short, so the mask
costs little there, and it keeps one tested masking path. The expensive unmasked self-attention over
video tokens is where the optional kernels help.

Sequence parallelism hooks in at `self_attention`: `set_sequence_parallel(hook)` makes every
self-attention call `hook(q, k, v, attention)` instead of `attention(q, k, v)`; the hook (Ulysses
all-to-all, in dit/parallel.py) reshuffles heads and sequence around the real call.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash", "xformers")
_HALF_DTYPES = (torch.float16, torch.bfloat16)

AttentionFn = Callable[..., torch.Tensor]
SequenceParallelHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionFn], torch.Tensor]

# Process-wide switches, set explicitly by the entry scripts or the training helper.
_backend: str = "auto"
_sequence_parallel_hook: SequenceParallelHook | None = None


def set_attention_backend(name: str) -> None:
    """Choose the attention kernel: "auto" (default), "sdpa", "flash" or "xformers"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend={name!r}: must be one of {BACKENDS}")
    if name in ("flash", "xformers"):
        _require_package(name)
    _backend = name


def get_attention_backend() -> str:
    return _backend


def set_sequence_parallel(hook: SequenceParallelHook | None) -> None:
    """Route self-attention through `hook(q, k, v, attention)`; None restores the plain call."""
    global _sequence_parallel_hook
    _sequence_parallel_hook = hook


def _require_package(name: str) -> None:
    module, extra = {
        "flash": ("flash_attn", "pip install flash-attn"),
        "xformers": ("xformers", 'pip install -e ".[xformers]"'),
    }[name]
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"attention backend {name!r} needs the package {module!r}: {extra}")


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.cache
def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def _log_choice(backend: str, device_type: str, dtype: torch.dtype) -> None:
    # Cached so each distinct choice is logged once, not once per layer and step.
    logger.info("attention backend: %s (device=%s, dtype=%s)", backend, device_type, dtype)


def _resolve_backend(q: torch.Tensor, masked: bool) -> str:
    fast_kernel_ok = q.is_cuda and q.dtype in _HALF_DTYPES and not masked
    if _backend == "auto":
        # From Hopper on, SDPA's cuDNN kernel beats flash-attn 2 and xformers (see _sdpa): keep SDPA.
        if fast_kernel_ok and _compute_capability(q.device) >= (9, 0):
            return "sdpa"
        if fast_kernel_ok and _installed("flash_attn"):
            return "flash"
        if fast_kernel_ok and _installed("xformers"):
            return "xformers"
        return "sdpa"
    if _backend in ("flash", "xformers") and not masked and not fast_kernel_ok:
        raise ValueError(
            f"attention backend={_backend!r} needs a CUDA tensor in fp16/bf16, got device={q.device.type} "
            f"dtype={q.dtype}; use set_attention_backend('auto') or 'sdpa'"
        )
    return "sdpa" if masked else _backend


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(Dh).

    q: (B, heads, Lq, Dh); k, v: (B, heads, Lk, Dh); key_mask: (B, Lk) bool, True = attend.
    A row of the key mask that is all False (no text at all) gives a zero output for that sample
    rather than NaN: there is nothing to attend to, so the attention adds nothing.
    Returns (B, heads, Lq, Dh).
    """
    backend = _resolve_backend(q, masked=key_mask is not None)
    if not torch.compiler.is_compiling():  # a logging call would break a compiled graph in every layer
        _log_choice(backend, q.device.type, q.dtype)
    if backend == "flash":
        from flash_attn import flash_attn_func

        q, k, v = (rearrange(t, "b h l d -> b l h d") for t in (q, k, v))  # (B, L, heads, Dh)
        out = flash_attn_func(q, k, v)  # (B, Lq, heads, Dh)
        return rearrange(out, "b l h d -> b h l d")  # (B, heads, Lq, Dh)
    if backend == "xformers":
        from xformers.ops import memory_efficient_attention

        q, k, v = (rearrange(t, "b h l d -> b l h d") for t in (q, k, v))  # (B, L, heads, Dh)
        out = memory_efficient_attention(q, k, v)  # (B, Lq, heads, Dh)
        return rearrange(out, "b l h d -> b h l d")  # (B, heads, Lq, Dh)
    if key_mask is None:
        return _sdpa(q, k, v)  # (B, heads, Lq, Dh)

    has_keys = key_mask.any(dim=1)  # (B,)
    # An all-False row would make softmax divide by zero; let it attend everywhere, then zero it.
    safe_mask = key_mask | ~has_keys[:, None]  # (B, Lk)
    out = _sdpa(q, k, v, attn_mask=safe_mask[:, None, None, :])  # (B, heads, Lq, Dh)
    return out * has_keys[:, None, None, None].to(out.dtype)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    from torch.nn.attention import sdpa_kernel

    # cuDNN's fused attention ran fwd+bwd at 561 TFLOP/s on an H100 (bf16, L=32760, Dh=128) against
    # 328 for SDPA's default flash kernel, so it goes first; SDPA skips any kernel that cannot take the
    # call (head size, mask, dtype, GPU generation) and falls through the list.
    with sdpa_kernel(_cuda_kernel_priority(), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


@functools.cache
def _cuda_kernel_priority() -> list:
    from torch.nn.attention import SDPBackend

    return [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, frames: int | None = None) -> torch.Tensor:
    """Unmasked self-attention over video tokens, (B, heads, L, Dh) -> (B, heads, L, Dh).

    `frames`: the tokens are that many frames of L/frames (t-major, as patchify orders them) and each
    token attends only within its own frame (the weak model of temporal guidance, dit/sampling.py).
    The sequence-parallel hook, when set, wraps the call here (and only here: cross-attention
    sees the whole, short text on every rank); it gathers the whole sequence before it attends, so the
    frames are whole there too.
    """
    attend = attention if frames is None else functools.partial(_within_frames, frames=frames)
    if _sequence_parallel_hook is not None:
        return _sequence_parallel_hook(q, k, v, attend)
    return attend(q, k, v)


def _within_frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, frames: int) -> torch.Tensor:
    """Attention inside each of `frames` equal runs of tokens: the frames become batch entries."""
    if q.shape[2] % frames:
        raise ValueError(f"{q.shape[2]} tokens do not split into {frames} frames")
    q, k, v = (rearrange(t, "b h (t n) d -> (b t) h n d", t=frames) for t in (q, k, v))  # (B*T, heads, L/T, Dh)
    return rearrange(attention(q, k, v), "(b t) h n d -> b h (t n) d", t=frames)  # (B, heads, L, Dh)
