"""VAE losses: SSIM against its closed form, loss bookkeeping, hinge values, a training step that learns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vae.losses import VAELoss, VAELossConfig, ssim
from vae.model import CausalVAE, DiagonalGaussian, VAEConfig


def clip(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, frames, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ssim_closed_forms():
    x = clip(3)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    # constant frames a and b: no variance, so SSIM is the luminance term (2ab + c1) / (a^2 + b^2 + c1)
    a, b, c1 = 0.3, -0.2, (0.01 * 2.0) ** 2
    value = ssim(torch.full((1, 3, 2, 16, 16), a), torch.full((1, 3, 2, 16, 16), b))
    assert value.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noisier = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert 1.0 > ssim(noisy, x) > ssim(noisier, x)
    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim(torch.zeros(1, 3, 1, 8, 8), torch.zeros(1, 3, 1, 8, 8))


@pytest.mark.parametrize("frames", [1, 5])  # images and clips go through the same loss
def test_total_is_the_weighted_sum_and_the_discriminator_waits(frames):
    cfg = VAELossConfig(l1_weight=1.0, ssim_weight=0.5, kl_weight=0.01, disc_weight=0.3, disc_start_step=10,
                        disc_base_dim=8, disc_layers=2)  # fmt: skip
    loss_fn = VAELoss(cfg)
    x, recon = clip(frames), clip(frames, seed=1)
    moments = torch.randn(2, 8, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    posterior = DiagonalGaussian(moments)
    total, logs = loss_fn(x, recon, posterior, step=9)
    assert "generator_adv" not in logs and not loss_fn.discriminator_active(9)
    expected = logs["l1"] + 0.5 * (1 - logs["ssim"]) + 0.01 * logs["kl"]
    assert torch.allclose(total, expected) and torch.equal(logs["kl"], posterior.kl().mean())
    total, logs = loss_fn(x, recon, posterior, step=10)
    assert loss_fn.discriminator_active(10)
    assert torch.allclose(total, expected + 0.3 * logs["generator_adv"])
    assert logs["generator_adv"] == -loss_fn.discriminator(recon).mean()


def test_l2_term_is_the_mean_squared_error():
    x, recon = clip(3), clip(3, seed=1)
    posterior = DiagonalGaussian(torch.zeros(2, 8, 1, 2, 2))
    total, logs = VAELoss(VAELossConfig(l1_weight=0.0, l2_weight=2.0, ssim_weight=0.0, kl_weight=0.0,
                                        disc_weight=0.0))(x, recon, posterior, step=0)  # fmt: skip
    assert torch.allclose(logs["l2"], F.mse_loss(recon, x)) and torch.allclose(total, 2.0 * F.mse_loss(recon, x))
    _, logs = VAELoss(VAELossConfig(disc_weight=0.0))(x, recon, posterior, step=0)
    assert "l2" not in logs  # off by default: the term is not computed


def test_motion_term_pays_for_frames_held_and_not_for_a_constant_offset():
    posterior = DiagonalGaussian(torch.zeros(1, 8, 1, 2, 2))
    only_motion = VAELoss(VAELossConfig(l1_weight=0.0, motion_weight=1.0, ssim_weight=0.0, kl_weight=0.0,
                                        disc_weight=0.0))  # fmt: skip
    ramp = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 3, 5, 4, 4) / 8  # each frame 1/8 brighter
    total, logs = only_motion(ramp, ramp + 0.25, posterior, step=0)
    assert total == 0 and logs["motion"] == 0  # the same motion, offset: only the pixel terms see it
    held = ramp[:, :, [0, 0, 2, 2, 4]]  # frames held in pairs: steps 0, 1/4, 0, 1/4 instead of 1/8 each
    total, logs = only_motion(ramp, held, posterior, step=0)
    assert total == logs["motion"] == 0.125
    _, logs = only_motion(ramp[:, :, :1], held[:, :, :1], posterior, step=0)
    assert "motion" not in logs  # a still has no frame differences


def test_edge_term_pays_for_a_softened_edge_and_not_for_a_constant_offset():
    posterior = DiagonalGaussian(torch.zeros(1, 8, 1, 2, 2))
    only_edge = VAELoss(VAELossConfig(l1_weight=0.0, edge_weight=1.0, ssim_weight=0.0, kl_weight=0.0,
                                      disc_weight=0.0))  # fmt: skip
    square = torch.full((1, 3, 2, 4, 4), -1.0)
    square[..., 1:3, 1:3] = 1.0  # a 2x2 square on a 4x4 frame, in both frames
    total, logs = only_edge(square, square - 0.5, posterior, step=0)
    assert total == 0 and logs["edge"] == 0  # the same edges, darker: only the pixel terms see it
    soft = square.clone()
    soft[..., 1, 1] = 0.0  # one corner pixel halfway to the background
    # That pixel's error (-1) reaches the 2 horizontal and 2 vertical differences around it, each of the
    # 12 per direction per channel and frame: mean 2/12 across, 2/12 down.
    total, logs = only_edge(square, soft, posterior, step=0)
    assert torch.allclose(logs["edge"], torch.tensor(2 / 12)) and total == logs["edge"]
    _, logs = VAELoss(VAELossConfig(ssim_weight=0.0, disc_weight=0.0))(square, soft, posterior, step=0)
    assert "edge" not in logs  # off by default: the term is not computed


class ConstantLogits(nn.Module):
    """A stand-in discriminator: logit `real` for the real batch (first call), `fake` otherwise."""

    def __init__(self, real: float, fake: float) -> None:
        super().__init__()
        self.values = [real, fake]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, x.shape[2], 2, 2), self.values.pop(0))


@pytest.mark.parametrize(("real", "fake", "expected"), [(0.5, -2.0, 0.5), (2.0, 0.5, 1.5), (-1.0, -1.0, 2.0)])
def test_hinge_discriminator_loss(real, fake, expected):
    loss_fn = VAELoss(VAELossConfig.from_preset("debug"))
    loss_fn.discriminator = ConstantLogits(real, fake)
    loss, _ = loss_fn.discriminator_loss(clip(1), clip(1, seed=1))
    assert loss.item() == pytest.approx(expected)


def test_a_few_steps_reduce_the_loss_and_train_the_discriminator():
    torch.manual_seed(0)
    vae = CausalVAE(VAEConfig.from_preset("debug"))
    loss_fn = VAELoss(VAELossConfig.from_preset("debug"))
    vae_opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    disc_opt = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-3)
    coarse = torch.rand(2, 3, 5, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = F.interpolate(coarse, size=(5, 16, 16), mode="trilinear")  # a smooth clip, (B, 3, T, H, W)
    generator = torch.Generator().manual_seed(0)
    l1, disc = [], []
    for step in range(12):
        recon, posterior = vae(x, generator=generator)
        total, logs = loss_fn(x, recon, posterior, step=step)
        vae_opt.zero_grad()
        total.backward()
        vae_opt.step()
        disc_opt.zero_grad()
        d_loss, d_logs = loss_fn.discriminator_loss(x, recon.detach())
        d_loss.backward()
        disc_opt.step()
        l1.append(logs["l1"].item())
        disc.append(d_logs["disc"].item())
    assert l1[-1] < 0.95 * l1[0]
    assert disc[-1] < disc[0]
