"""The VAE task of train.py: pixel clips and images -> reconstruction + KL (+ adversarial) loss.

Everything the training loop needs from the VAE side (train.py's `Task` protocol): the VAE with its
loss and discriminator as one module, the batch stream, reconstructions for the logs, the latent
statistics at the end, and the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data.stream import BucketStream, StreamTask

if TYPE_CHECKING:
    from train import TrainConfig
    from vae.losses import VAELossConfig
    from vae.model import VAEConfig


class VAEWithLoss(torch.nn.Module):
    """The VAE and its loss (with the discriminator) as one module, so one engine and one AdamW train both.

    Each part gets only its own gradient: the discriminator is frozen while it scores the reconstruction
    for the generator's adversarial term, and its hinge loss sees the reconstruction detached.
    """

    def __init__(self, vae_cfg: VAEConfig, loss_cfg: VAELossConfig):
        from vae.losses import VAELoss
        from vae.model import CausalVAE

        super().__init__()
        self.vae = CausalVAE(vae_cfg)
        self.loss_fn = VAELoss(loss_cfg)

    def forward(self, x: torch.Tensor, *, generator: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
        recon, posterior = self.vae(x, generator=generator)  # (B, 3, T, H, W)
        disc = self.loss_fn.discriminator
        if disc is None:
            return self.loss_fn(x, recon, posterior, step=step)
        disc.requires_grad_(False)
        total, logs = self.loss_fn(x, recon, posterior, step=step)
        disc.requires_grad_(True)
        disc_loss, disc_logs = self.loss_fn.discriminator_loss(x, recon.detach())
        # Before the discriminator's start step its loss still runs, weighted 0, so every rank and ZeRO stage
        # sees the same set of parameters with gradients on every step.
        active = 1.0 if self.loss_fn.discriminator_active(step) else 0.0
        return total + active * disc_loss, {**logs, **disc_logs}


class VAETask(StreamTask):
    """Pixel clips and images from a manifest -> reconstruction + KL (+ adversarial) loss (vae/losses.py)."""

    def __init__(self, cfg: TrainConfig, *, device: torch.device):
        from data.dataset import VideoDataset, collate_samples

        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = VAEWithLoss(cfg.vae, cfg.vae_loss)
        dataset = VideoDataset.from_manifest(cfg.data.manifest, cfg.data.buckets, seed=cfg.seed,
                                              decoded_cache_mb=cfg.data.decoded_cache_mb)
        self.stream = BucketStream(dataset, seed=cfg.seed, collate=collate_samples, num_workers=cfg.data.num_workers)
        self.media_batch: torch.Tensor | None = None

    def loss(self, model, batch: dict, *, generator: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
        if self.media_batch is None:  # the first clip seen is the one reconstructed in the logs, every time
            self.media_batch = batch["video"][:1]
        dtype = next(model.parameters()).dtype  # bf16/fp16 engines hold half weights; feed them half inputs
        total, logs = model(batch["video"].to(self.device, dtype), generator=generator, step=step)
        return total, {f"vae/{key}": float(value) for key, value in logs.items()}

    def tokens(self, batch: dict) -> int:
        return batch["video"][:, 0].numel()  # pixels (B * T * H * W)

    def _vae(self, weights: dict[str, torch.Tensor]):
        from vae.model import CausalVAE

        vae = CausalVAE(self.cfg.vae).to(self.device).eval()
        vae.load_state_dict(vae_weights(weights))
        return vae

    @torch.no_grad()
    def media(self, step: int, *, weights: dict[str, torch.Tensor], out_dir: Path, writer: Any) -> None:
        """Write the first training clip and its reconstruction side by side (mp4, and a TensorBoard strip)."""
        from einops import rearrange

        from data.video_io import write_video

        if self.media_batch is None:
            return
        x = self.media_batch.to(self.device)  # (1, 3, T, H, W)
        recon = self._vae(weights)(x, sample=False)[0].clamp(-1, 1)  # (1, 3, T, H, W)
        pair = torch.cat([x, recon], dim=-1)[0].cpu()  # (3, T, H, 2W)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_video(out_dir / f"step{step:08d}_recon{'.png' if pair.shape[1] == 1 else '.mp4'}", pair, fps=8.0)
        if writer is not None:
            writer.add_image("reconstruction", (rearrange(pair[:, :: max(1, pair.shape[1] // 8)],
                                                          "c t h w -> c h (t w)") + 1) / 2, step)

    def finish(self, run_dir: Path, *, weights: dict[str, torch.Tensor]) -> None:
        """Per-channel latent statistics of the exported weights over the training data (vae/stats.py)."""
        from vae.stats import compute_latent_stats, manifest_clips

        stats = carried_stats(self.cfg, self.model.vae)
        if stats is None:
            bucket = max(self.cfg.data.buckets.buckets(), key=self.cfg.data.buckets.tokens)
            clips = manifest_clips(Path(self.cfg.data.manifest), num_clips=self.cfg.vae_stats_clips,
                                   frames=bucket.num_frames, size=min(bucket.height, bucket.width), seed=self.cfg.seed)
            mean, std = compute_latent_stats(self._vae(weights), (clip.to(self.device) for clip in clips))
            stats = {"mean": mean, "std": std}
        (run_dir / "latent_stats.json").write_text(json.dumps(stats, indent=2))

def carried_stats(cfg: TrainConfig, vae: torch.nn.Module) -> dict[str, list[float]] | None:
    """init_from's latent statistics when the run freezes everything that makes the latents (the encoder
    and the moments projection `conv1`: `optim.lr_scales` 0 for every one of their weights): its latents are
    init_from's, so measuring them again would only repeat its numbers. None otherwise, or when init_from
    has none."""
    import checkpoint as ckpt
    from train import lr_scale_for
    from vae.model import VAEConfig

    if not cfg.init_from:
        return None
    names = [name for part in ("encoder", "conv1")
             for name, _ in getattr(vae, part).named_parameters(prefix=f"vae.{part}")]  # as the optimizer names them
    if any(lr_scale_for(cfg.optim.lr_scales, name)[1] != 0 for name in names):
        return None
    saved = VAEConfig.from_json(ckpt.model_folder(cfg.init_from, part="vae") / "config.json")
    if saved.latents_mean is None:
        return None
    return {"mean": saved.latents_mean, "std": saved.latents_std}


def vae_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CausalVAE's own weights from a VAEWithLoss state (drops the discriminator)."""
    return {name.removeprefix("vae."): value for name, value in weights.items() if name.startswith("vae.")}


def export_vae(cfg: TrainConfig, weights: dict[str, torch.Tensor], out: Path, *, stats_file: Path) -> bool:
    """OUT/vae with the latent statistics measured at the end of training (`stats_file`). Before the run has
    finished there are none yet: a run with its encoder frozen carries init_from's, any other is written
    without. Returns whether the folder has statistics."""
    from vae.model import CausalVAE

    model = CausalVAE(cfg.vae)
    model.load_state_dict(vae_weights(weights))
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else carried_stats(cfg, model)
    if stats is not None:
        model.set_latent_stats(stats["mean"], stats["std"])
    model.save_pretrained(out / "vae")
    return stats is not None
