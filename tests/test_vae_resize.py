"""vae.resize: a VAE whose decoder is grown (more residual blocks per level) encodes and decodes exactly as its
source, learns in its new blocks from the first step, and round-trips through its folder."""

import json
import re
from pathlib import Path

import pytest
import torch

from vae import resize
from vae.model import CausalVAE, VAEConfig
from vae.resize import decoder_levels, grow_decoder, main


def _random_vae(**overrides) -> CausalVAE:
    """The debug preset with every weight random (a fresh VAE's zeroed attention projections would hide a
    misplaced block), and latent statistics so that they are seen to be carried."""
    torch.manual_seed(0)
    cfg = VAEConfig.from_preset("debug", latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0],
                                **overrides)
    model = CausalVAE(cfg)
    for parameter in model.parameters():
        parameter.data.normal_(0.0, 0.1)
    return model.eval()


def _clip() -> torch.Tensor:
    return torch.rand(2, 3, 9, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, T, H, W)


@pytest.mark.parametrize("blocks", [(2, 2, 2, 4), (3, 2, 3, 2), (2, 4, 2, 2)])
@pytest.mark.parametrize("temporal", [(False, True, True), (True, True, False)])
def test_grown_decoder_decodes_exactly_as_its_source(blocks, temporal):
    source = _random_vae(temporal_downsample=temporal)
    grown = grow_decoder(source, blocks, seed=3)
    assert grown.cfg.level_decoder_blocks == blocks and source.cfg.level_decoder_blocks == (2, 2, 2, 2)
    assert [len(level) for level in decoder_levels(grown)] == list(blocks)
    x = _clip()
    with torch.no_grad():
        z = source.encode(x)
        assert torch.equal(grown.encode(x), z)  # the encoder and its statistics are copied
        ours, theirs = grown.decode(z), source.decode(z)
        reference, _ = source(x, sample=False)
        trained, _ = grown(x, sample=False)  # the training pass (whole clip at once) too
    assert theirs.abs().mean() > 0.05  # random weights: not a trivial output
    assert (ours - theirs).abs().max() < 1e-5
    assert (trained - reference).abs().max() < 1e-5


def test_new_blocks_are_appended_to_their_level_and_learn_from_the_first_step():
    source = _random_vae()
    grown = grow_decoder(source, (2, 3, 2, 2))
    theirs, ours = decoder_levels(source), decoder_levels(grown)
    new = ours[1][-1]
    assert ours[0] == theirs[0] and ours[1][:2] == theirs[1]  # the old blocks keep their place, the new one after
    for index_old, index_new in zip(theirs[1] + theirs[2], ours[1][:2] + ours[2], strict=True):
        for (name, a), (_, b) in zip(source.decoder.upsamples[index_old].state_dict().items(),
                                     grown.decoder.upsamples[index_new].state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    block = grown.decoder.upsamples[new]
    assert not block.residual[-1].weight.any() and block.residual[2].weight.abs().sum() > 0

    grown.train()
    recon, _ = grown(_clip(), sample=False)
    recon.square().mean().backward()
    assert block.residual[-1].weight.grad.abs().sum() > 0  # the zeroed conv is reached at once
    assert block.residual[2].weight.grad is not None


def test_growth_is_refused_unless_every_level_keeps_or_gains_blocks():
    source = _random_vae()
    with pytest.raises(ValueError, match="shrink"):
        grow_decoder(source, (1, 3, 3, 3))
    with pytest.raises(ValueError, match="nothing to grow"):
        grow_decoder(source, (2, 2, 2, 2))
    with pytest.raises(ValueError, match="4 entries"):
        grow_decoder(source, (3, 3, 3))
    with pytest.raises(ValueError, match="decoder_blocks"):
        VAEConfig.from_preset("debug", decoder_blocks=(2, 0, 2, 2))


def test_seed_decides_the_new_weights_only():
    source = _random_vae()
    a, b, c = (grow_decoder(source, (2, 2, 3, 2), seed=s) for s in (0, 0, 1))
    new = decoder_levels(a)[2][-1]
    key = f"decoder.upsamples.{new}.residual.2.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_cli_writes_a_folder_that_loads_and_decodes_as_the_source(tmp_path, capsys):
    source = _random_vae()
    source.save_pretrained(tmp_path / "model" / "vae")  # a model folder holding vae/, as weights/demo
    main([str(tmp_path / "model"), "--decoder-blocks", "2", "2", "2", "3", "--out", str(tmp_path / "grown")])
    assert "(2, 2, 2, 2) -> (2, 2, 2, 3)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert saved["decoder_blocks"] == [2, 2, 2, 3] and saved["latents_std"] == [1.5, 0.5, 1.0, 2.0]
    grown = CausalVAE.from_pretrained(tmp_path / "grown")
    x = _clip()
    with torch.no_grad():
        z = source.encode(x)
        assert (grown.decode(z) - source.decode(z)).abs().max() < 1e-5
    with pytest.raises(SystemExit):
        main([str(tmp_path / "model"), "--decoder-blocks", "2", "2", "2", "2", "--out", str(tmp_path / "same")])
    assert "nothing to grow" in capsys.readouterr().err and not (tmp_path / "same").exists()


def test_diffusers_names_follow_each_level_s_own_block_count():
    from vae.convert import diffusers_key

    grown = grow_decoder(_random_vae(), (2, 4, 2, 3))
    names = [diffusers_key(key, grown.cfg) for key in grown.state_dict()]
    assert len(set(names)) == len(names)  # a fixed count per level would give two blocks one name
    levels = decoder_levels(grown)
    assert diffusers_key(f"decoder.upsamples.{levels[1][3]}.residual.2.weight", grown.cfg) == \
        "decoder.up_blocks.1.resnets.3.conv1.weight"
    assert diffusers_key(f"decoder.upsamples.{levels[1][3] + 1}.resample.1.weight", grown.cfg) == \
        "decoder.up_blocks.1.upsamplers.0.resample.1.weight"
    assert diffusers_key(f"decoder.upsamples.{levels[3][2]}.residual.6.bias", grown.cfg) == \
        "decoder.up_blocks.3.resnets.2.conv2.bias"


def test_the_documented_example_grows_the_shipped_demo_vae(tmp_path):
    """The command in the module docstring and --help, run on weights/demo (three decoder levels)."""
    root = Path(__file__).resolve().parents[1]
    example = re.search(r"python -m vae\.resize (\S+) --decoder-blocks ([\d ]+) --out", resize.__doc__)
    blocks = example[2].split()
    main([str(root / example[1]), "--decoder-blocks", *blocks, "--out", str(tmp_path / "grown")])
    grown = CausalVAE.from_pretrained(tmp_path / "grown")
    assert grown.cfg.level_decoder_blocks == tuple(int(b) for b in blocks)
