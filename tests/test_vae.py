"""The causal VAE: chunked == whole clip, causality, shapes rules, posterior, weights on disk."""

import pytest
import torch
from helpers import relative_error

from vae.model import PRESETS, CausalVAE, DiagonalGaussian, VAEConfig


def random_vae(seed: int = 0, **overrides) -> CausalVAE:
    """A debug VAE with every weight perturbed, so zero-initialised branches (attention) take part."""
    torch.manual_seed(seed)
    model = CausalVAE(VAEConfig.from_preset("debug", **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def random_clip(frames: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, frames, size, size, generator=generator) * 2 - 1  # (B, 3, T, H, W)


@pytest.mark.parametrize("chunk_latent_frames", [1, 2])
def test_chunked_equals_whole_clip(chunk_latent_frames):
    model = random_vae(chunk_latent_frames=chunk_latent_frames)
    x = random_clip(13)
    with torch.no_grad():
        whole = model.conv1(model.encoder(x))  # one pass, no cache
        chunked = model._encode_moments(x)  # 1, then 4 * chunk_latent_frames frames at a time
        z = whole[:, : model.cfg.latent_channels]
        decoded_whole = model.decoder(model.conv2(z))
        decoded_chunked = model._decode_pixels(z)
    assert chunked.shape == (2, 8, 4, 2, 2)
    assert relative_error(chunked, whole) <= 1e-5
    assert decoded_chunked.shape == (2, 3, 13, 16, 16)
    assert relative_error(decoded_chunked, decoded_whole) <= 1e-5


def test_encoder_is_causal():
    model = random_vae()
    x = random_clip(13)
    changed = x.clone()
    changed[:, :, 5:] = -changed[:, :, 5:]  # pixel frames after 4k with k = 1
    with torch.no_grad():
        z, z_changed = model.encode(x), model.encode(changed)
    assert torch.allclose(z[:, :, :2], z_changed[:, :, :2], rtol=0, atol=1e-6)
    assert not torch.allclose(z[:, :, 2:], z_changed[:, :, 2:], atol=1e-3)  # the change is seen later


def test_decoder_is_causal():
    model = random_vae()
    z = torch.randn(1, 4, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    changed = z.clone()
    changed[:, :, 2:] += 1.0  # latent frames after k = 1
    with torch.no_grad():
        x, x_changed = model.decode(z), model.decode(changed)
    assert torch.equal(x[:, :, :5], x_changed[:, :, :5])  # pixel frames <= 4k
    assert not torch.allclose(x[:, :, 5:], x_changed[:, :, 5:], atol=1e-3)


def test_image_is_a_one_frame_video():
    model = random_vae()
    x = random_clip(9)
    with torch.no_grad():
        image_latent = model.encode(x[:, :, :1])
        clip_latent = model.encode(x)
        image = model.decode(image_latent)
    assert image_latent.shape == (2, 4, 1, 2, 2) and image.shape == (2, 3, 1, 16, 16)
    assert torch.allclose(image_latent[:, :, 0], clip_latent[:, :, 0], atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((16, 32, 32), "T=16.*nearest is 17"),
        ((17, 30, 32), "H=30.*nearest is 32"),
        ((1, 32, 61), "W=61.*nearest is 64"),
    ],
)
def test_validate_input_names_the_nearest_valid_size(shape, message):
    model = random_vae()
    with pytest.raises(ValueError, match=message):
        model.validate_input(*shape)
    with pytest.raises(ValueError, match=message):
        model.encode(torch.zeros(1, 3, *shape))


def test_latent_shape_matches_encode():
    model = random_vae()
    assert model.latent_shape(17, 64, 48) == (5, 8, 6)
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 3, 1, 64, 48)).shape[2:] == (1, 8, 6)


def test_normalisation_round_trip_and_stats():
    model = random_vae()
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.0, 4.0]
    model.set_latent_stats(mean, std)
    x = random_clip(5)
    with torch.no_grad():
        raw = model.encode(x, normalize=False)
        normed = model.encode(x)
        expected = (raw - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
        assert torch.allclose(normed, expected, atol=1e-6)
        assert torch.allclose(model.decode(normed), model.decode(raw, normalize=False), atol=1e-5)


def test_save_and_load_pretrained(tmp_path):
    model = random_vae()
    model.set_latent_stats([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0])
    folder = model.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = CausalVAE.from_pretrained(folder, dtype=torch.float64)
    assert loaded.cfg == model.cfg
    x = random_clip(5)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x.double()).float(), model.encode(x), atol=1e-5)


