"""Invariants of the DiT: patching, RoPE, zero-init, timestep forms, text masking, checkpointing, I/O."""

import dataclasses

import pytest
import torch
from einops import rearrange

from dit.layers import apply_rope, patchify, rope_angles, rotate_pairs, unpatchify
from dit.model import PRESETS, DiT, DiTConfig, trim_padding


def make_model(seed: int = 0, **overrides) -> DiT:
    """Debug DiT with every parameter random, so no zero-init hides a wrong path."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig.from_preset("debug", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def make_inputs(cfg: DiTConfig, batch: int = 2, grid=(3, 4, 6), text_len: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *grid, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, text_len, cfg.text_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    return x, t, text, mask


@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 2, 2), (1, 1, 1), (2, 1, 3)])
def test_patchify_unpatchify_is_identity(patch_size):
    x = torch.randn(2, 3, 4, 6, 6)
    grid = tuple(s // p for s, p in zip(x.shape[2:], patch_size, strict=True))
    tokens = patchify(x, patch_size)
    assert torch.equal(unpatchify(tokens, grid, patch_size), x)
    # channel-last inside a patch: the first C values of token 0 are the channels of voxel (0, 0, 0)
    assert torch.equal(tokens[0, 0, :3], x[0, :, 0, 0, 0])


def test_compiled_forward_is_one_graph_and_matches_eager():
    # fullgraph=True fails on any graph break (a logging call, a data-dependent length, complex tensors
    # are what broke it before); the "eager" backend traces without generating code, so this runs in seconds.
    model = make_model()
    x, t, text, mask = make_inputs(model.cfg)
    mask[0, 3:] = False  # padding: eager trims it, the compiled graph keeps it masked
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, text, mask), model(x, t, text, mask), rtol=1e-5, atol=1e-5)


def test_patch_embedding_matches_linear_on_patchified_tokens():
    model = make_model(patch_size=(1, 2, 2))
    x, *_ = make_inputs(model.cfg)
    conv = rearrange(model.patch_embedding(x), "b d t h w -> b (t h w) d")
    weight = rearrange(model.patch_embedding.weight, "d c pt ph pw -> d (pt ph pw c)")
    linear = patchify(x, model.cfg.patch_size) @ weight.T + model.patch_embedding.bias
    torch.testing.assert_close(conv, linear, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotate", [apply_rope, rotate_pairs])  # eager's complex form and compile's real one
def test_rope_scores_depend_only_on_relative_offset(rotate):
    grid, head_dim = (5, 6, 7), 24
    angles = rope_angles(grid, head_dim, 10000.0, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q_vec, k_vec = torch.randn(2, head_dim, generator=g)
    num_tokens = angles.shape[0]
    q = rotate(q_vec.expand(1, num_tokens, 1, head_dim), angles.cos(), angles.sin())[0, :, 0]  # same content everywhere
    k = rotate(k_vec.expand(1, num_tokens, 1, head_dim), angles.cos(), angles.sin())[0, :, 0]
    scores = q @ k.T  # (L, L)

    def index(t, h, w):
        return (t * grid[1] + h) * grid[2] + w

    offsets = [(1, 2, -3), (0, 0, 1), (-2, 1, 0), (3, -4, 2)]
    for dt, dh, dw in offsets:
        pairs = [
            ((t, h, w), (t + dt, h + dh, w + dw))
            for t in range(grid[0])
            for h in range(grid[1])
            for w in range(grid[2])
            if 0 <= t + dt < grid[0] and 0 <= h + dh < grid[1] and 0 <= w + dw < grid[2]
        ]
        values = torch.stack([scores[index(*a), index(*b)] for a, b in pairs])
        torch.testing.assert_close(values, values[:1].expand_as(values), rtol=1e-5, atol=1e-5)
    # ... and the offset matters along each axis (RoPE is not a no-op on any of t, h, w)
    for axis_offset in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert not torch.isclose(scores[0, 0], scores[0, index(*axis_offset)])


def test_fresh_model_blocks_are_identity_and_predict_zero():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("debug"))
    x, t, text, mask = make_inputs(model.cfg)
    tokens = torch.randn(2, 24, model.cfg.dim)
    time_mod = torch.randn(2, 1, 6, model.cfg.dim)  # even a non-zero shared projection: the offset is zero
    angles = rope_angles((2, 3, 4), model.cfg.head_dim, 10000.0, torch.device("cpu"))
    context = torch.randn(2, 5, model.cfg.dim)
    for block in model.blocks:
        out = block(tokens, time_mod.clone().zero_(), context, mask, (angles.cos(), angles.sin()))
        assert torch.equal(out, tokens)
    assert torch.count_nonzero(model(x, t, text, mask)) == 0
    # gradients still reach the zeroed adaLN path
    (model(x, t, text, mask) - torch.randn_like(x)).square().sum().backward()
    assert model.head.head.weight.grad.abs().sum() > 0


def test_timestep_forms_agree():
    model = make_model()
    x, _, text, mask = make_inputs(model.cfg)
    grid = model.validate_latent_shape(*x.shape[2:])
    tokens_per_frame = grid[1] * grid[2]
    t = torch.tensor([137.0, 912.0])
    with torch.no_grad():
        per_sample = model(x, t, text, mask)
        per_frame = model(x, t[:, None].expand(2, x.shape[2]), text, mask)
        per_token = model(x, t[:, None].expand(2, tokens_per_frame * grid[0]), text, mask)
        # distinct per-frame timesteps equal the same timesteps spelled out per token
        frame_t = torch.tensor([[0.0, 400.0, 999.0], [250.0, 0.0, 10.0]])
        distinct_frame = model(x, frame_t, text, mask)
        distinct_token = model(x, frame_t.repeat_interleave(tokens_per_frame, dim=1), text, mask)
    torch.testing.assert_close(per_frame, per_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_token, per_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(distinct_frame, distinct_token, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(distinct_frame, per_sample, atol=1e-3)


def test_pooled_text_reaches_the_modulation_without_cross_attention():
    """With cross-attention silenced, text still changes the output through the pooled path, and only
    there; a fresh pooled path changes nothing (zero-init), so a fresh model still predicts zero."""
    outputs = {}
    for pooled_text in (False, True):
        model = make_model(pooled_text=pooled_text)
        with torch.no_grad():
            for block in model.blocks:
                block.cross_attn.o.weight.zero_()
                block.cross_attn.o.bias.zero_()
            x, t, text, mask = make_inputs(model.cfg)
            outputs[pooled_text] = (model(x, t, text, mask), model(x, t, text.flip(0), mask))
    assert torch.equal(*outputs[False])
    assert not torch.allclose(*outputs[True], atol=1e-3)
    torch.manual_seed(0)
    fresh = DiT(DiTConfig.from_preset("debug", pooled_text=True))
    assert torch.count_nonzero(fresh(*make_inputs(fresh.cfg))) == 0


def test_abs_pos_tells_tokens_where_they_are():
    """On a uniform latent (every patch alike) RoPE alone gives every token the same output, so the model
    cannot place anything; abs_pos breaks that symmetry with the sin-cos of each token's grid index and adds
    no parameter (Wan's weights load either way); a fresh model with it still predicts zero."""
    grid = (3, 4, 6)
    for abs_pos in (False, True):
        model = make_model(abs_pos=abs_pos)
        _, t, text, mask = make_inputs(model.cfg, grid=grid)
        x = torch.randn(2, model.cfg.in_channels, 1, 1, 1).expand(-1, -1, *grid).contiguous()
        with torch.no_grad():
            tokens = model.embed(x, t, text, mask).tokens  # (B, L, D)
            out = model(x, t, text, mask)  # (B, C, T', H', W')
        out = patchify(out, model.cfg.patch_size)  # (B, L, pt*ph*pw*C): one row per token
        if abs_pos:
            assert not torch.allclose(out, out[:, :1].expand_as(out), atol=1e-3)
            plain = model.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, L, D)
            token_grid = model.validate_latent_shape(*grid)  # (T'', H'', W'')
            angles = rope_angles(token_grid, model.cfg.dim, model.cfg.rope_theta, x.device)  # (L, D/2)
            torch.testing.assert_close(tokens - plain, torch.cat([angles.sin(), angles.cos()], 1).expand_as(plain))
        else:
            torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=1e-5, atol=1e-5)
    assert {name for name, _ in make_model(abs_pos=True).named_parameters()} == \
        {name for name, _ in make_model().named_parameters()}
    torch.manual_seed(0)
    fresh = DiT(DiTConfig.from_preset("debug", abs_pos=True))
    assert torch.count_nonzero(fresh(*make_inputs(fresh.cfg))) == 0


