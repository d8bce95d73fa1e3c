"""dit.resize: a DiT resized to a smaller patch computes its source on repeated latents, averaged back."""

import pytest
import torch
from helpers import relative_error

from dit.model import DiT, DiTConfig
from dit.resize import main, pool_latents, repeat_latents, resize_patch, resize_ratio


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