def test_posterior_sample_kl_and_mode():
    mean, logvar = 0.7, -1.2
    moments = torch.cat([torch.full((2, 3, 2, 4, 4), mean), torch.full((2, 3, 2, 4, 4), logvar)], dim=1)
    posterior = DiagonalGaussian(moments)
    expected_kl = 0.5 * (mean**2 + torch.tensor(logvar).exp() - 1 - logvar)
    assert torch.allclose(posterior.kl(), expected_kl.expand(2), atol=1e-6)
    assert torch.equal(posterior.mode(), moments[:, :3])
    first = posterior.sample(torch.Generator().manual_seed(3))
    again = posterior.sample(torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert abs((first - mean).std().item() - torch.tensor(logvar / 2).exp().item()) < 0.1


def test_training_forward_matches_inference_path():
    model = random_vae()
    x = random_clip(9)
    with torch.no_grad():
        recon, posterior = model(x, sample=False)
        assert torch.allclose(posterior.mode(), model.encode(x, normalize=False), atol=1e-5)
        assert torch.allclose(recon.clamp(-1, 1), model.decode(posterior.mode(), normalize=False), atol=1e-5)
    recon, posterior = model(x, generator=torch.Generator().manual_seed(0))
    (recon.square().mean() + posterior.kl().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_presets_and_config_validation():
    assert set(PRESETS) == {"debug", "demo", "wan2.1"}
    wan = VAEConfig.from_preset("wan2.1")
    assert (wan.spatial_factor, wan.temporal_factor, wan.latent_channels) == (8, 4, 16)
    assert VAEConfig.from_preset("demo", latent_channels=4).latent_channels == 4
    with pytest.raises(ValueError, match="valid presets are .*debug"):
        VAEConfig.from_preset("huge")
    with pytest.raises(ValueError, match="temporal_downsample"):
        VAEConfig(temporal_downsample=(True,))
    with pytest.raises(ValueError, match="latents_std"):
        VAEConfig(latent_channels=2, latents_mean=[0.0, 0.0], latents_std=[1.0, 0.0])


def test_per_frame_init_starts_as_an_image_vae():
    # what stills pretraining relies on: a fresh clip model is the image model on frames 0, 4, 8, ...
    torch.manual_seed(0)
    model = CausalVAE(VAEConfig.from_preset("debug", per_frame_init=True, logvar_init=-4.0)).eval()
    x = random_clip(9)
    with torch.no_grad():
        clip_latent = model.encode(x)  # (2, 4, 3, 2, 2)
        image_latents = torch.cat([model.encode(x[:, :, t : t + 1]) for t in (0, 4, 8)], dim=2)
        decoded = model.decode(clip_latent)  # (2, 3, 9, 16, 16)
        images = [model.decode(clip_latent[:, :, k : k + 1]) for k in range(3)]
        posterior = model.encode_posterior(x)
    assert relative_error(clip_latent, image_latents) < 1e-5
    assert relative_error(decoded[:, :, :1], images[0]) < 1e-5
    for t in range(1, 9):  # frames 1-4 repeat latent frame 1, frames 5-8 latent frame 2
        assert relative_error(decoded[:, :, t : t + 1], images[(t + 3) // 4]) < 1e-5
    assert torch.allclose(posterior.logvar, torch.full_like(posterior.logvar, -4.0), atol=1.0)
    # the default (Wan's) init mixes frames from the start
    torch.manual_seed(0)
    wan_init = CausalVAE(VAEConfig.from_preset("debug")).eval()
    with torch.no_grad():
        assert relative_error(wan_init.encode(x)[:, :, 1:2], wan_init.encode(x[:, :, 4:5])) > 1e-2


@pytest.mark.parametrize(("kernel", "padding", "stride"), [(3, 1, 1), ((3, 1, 1), (1, 0, 0), 1), (1, 0, 1), (3, 1, (1, 2, 2))])
def test_one_frame_fast_path_equals_the_padded_3d_convolution(kernel, padding, stride):
    # an image through a causal conv: the 2D shortcut must give what Conv3d over the zero padding gives
    import torch.nn.functional as F

    from vae.layers import CausalConv3d

    torch.manual_seed(0)
    conv = CausalConv3d(4, 6, kernel, padding=padding, stride=stride)
    x = torch.randn(2, 4, 1, 16, 16)
    pad_t, pad_h, pad_w = conv.context, *conv.space_pad[2::-2]
    reference = F.conv3d(F.pad(x, (pad_w, pad_w, pad_h, pad_h, pad_t, 0)), conv.weight, conv.bias, conv.stride)
    with torch.no_grad():
        out = conv(x)
    assert out.shape == reference.shape and torch.allclose(out, reference, atol=1e-6)
