"""dit.resize: a DiT resized to a smaller patch computes its source on repeated latents, averaged back; a grown
DiT (more blocks, wider MLPs) and a DiT given the self-conditioning input compute exactly their source."""

import pytest
import torch
from helpers import relative_error

from dit.conditioning import model_timesteps
from dit.model import DiT, DiTConfig
from dit.resize import add_self_cond, grow, main, pool_latents, repeat_latents, resize_patch, resize_ratio


def _random_dit(patch_size, **overrides) -> DiT:
    """The debug preset with every weight random: the zero-initialised head and modulations of a fresh DiT
    would make the parity below hold trivially."""
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_preset("debug", patch_size=patch_size, **overrides))
    for parameter in model.parameters():
        parameter.data.normal_(0.0, 0.05)
    return model.eval()


def _inputs(model: DiT, frames: int, height: int, width: int):
    cfg = model.cfg
    torch.manual_seed(1)
    x = torch.randn(2, cfg.in_channels, frames, height, width)
    text = torch.randn(2, 5, cfg.text_dim)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return x, torch.tensor([250.0, 800.0]), text, mask


@pytest.mark.parametrize(
    ("old", "new", "abs_pos", "latent"),
    [
        ((1, 4, 4), (1, 2, 2), True, (3, 8, 8)),  # the demo's resize: 4x the tokens
        ((1, 4, 4), (1, 1, 2), False, (2, 4, 8)),  # unequal ratios per axis
        ((2, 2, 2), (1, 2, 1), True, (2, 4, 6)),  # a temporal patch split too
    ],
)
def test_resized_model_is_its_source_on_repeated_latents(old, new, abs_pos, latent):
    source = _random_dit(old, abs_pos=abs_pos)
    resized = resize_patch(source, new)
    ratio = resize_ratio(old, new)
    x, t, text, mask = _inputs(resized, *latent)
    with torch.no_grad():
        ours = resized(x, t, text, mask)  # (B, C_out, T', H', W')
        reference = pool_latents(source(repeat_latents(x, ratio), t, text, mask), ratio)
    assert ours.shape == (2, resized.cfg.out_channels, *latent)
    assert relative_error(ours, reference) < 1e-5
    assert resized.cfg.patch_size == new and ours.abs().mean() > 0.05  # random weights: no trivial zero output


def test_only_the_patch_layers_change():
    source = _random_dit((1, 4, 4))
    resized = resize_patch(source, (1, 2, 2))
    ours, theirs = resized.state_dict(), source.state_dict()
    assert ours.keys() == theirs.keys()
    changed = {key for key in ours if ours[key].shape != theirs[key].shape or not torch.equal(ours[key], theirs[key])}
    assert changed == {"patch_embedding.weight", "head.head.weight", "head.head.bias"}
    assert ours["patch_embedding.weight"].shape == (*theirs["patch_embedding.weight"].shape[:2], 1, 2, 2)
    # The embedding of a constant latent is unchanged: the kernel's total per channel is kept.
    torch.testing.assert_close(ours["patch_embedding.weight"].sum((2, 3, 4)), theirs["patch_embedding.weight"].sum((2, 3, 4)))
    assert source.cfg.patch_size == (1, 4, 4)  # the source is left as it was


def test_repeat_and_pool_are_inverse():
    x = torch.randn(2, 3, 2, 4, 5)
    torch.testing.assert_close(pool_latents(repeat_latents(x, (2, 3, 1)), (2, 3, 1)), x)
    assert repeat_latents(x, (2, 3, 1))[:, :, 1, 5, 4].equal(x[:, :, 0, 1, 4])


@pytest.mark.parametrize("new", [(1, 3, 3), (1, 8, 8), (1, 2), (0, 2, 2)])
def test_bad_patch_sizes_are_refused(new):
    with pytest.raises(ValueError, match="patch_size"):
        resize_patch(_random_dit((1, 4, 4)), new)


def test_cli_writes_a_loadable_resized_folder(tmp_path, capsys):
    source = _random_dit((1, 4, 4))
    source.save_pretrained(tmp_path / "export" / "dit")  # an export folder holding dit/, as train.py writes
    main([str(tmp_path / "export"), "--patch-size", "1", "2", "2", "--out", str(tmp_path / "resized")])
    assert "(1, 4, 4) -> (1, 2, 2)" in capsys.readouterr().out
    loaded = DiT.from_pretrained(tmp_path / "resized")
    expected = resize_patch(source, (1, 2, 2)).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    with pytest.raises(SystemExit):
        main([str(tmp_path / "export"), "--patch-size", "1", "3", "3", "--out", str(tmp_path / "bad")])
    assert "must divide" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("layers", "ffn", "abs_pos"), [(4, None, True), (None, 128, False), (5, 160, True), (2, None, True)]
)
def test_grown_model_computes_its_source(layers, ffn, abs_pos):
    source = _random_dit((1, 2, 2), abs_pos=abs_pos)  # debug preset: 2 blocks, MLP 96
    grown = grow(source, num_layers=layers, ffn_dim=ffn)
    assert grown.cfg.num_layers == (layers or 2) and grown.cfg.ffn_dim == (ffn or 96)
    x, t, text, mask = _inputs(grown, 3, 4, 6)
    cond_mask = torch.zeros(2, 3, 4, 6, dtype=torch.bool)
    cond_mask[0, 0] = True  # per-token timesteps too, as image-to-video samples them
    with torch.no_grad():
        for timesteps in (t, model_timesteps(t, cond_mask, grown.cfg.patch_size)):
            ours, reference = grown(x, timesteps, text, mask), source(x, timesteps, text, mask)
            assert relative_error(ours, reference) < 1e-6 and reference.abs().mean() > 0.05


