"""The DiT task of train.py: cached or freshly encoded latents + captions -> the diffusion loss.

Everything the training loop needs from the DiT side (train.py's `Task` protocol): the model, the
batch stream, the loss with caption dropout and condition masks, periodic samples, and the export to
the folder generate.py loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data.stream import BucketStream, StreamTask
from dit.text_encoder import pad_text

if TYPE_CHECKING:
    from dit.pipeline import PipelineConfig
    from train import TrainConfig


class DiTTask(StreamTask):
    """Latents (cached, or encoded on the fly by a frozen VAE) + captions -> diffusion loss.

    Caption dropout swaps a sample's caption for the empty prompt (the unconditional input of
    classifier-free guidance); condition masks (i2v, extension, loop, keyframes, inpaint) are drawn per
    sample with the ratios of `cond`. Both draw from the step's generator, so they replay on resume.
    """

    def __init__(self, cfg: TrainConfig, *, device: torch.device):
        from data.cache import CachedLatentDataset, collate_latents
        from data.dataset import VideoDataset, collate_samples
        from dit.diffusion import build_process
        from dit.model import DiT
        from dit.text_encoder import TextEncoder
        from vae.model import CausalVAE

        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = DiT(cfg.dit)
        self.process = build_process(cfg.diffusion)
        self.text_encoder = TextEncoder.from_pretrained(cfg.text_encoder, device=device)
        self.empty_text = self.text_encoder.encode([""])  # (1, S, Dt), (1, S)
        self.vae = CausalVAE.from_pretrained(cfg.vae_path, device=device)
        self.vae.requires_grad_(False)
        _check_dit_fits(cfg, text_dim=self.text_encoder.dim, max_text_len=self.text_encoder.max_length,
                        latent_channels=self.vae.cfg.latent_channels)
        if cfg.data.latent_cache:
            dataset, collate = CachedLatentDataset(cfg.data.latent_cache, token_budget=cfg.data.cache_token_budget), collate_latents
        else:
            dataset = VideoDataset.from_manifest(cfg.data.manifest, cfg.data.buckets, seed=cfg.seed,
                                                  decoded_cache_mb=cfg.data.decoded_cache_mb)
            collate = collate_samples
        self.stream = BucketStream(dataset, seed=cfg.seed, collate=collate, num_workers=cfg.data.num_workers)

    @torch.no_grad()
    def _inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "latents" in batch:
            latents = batch["latents"].to(self.device, torch.float32)  # (B, C, T', H', W')
            text, text_mask = batch["text_hidden"].to(self.device, torch.float32), batch["text_mask"].to(self.device)
        else:
            video = batch["video"].to(self.device)  # (B, 3, T, H, W)
            latents = self.vae.encode(video, sample=True, generator=generator)  # (B, C, T', H', W')
            text, text_mask = self.text_encoder.encode(batch["text"])  # (B, S, Dt), (B, S)
        empty, empty_mask = self.empty_text
        length = max(text.shape[1], empty.shape[1])
        text, text_mask = pad_text(text, text_mask, length)  # (B, S, Dt), (B, S)
        empty, empty_mask = pad_text(empty, empty_mask, length)  # (1, S, Dt), (1, S)
        drop = (torch.rand(latents.shape[0], generator=generator) < self.cfg.data.caption_dropout).to(self.device)
        text = torch.where(drop[:, None, None], empty, text)  # (B, S, Dt)
        text_mask = torch.where(drop[:, None], empty_mask, text_mask)  # (B, S)
        return latents, text, text_mask

    def loss(self, model, batch: dict, *, generator: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
        from dit.conditioning import sample_cond_mask
        from dit.diffusion import training_loss

        latents, text, text_mask = self._inputs(batch, generator)  # (B, C, T', H', W')
        batch_size, _, frames, height, width = latents.shape
        cond_mask = sample_cond_mask(self.cfg.cond, batch_size, frames, height, width, generator).to(self.device)
        dtype = next(model.parameters()).dtype  # bf16/fp16 engines hold half weights; feed them half inputs

        def predict(x, t, text, text_mask, **extra):  # noqa: ANN001, ANN003, ANN202 (training_loss's model signature)
            return model(x.to(dtype), t, text.to(dtype), text_mask, **extra)  # the DiT casts x0_prev to x's dtype

        loss, logs = training_loss(predict, latents, process=self.process, text=text, text_mask=text_mask,
                                   cond_mask=cond_mask, generator=generator, patch_size=self.cfg.dit.patch_size,
                                   detail_weight=self.cfg.diffusion.detail_weight,
                                   input_perturbation=self.cfg.diffusion.input_perturbation,
                                   blur_path=self.cfg.diffusion.blur_path, blur_sigma=self.cfg.diffusion.blur_sigma,
                                   self_cond=self.cfg.diffusion.self_cond,
                                   temporal_weight=self.cfg.diffusion.temporal_weight)
        return loss, {f"dit/{key}": float(value) for key, value in logs.items() if key != "loss"}

    def tokens(self, batch: dict) -> int:
        from dit.diffusion import num_tokens

        # num_tokens counts one sample's tokens (L); the throughput log wants the whole batch's.
        if "latents" in batch:
            return batch["latents"].shape[0] * num_tokens(batch["latents"].shape, self.cfg.dit.patch_size)
        batch_size, _, frames, height, width = batch["video"].shape
        latent = (batch_size, 0, *self.vae.latent_shape(frames, height, width))
        return batch_size * num_tokens(latent, self.cfg.dit.patch_size)

    @torch.no_grad()
    def media(self, step: int, *, weights: dict[str, torch.Tensor], out_dir: Path, writer: Any) -> None:
        """Sample the fixed prompts with `weights` (the EMA) at the largest bucket; write mp4s and TensorBoard."""
        from einops import rearrange

        from data.video_io import write_video
        from dit.model import DiT
        from dit.sampling import sample

        model = DiT(self.cfg.dit).to(self.device).eval()
        model.load_state_dict(weights)
        bucket = max(self.cfg.data.buckets.buckets(), key=self.cfg.data.buckets.tokens)
        prompts = self.cfg.log.sample_prompts
        shape = (len(prompts), self.vae.cfg.latent_channels, *self.vae.latent_shape(
            bucket.num_frames, bucket.height, bucket.width))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.cfg.seed)).to(self.device)
        text, text_mask = self.text_encoder.encode(prompts)  # (N, S, Dt), (N, S)
        latents = sample(model, noise, process=self.process, sampler="euler" if self.cfg.diffusion.process == "flow"
                         else "ddim", steps=self.cfg.log.sample_steps, text=text, text_mask=text_mask, progress=False,
                         patch_size=self.cfg.dit.patch_size, self_cond=self.cfg.dit.self_cond)  # (N, C, T', H', W')
        videos = self.vae.decode(latents)  # (N, 3, T, H, W)
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, video in enumerate(videos):
            write_video(out_dir / f"step{step:08d}_prompt{index}.mp4", video.cpu(), fps=8.0)
        if writer is not None:  # a strip of frames per prompt: TensorBoard's add_video needs moviepy
            strip = rearrange(videos[:, :, :: max(1, videos.shape[2] // 8)], "n c t h w -> c (n h) (t w)")
            writer.add_image("samples", (strip.cpu() + 1) / 2, step)

    def finish(self, run_dir: Path, *, weights: dict[str, torch.Tensor]) -> None:
        pass


def _check_dit_fits(cfg: TrainConfig, *, text_dim: int, max_text_len: int, latent_channels: int) -> None:
    if cfg.dit.text_dim != text_dim:
        raise ValueError(f"dit.text_dim={cfg.dit.text_dim}: must equal the text encoder's width {text_dim} "
                         f"(text_encoder={cfg.text_encoder!r})")
    if cfg.dit.text_len < max_text_len:
        raise ValueError(f"dit.text_len={cfg.dit.text_len}: must be >= the text encoder's max_length {max_text_len}")
    if cfg.dit.self_cond != (cfg.diffusion.self_cond > 0):
        raise ValueError(f"dit.self_cond={cfg.dit.self_cond} with diffusion.self_cond={cfg.diffusion.self_cond}: a "
                         "self-conditioned DiT learns to read its estimate only from batches that give it one, so set "
                         "both (e.g. dit.self_cond=true diffusion.self_cond=0.5) or neither")
    if cfg.dit.in_channels != latent_channels:
        raise ValueError(f"dit.in_channels={cfg.dit.in_channels}: must equal the VAE's latent channels "
                         f"{latent_channels} (vae_path={cfg.vae_path!r})")


def export_dit(cfg: TrainConfig, weights: dict[str, torch.Tensor], out: Path) -> None:
    """OUT/dit, OUT/vae (copied from `vae_path`), OUT/text_encoder for a local encoder, OUT/pipeline.json."""
    import shutil

    from dit.model import DiT
    from dit.pipeline import PIPELINE_FILE, write_json_atomic

    model = DiT(cfg.dit)
    model.load_state_dict(weights)
    model.save_pretrained(out / "dit")
    shutil.copytree(cfg.vae_path, out / "vae")
    if Path(cfg.text_encoder).is_dir():  # a local encoder travels with the model; a name or hub id does not
        shutil.copytree(cfg.text_encoder, out / "text_encoder")
    write_json_atomic(out / PIPELINE_FILE, pipeline_config(cfg).to_json_dict())


def pipeline_config(cfg: TrainConfig) -> PipelineConfig:
    """What a DiT run's export writes to pipeline.json: its diffusion process, its text encoder and its
    generation defaults (size and frame count from the largest bucket)."""
    from dit.pipeline import GenerationDefaults, PipelineConfig

    bucket = max(cfg.data.buckets.buckets(), key=cfg.data.buckets.tokens)
    defaults = GenerationDefaults(height=bucket.height, width=bucket.width, frames=bucket.num_frames,
                                  sampler="euler" if cfg.diffusion.process == "flow" else "ddim",
                                  steps=cfg.sample_defaults.steps, guidance_scale=cfg.sample_defaults.guidance_scale,
                                  temporal_guidance=cfg.sample_defaults.temporal_guidance,
                                  temporal_guidance_start=cfg.sample_defaults.temporal_guidance_start,
                                  cfg_zero_star=cfg.sample_defaults.cfg_zero_star,
                                  zero_init_steps=cfg.sample_defaults.zero_init_steps)
    return PipelineConfig(diffusion=cfg.diffusion, text_encoder=cfg.text_encoder, defaults=defaults)
