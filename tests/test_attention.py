"""The attention entry point: reference softmax, key masks, empty text, backend choice, the SP hook."""

import importlib.util

import pytest
import torch

from dit import attention as attn
from dit.model import DiT, DiTConfig


def reference_attention(q, k, v, key_mask=None):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, heads, Lq, Lk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def qkv(batch=2, heads=3, lq=7, lk=5, dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, lq, dh, generator=g),
        torch.randn(batch, heads, lk, dh, generator=g),
        torch.randn(batch, heads, lk, dh, generator=g),
    )


def test_matches_reference_with_and_without_mask():
    q, k, v = qkv()
    mask = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    torch.testing.assert_close(attn.attention(q, k, v), reference_attention(q, k, v))
    torch.testing.assert_close(attn.attention(q, k, v, key_mask=mask), reference_attention(q, k, v, mask))


def test_all_false_mask_row_gives_zero_not_nan():
    q, k, v = qkv()
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    out = attn.attention(q, k, v, key_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[1]) == 0
    torch.testing.assert_close(out[0], reference_attention(q, k, v, mask)[0])


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="must be one of"):
        attn.set_attention_backend("magic")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="flash-attn"):
            attn.set_attention_backend("flash")
    assert attn.get_attention_backend() == "auto"


def test_auto_backend_uses_sdpa_for_cpu_float32():
    q, _, _ = qkv()
    assert attn._resolve_backend(q, masked=False) == "sdpa"
    assert attn._resolve_backend(q.bfloat16(), masked=True) == "sdpa"


def test_identity_sequence_parallel_hook_gives_the_same_output():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("debug")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(1, 4, 2, 4, 4)
    t, text, mask = torch.tensor([300.0]), torch.randn(1, 3, model.cfg.text_dim), torch.ones(1, 3, dtype=torch.bool)
    calls = []

    def identity_hook(q, k, v, attn_fn):
        calls.append(q.shape)
        return attn_fn(q, k, v)

    with torch.no_grad():
        plain, local = model(x, t, text, mask), model(x, t, text, mask, frame_local=True)
        attn.set_sequence_parallel(identity_hook)
        try:
            hooked, hooked_local = model(x, t, text, mask), model(x, t, text, mask, frame_local=True)
        finally:
            attn.set_sequence_parallel(None)
    assert len(calls) == 2 * model.cfg.num_layers  # self-attention only; cross-attention bypasses the hook
    assert torch.equal(hooked, plain)
    assert torch.equal(hooked_local, local)  # the hook gets the frame-local attention to call
    assert not torch.allclose(local, plain)


def test_frame_local_self_attention_attends_within_each_frame():
    """frames=T: the tokens are T equal t-major runs and each run attends only to itself."""
    q, k, v = qkv(lq=12, lk=12)
    local = attn.self_attention(q, k, v, frames=3)
    for frame in range(3):
        run = slice(4 * frame, 4 * frame + 4)
        torch.testing.assert_close(local[:, :, run], reference_attention(q[:, :, run], k[:, :, run], v[:, :, run]))
    torch.testing.assert_close(attn.self_attention(q, k, v, frames=1), reference_attention(q, k, v))
    with pytest.raises(ValueError, match="12 tokens do not split into 5 frames"):
        attn.self_attention(q, k, v, frames=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels_match_the_reference(dtype):
    q, k, v = (t.cuda() for t in qkv(lq=300, lk=300, dh=64))
    mask = torch.rand(2, 300, generator=torch.Generator().manual_seed(0)).cuda() > 0.3
    mask[1] = False
    for key_mask in (None, mask):
        expected = reference_attention(q, k, v, key_mask)
        if key_mask is not None:
            expected[1] = 0
        out = attn.attention(q.to(dtype), k.to(dtype), v.to(dtype), key_mask=key_mask).float()
        assert ((out - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_frame_local_attention_on_cuda_matches_the_reference(backend):
    """The frame-local call through the CUDA kernels (flash, cuDNN or xformers where `auto` picks them)."""
    q, k, v = (t.cuda() for t in qkv(lq=300, lk=300, dh=64))
    attn.set_attention_backend(backend)
    try:
        out = attn.self_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), frames=3).float()
    finally:
        attn.set_attention_backend("auto")
    for frame in range(3):
        run = slice(100 * frame, 100 * frame + 100)
        expected = reference_attention(q[:, :, run], k[:, :, run], v[:, :, run])
        assert ((out[:, :, run] - expected).norm() / expected.norm()) < 1e-2