def test_bad_timestep_shape_is_a_clear_error():
    model = make_model()
    x, _, text, mask = make_inputs(model.cfg)
    with pytest.raises(ValueError, match="per latent frame"):
        model(x, torch.zeros(2, 7), text, mask)


@pytest.mark.parametrize("pooled_text", [False, True])
def test_padding_text_tokens_do_not_change_the_output(pooled_text):
    model = make_model(pooled_text=pooled_text)
    x, t, text, mask = make_inputs(model.cfg, text_len=5)
    padded_text = torch.cat([text, torch.randn(2, 4, model.cfg.text_dim)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    # sample 1 has only 2 real tokens: its padding must not leak either
    padded_mask[1, 2:] = False
    short = model(x, t, text[:, :2], mask[:, :2])[1]
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, padded_text, padded_mask)[0], model(x, t, text, mask)[0])
        torch.testing.assert_close(model(x, t, padded_text, padded_mask)[1], short.detach())
        empty = model(x, t, padded_text, torch.zeros_like(padded_mask))
    assert torch.isfinite(empty).all()


def test_padding_every_sample_shares_is_dropped_before_the_blocks():
    text = torch.randn(3, 8, 4)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, [0, 4]] = True  # a hole at 1-3 that sample 1 does not use: interior positions stay
    trimmed, trimmed_mask = trim_padding(text, mask)
    assert torch.equal(trimmed, text[:, :5]) and torch.equal(trimmed_mask, mask[:, :5])
    # nothing real at all (every caption dropped to an empty mask): one masked position is kept
    assert trim_padding(text, torch.zeros_like(mask))[0].shape == (3, 1, 4)
    # padding only at the end of every caption: nothing left to mask, so no mask
    mask[:, :3] = True
    assert trim_padding(text, mask)[1] is not None
    mask[:, 3:] = False
    trimmed, trimmed_mask = trim_padding(text, mask)
    assert trimmed.shape == (3, 3, 4) and trimmed_mask is None