def test_grown_blocks_learn_from_the_first_step():
    """Zeroed output projections pass nothing forward, but their gradients are not zero: a new block that
    could not learn would be dead weight."""
    grown = grow(_random_dit((1, 2, 2)), num_layers=4, ffn_dim=128).train()
    x, t, text, mask = _inputs(grown, 2, 4, 4)
    grown(x, t, text, mask).square().mean().backward()
    for index in (1, 2):  # the new blocks (the source's two go first and last)
        for layer in ("self_attn.o", "cross_attn.o", "ffn.2"):
            block_layer = grown.get_submodule(f"blocks.{index}.{layer}")
            assert not block_layer.weight.any() and block_layer.weight.grad.abs().sum() > 0
    new_units = grown.blocks[0].ffn[2]  # an old block's MLP: columns 96-127 are its new units
    assert not new_units.weight[:, 96:].any() and new_units.weight.grad[:, 96:].abs().sum() > 0


def test_grow_keeps_old_blocks_in_order_and_refuses_to_shrink():
    source = _random_dit((1, 2, 2), num_layers=3)
    grown = grow(source, num_layers=7, seed=5)
    for old, new in ((0, 0), (1, 3), (2, 6)):
        assert torch.equal(grown.blocks[new].self_attn.q.weight, source.blocks[old].self_attn.q.weight)
    again, other = grow(source, num_layers=7, seed=5), grow(source, num_layers=7, seed=6)
    assert torch.equal(again.blocks[1].self_attn.q.weight, grown.blocks[1].self_attn.q.weight)
    assert not torch.equal(other.blocks[1].self_attn.q.weight, grown.blocks[1].self_attn.q.weight)
    for bad in ({"num_layers": 2}, {"ffn_dim": 8}):
        with pytest.raises(ValueError, match="cannot shrink"):
            grow(source, **bad)


def test_cli_grows_and_resizes_in_one_call(tmp_path, capsys):
    source = _random_dit((1, 4, 4))
    source.save_pretrained(tmp_path / "dit")
    main([str(tmp_path / "dit"), "--patch-size", "1", "2", "2", "--num-layers", "3", "--ffn-dim", "128",
          "--out", str(tmp_path / "grown")])
    assert "blocks 2 -> 3, MLP 96 -> 128" in capsys.readouterr().out
    loaded = DiT.from_pretrained(tmp_path / "grown")
    expected = grow(resize_patch(source, (1, 2, 2)), num_layers=3, ffn_dim=128).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    with pytest.raises(SystemExit):
        main([str(tmp_path / "dit"), "--out", str(tmp_path / "nothing")])
    assert "nothing to change" in capsys.readouterr().err and not (tmp_path / "nothing").exists()


def test_self_conditioned_model_computes_its_source_whatever_the_estimate_and_learns_to_read_it():
    source = _random_dit((1, 2, 2))
    conditioned = add_self_cond(source)
    assert conditioned.cfg.self_cond and conditioned.patch_embedding.weight.shape[1] == 2 * source.cfg.in_channels
    x, t, text, mask = _inputs(source, 2, 4, 4)
    estimate = torch.randn_like(x)
    with torch.no_grad():
        reference = source(x, t, text, mask)
        assert torch.equal(conditioned(x, t, text, mask, estimate), reference)
        assert torch.equal(conditioned(x, t, text, mask), reference)  # no estimate reads as zeros
    conditioned.train()
    conditioned(x, t, text, mask, estimate).square().mean().backward()
    assert conditioned.patch_embedding.weight.grad[:, source.cfg.in_channels:].abs().sum() > 0
    with pytest.raises(ValueError, match="self_cond=False"):
        source(x, t, text, mask, estimate)  # a model without the input refuses an estimate it would ignore
    with pytest.raises(ValueError, match="self-conditioned already"):
        add_self_cond(conditioned)


def test_cli_adds_self_conditioning_to_a_resized_model(tmp_path, capsys):
    source = _random_dit((1, 4, 4))
    source.save_pretrained(tmp_path / "dit")
    main([str(tmp_path / "dit"), "--patch-size", "1", "2", "2", "--self-cond", "--out", str(tmp_path / "sc")])
    assert "self-conditioned False -> True" in capsys.readouterr().out
    loaded = DiT.from_pretrained(tmp_path / "sc")
    expected = add_self_cond(resize_patch(source, (1, 2, 2))).state_dict()
    assert loaded.cfg.self_cond and all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
