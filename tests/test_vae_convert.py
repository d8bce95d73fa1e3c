"""Wan 2.1 weights in both public layouts give the peer's latents and reconstructions."""

import json

import pytest
import torch
from helpers import relative_error

from vae.convert import config_from_original_state, diffusers_key, load_wan_vae, main
from vae.model import PRESETS, CausalVAE, VAEConfig

diffusers = pytest.importorskip("diffusers")


def tiny_peer(
    num_res_blocks: int = 2,
    temporal: tuple[bool, ...] = (False, True, True),
    *,
    base_dim: int = 8,
    dim_mult: tuple[int, ...] = (1, 2, 2, 2),
):
    torch.manual_seed(0)
    peer = diffusers.AutoencoderKLWan(
        base_dim=base_dim,
        z_dim=4,
        dim_mult=list(dim_mult),
        num_res_blocks=num_res_blocks,
        temperal_downsample=list(temporal),
    ).eval()
    with torch.no_grad():
        for param in peer.parameters():  # move zero-initialised branches off zero
            param.add_(0.05 * torch.randn_like(param))
    return peer


def assert_matches_peer(ours: CausalVAE, peer) -> None:
    x = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, T, H, W)
    with torch.no_grad():
        peer_latent = peer.encode(x).latent_dist.mode()
        our_latent = ours.encode(x, normalize=False)
        assert relative_error(our_latent, peer_latent) <= 1e-4
        peer_video = peer.decode(peer_latent).sample
        assert relative_error(ours.decode(peer_latent, normalize=False), peer_video) <= 1e-4


@pytest.mark.parametrize(("num_res_blocks", "temporal"), [(2, (False, True, True)), (1, (True, True, False))])
def test_diffusers_folder_matches_peer(tmp_path, num_res_blocks, temporal):
    peer = tiny_peer(num_res_blocks, temporal)
    peer.save_pretrained(tmp_path / "peer")
    ours = load_wan_vae(tmp_path / "peer")
    assert ours.cfg.num_res_blocks == num_res_blocks and ours.cfg.temporal_downsample == temporal
    assert ours.cfg.latents_mean is None  # diffusers' 16 default means do not describe 4 channels
    assert_matches_peer(ours, peer)


def test_our_names_are_wan_original_names():
    """diffusers' own converter of Wan's original checkpoint maps our keys onto AutoencoderKLWan's."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    # the converter hard-codes Wan 2.1's block indices, so keep its level structure: mults (1, 2, 4, 4)
    peer = tiny_peer(base_dim=4, dim_mult=(1, 2, 4, 4))
    ours = CausalVAE(VAEConfig(base_dim=4, dim_mult=(1, 2, 4, 4), latent_channels=4))
    converted = convert_wan_vae_to_diffusers(ours.state_dict())
    peer_state = peer.state_dict()
    assert sorted(converted) == sorted(peer_state)
    assert all(converted[key].shape == peer_state[key].shape for key in peer_state)
    assert all(diffusers_key(key, ours.cfg) in peer_state for key in ours.state_dict())


def test_original_pth_matches_peer_through_the_cli(tmp_path):
    peer = tiny_peer()
    cfg = VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), latent_channels=4)
    to_original = {diffusers_key(key, cfg): key for key in CausalVAE(cfg).state_dict()}
    original = {to_original[key]: value for key, value in peer.state_dict().items()}
    # a stand-in for the public Wan2.1_VAE.pth, which is a plain pickled state dict
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    main([str(tmp_path / "Wan2.1_VAE.pth"), "--out", str(tmp_path / "ours")])
    ours = CausalVAE.from_pretrained(tmp_path / "ours")
    assert ours.cfg == cfg  # read off the tensor shapes
    assert_matches_peer(ours, peer)


def test_wan21_shapes_give_the_wan21_config_and_latent_stats():
    with torch.device("meta"):
        state = CausalVAE(PRESETS["wan2.1"]).state_dict()
    cfg = config_from_original_state(state)
    assert cfg == PRESETS["wan2.1"]
    assert cfg.latents_std[0] == 2.8184  # Wan's published constants, set on load


def test_unsupported_diffusers_variant_is_refused(tmp_path):
    folder = tmp_path / "wan22"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"base_dim": 8, "z_dim": 4, "is_residual": True}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is_residual=True"):
        load_wan_vae(folder)