def test_frame_local_model_draws_each_frame_on_its_own():
    """frame_local=True: a frame's prediction is the one the model makes on that frame alone (RoPE keeps its
    time position), so changing another frame changes nothing there; without it, every frame sees the rest."""
    model = make_model()
    x, t, text, mask = make_inputs(model.cfg, grid=(3, 4, 6))
    other = x.clone()
    other[:, :, 2] += 1.0
    with torch.no_grad():
        local, local_other = model(x, t, text, mask, frame_local=True), model(other, t, text, mask, frame_local=True)
        full, full_other = model(x, t, text, mask), model(other, t, text, mask)
        alone = model(x[:, :, :1], t, text, mask)
    torch.testing.assert_close(local[:, :, :1], alone)
    torch.testing.assert_close(local_other[:, :, :2], local[:, :, :2])
    assert not torch.allclose(full_other[:, :, :2], full[:, :, :2])
    assert not torch.allclose(local[:, :, :1], full[:, :, :1])


def test_frame_local_forward_survives_checkpointing():
    x, t, text, mask = make_inputs(make_model().cfg)
    outs = [make_model(gradient_checkpointing=on).train()(x, t, text, mask, frame_local=True) for on in (False, True)]
    torch.testing.assert_close(outs[1], outs[0])


def test_checkpointed_blocks_give_the_same_gradients():
    grads = []
    for checkpointing, policy in ((False, "full"), (True, "full"), (True, "attention")):
        model = make_model(gradient_checkpointing=checkpointing, checkpoint_policy=policy).train()
        x, t, text, mask = make_inputs(model.cfg)
        model(x, t, text, mask).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        for checkpointed in grads[1:]:
            torch.testing.assert_close(checkpointed[name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)


def test_save_and_load_roundtrip(tmp_path):
    model = make_model()
    x, t, text, mask = make_inputs(model.cfg)
    model.save_pretrained(tmp_path / "dit")
    loaded = DiT.from_pretrained(tmp_path / "dit")
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, mask), model(x, t, text, mask))
    # a file stored in float16 (as weights/demo ships) still loads as a float32 model by default
    model.half().save_pretrained(tmp_path / "half")
    assert {param.dtype for param in DiT.from_pretrained(tmp_path / "half").parameters()} == {torch.float32}


def test_bf16_keeps_float32_islands_and_stays_close(tmp_path):
    model = make_model()
    x, t, text, mask = make_inputs(model.cfg)
    model.save_pretrained(tmp_path / "dit")
    half = DiT.from_pretrained(tmp_path / "dit", dtype=torch.bfloat16)
    assert half.time_projection[1].weight.dtype == torch.float32
    assert half.blocks[0].modulation.dtype == torch.float32
    assert half.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        ref = model(x, t, text, mask)
        out = half(x.bfloat16(), t, text.bfloat16(), mask).float()
    assert (out - ref).norm() / ref.norm() < 0.05


def test_flops_per_token_matches_counted_flops():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model()
    x, t, text, mask = make_inputs(model.cfg, text_len=5)
    seq_len = 3 * 2 * 3
    # the math kernel spells attention out as matmuls, which the counter sees (it skips fused CPU kernels)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text, mask)
    counted = counter.get_total_flops() / (x.shape[0] * seq_len)
    # the counter skips the element-wise ops and the per-sample time MLP, which the formula also leaves out
    assert abs(model.flops_per_token(seq_len, 5) - counted) / counted < 0.02


def test_latent_shape_error_names_nearest_sizes():
    model = make_model()
    assert model.validate_latent_shape(5, 8, 8) == (5, 4, 4)
    with pytest.raises(ValueError, match="latent height=7.*6 and 8"):
        model.validate_latent_shape(5, 7, 8)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="dim=100: must be divisible by num_heads=12"):
        DiTConfig(dim=100, num_heads=12)
    with pytest.raises(ValueError, match="valid names are"):
        DiTConfig.from_preset("huge")
    wan = DiTConfig.from_preset("wan2.1-1.3b")
    assert (wan.dim, wan.ffn_dim, wan.num_layers, wan.num_heads, wan.freq_dim, wan.text_dim) == (
        1536,
        8960,
        30,
        12,
        256,
        4096,
    )
    for cfg in PRESETS.values():
        DiTConfig(**dataclasses.asdict(cfg))  # every preset passes its own validation


def test_config_is_an_omegaconf_structured_config():
    OmegaConf = pytest.importorskip("omegaconf").OmegaConf

    cfg = OmegaConf.structured(DiTConfig.from_preset("demo"))
    restored = DiTConfig(**OmegaConf.to_container(cfg))
    assert restored == DiTConfig.from_preset("demo")
