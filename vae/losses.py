"""Training losses for the causal VAE: L1 (+ L2, + frame and pixel differences) + (1 - SSIM) reconstruction,
KL, and a 3D patch discriminator with hinge loss that switches on after a warm-up step.

Everything works per frame or with time padding, so images (T = 1) and clips share one run.

    loss_fn = VAELoss(VAELossConfig())
    recon, posterior = vae(x, generator=g)
    total, logs = loss_fn(x, recon, posterior, step=step)       # generator side
    total.backward(); vae_opt.step()
    if loss_fn.discriminator_active(step):
        disc_opt.zero_grad()   # the generator's backward also reached the discriminator
        d_loss, d_logs = loss_fn.discriminator_loss(x, recon.detach())
        d_loss.backward(); disc_opt.step()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vae.model import DiagonalGaussian


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0
    """Weight of the mean absolute pixel error."""
    l2_weight: float = 0.0
    """Weight of the mean squared pixel error. L1's pull is the same for every wrong pixel, so a model
    unsure of a small object may erase it; L2 pulls hardest on the largest errors (docs/demo.md)."""
    motion_weight: float = 0.0
    """Weight of the mean absolute error of frame-to-frame differences (clips only: a still has none). Pixel
    losses barely see a shape left one pixel behind within a latent frame's group of frames, so a VAE
    that decodes each group as near-still frames and jumps between groups pays little for it; this term
    pays for the jump itself (docs/demo.md)."""
    edge_weight: float = 0.0
    """Weight of the mean absolute error of horizontal and vertical pixel differences (the spatial twin of
    `motion_weight`). A small shape whose corners come back rounded differs from its original in a few
    rim pixels, which the pixel terms average away over the frame; this term pays for every edge drawn
    softer or in the wrong place, and nothing for a flat colour offset. In the demo VAE's stage 4 it bought
    0.5 dB, not more shapes kept (docs/demo.md)."""
    ssim_weight: float = 0.2
    """Weight of 1 - SSIM (per frame, 11x11 Gaussian window); 0 switches it off."""
    kl_weight: float = 1e-6
    """Weight of KL(q(z|x) || N(0, I)), averaged over latent elements (so it does not scale with size)."""
    disc_weight: float = 0.1
    """Weight of the generator's hinge adversarial term once the discriminator is on; 0: no discriminator."""
    disc_start_step: int = 2000
    """Training step from which the discriminator trains and the adversarial term is added."""
    disc_base_dim: int = 32
    """Channels of the discriminator's first layer (doubled per layer); a multiple of 8."""
    disc_layers: int = 3
    """Strided layers in the discriminator; each halves H and W (frames need >= 2**disc_layers pixels)."""

    def __post_init__(self) -> None:
        for name in ("l1_weight", "l2_weight", "motion_weight", "edge_weight", "ssim_weight", "kl_weight",
                     "disc_weight", "disc_start_step"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.disc_base_dim < 8 or self.disc_base_dim % 8:
            raise ValueError(
                f"disc_base_dim={self.disc_base_dim}: must be a positive multiple of 8 (GroupNorm)"
            )
        if self.disc_layers < 1:
            raise ValueError(f"disc_layers={self.disc_layers}: must be >= 1")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VAELossConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown VAE loss preset {name!r}: valid presets are {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()  # (size,)


def ssim(
    a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5, data_range: float = 2.0
) -> torch.Tensor:
    """Mean structural similarity of two (B, C, T, H, W) videos, frame by frame (Wang et al. 2004).

    Local statistics use a Gaussian window without padding; `data_range` is 2 for [-1, 1] pixels.
    """
    if min(a.shape[-2:]) < window:
        raise ValueError(f"frame size {tuple(a.shape[-2:])}: SSIM needs at least {window} pixels per side")
    channels = a.shape[1]
    frames_a = rearrange(a, "b c t h w -> (b t) c h w").float()
    frames_b = rearrange(b, "b c t h w -> (b t) c h w").float()
    kernel_1d = gaussian_window(window, sigma).to(frames_a.device)

    def local_mean(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian blur per channel
        x = F.conv2d(x, kernel_1d.view(1, 1, 1, -1).expand(channels, 1, 1, window), groups=channels)
        return F.conv2d(x, kernel_1d.view(1, 1, -1, 1).expand(channels, 1, window, 1), groups=channels)

    mu_a, mu_b = local_mean(frames_a), local_mean(frames_b)  # (B*T, C, H - w + 1, W - w + 1)
    var_a = local_mean(frames_a * frames_a) - mu_a**2
    var_b = local_mean(frames_b * frames_b) - mu_b**2
    cov = local_mean(frames_a * frames_b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2  # the paper's stabilisers
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    structure = (2 * cov + c2) / (var_a + var_b + c2)
    return (luminance * structure).mean()


class PatchDiscriminator3D(nn.Module):
    """PatchGAN over space and time: one real/fake logit per spatio-temporal patch.

    Time kernels are 3 wide with padding 1 and stride 1, so one-frame images and clips both fit.
    """

    def __init__(self, *, base_dim: int = 32, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [
            nn.Conv3d(3, base_dim, (3, 4, 4), stride=(1, 2, 2), padding=1),
            nn.LeakyReLU(0.2),
        ]
        dim = base_dim
        for _ in range(layers - 1):
            blocks += [
                nn.Conv3d(dim, dim * 2, (3, 4, 4), stride=(1, 2, 2), padding=1),
                nn.GroupNorm(8, dim * 2),
                nn.LeakyReLU(0.2),
            ]
            dim *= 2
        blocks.append(nn.Conv3d(dim, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, T, H / 2**layers, W / 2**layers)


class VAELoss(nn.Module):
    """The generator-side loss and, once active, the discriminator's own hinge loss."""

    def __init__(self, cfg: VAELossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.discriminator = (
            PatchDiscriminator3D(base_dim=cfg.disc_base_dim, layers=cfg.disc_layers)
            if cfg.disc_weight > 0
            else None
        )

    def discriminator_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start_step

    def forward(
        self, x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, *, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x, recon: (B, 3, T, H, W). Returns the weighted total and the unweighted terms (detached)."""
        cfg = self.cfg
        error = recon - x
        terms = {"l1": error.abs().mean(), "kl": posterior.kl().mean()}
        total = cfg.l1_weight * terms["l1"] + cfg.kl_weight * terms["kl"]
        if cfg.l2_weight > 0:
            terms["l2"] = error.square().mean()
            total = total + cfg.l2_weight * terms["l2"]
        if cfg.motion_weight > 0 and x.shape[2] > 1:
            terms["motion"] = (error[:, :, 1:] - error[:, :, :-1]).abs().mean()  # |d recon/dt - d x/dt|
            total = total + cfg.motion_weight * terms["motion"]
        if cfg.edge_weight > 0:
            across = (error[..., :, 1:] - error[..., :, :-1]).abs().mean()  # |d recon/dx - d x/dx|
            down = (error[..., 1:, :] - error[..., :-1, :]).abs().mean()
            terms["edge"] = (across + down) / 2
            total = total + cfg.edge_weight * terms["edge"]
        if cfg.ssim_weight > 0:
            terms["ssim"] = ssim(recon, x)
            total = total + cfg.ssim_weight * (1.0 - terms["ssim"])
        if self.discriminator_active(step):
            terms["generator_adv"] = -self.discriminator(recon).mean()  # hinge loss, generator side
            total = total + cfg.disc_weight * terms["generator_adv"]
        logs = {name: value.detach() for name, value in terms.items()}
        logs["total"] = total.detach()
        return total, logs

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(recon))). Pass recon detached."""
        if self.discriminator is None:
            raise ValueError("discriminator_loss: disc_weight=0 builds no discriminator")
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(recon)
        loss = F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
        logs = {
            "disc": loss.detach(),
            "logits_real": logits_real.mean().detach(),
            "logits_fake": logits_fake.mean().detach(),
        }
        return loss, logs


PRESETS: dict[str, VAELossConfig] = {
    # tests: a small discriminator that starts at once
    "debug": VAELossConfig(disc_start_step=0, disc_base_dim=8, disc_layers=2),
    # the 64x64 demo: the discriminator joins once reconstructions are roughly right
    "demo": VAELossConfig(disc_start_step=1000, disc_base_dim=16, disc_layers=3),
    "default": VAELossConfig(),
}
