"""Per-channel latent statistics over a dataset, stored in the VAE folder's config.json.

The DiT wants latents of roughly unit scale per channel; `CausalVAE.encode` divides by these
(after subtracting the mean) by default, and `decode` undoes it.

    python -m vae.stats --vae DIR --manifest CSV [--num-clips 256 --frames 17 --size 64]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from vae.model import CausalVAE, save_config


@torch.no_grad()
def compute_latent_stats(vae: CausalVAE, clips: Iterable[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Mean and std per channel of the raw latents (posterior mode) of (B, 3, T, H, W) clips.

    Sums are kept in float64 so that many clips do not lose precision.
    """
    total = total_sq = None
    count = 0
    for clip in clips:
        z = vae.encode(clip, normalize=False).double()  # (B, C, T', H', W')
        per_channel = z.transpose(0, 1).flatten(1)  # (C, B*T'*H'*W')
        total = per_channel.sum(1) if total is None else total + per_channel.sum(1)
        total_sq = per_channel.square().sum(1) if total_sq is None else total_sq + per_channel.square().sum(1)
        count += per_channel.shape[1]
    if count == 0:
        raise ValueError("compute_latent_stats: no clips given")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    return mean.tolist(), std.tolist()


def square_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    """(3, T, H, W) -> (3, T, size, size): shorter side resized to `size`, then a centre crop."""
    frames = clip.transpose(0, 1)  # (T, 3, H, W)
    scale = size / min(frames.shape[-2:])
    new_size = [max(size, round(side * scale)) for side in frames.shape[-2:]]
    frames = F.interpolate(frames, size=new_size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    frames = frames[..., top : top + size, left : left + size]  # (T, 3, size, size)
    return frames.transpose(0, 1).clamp(-1.0, 1.0)  # (3, T, size, size)


def manifest_clips(
    manifest: Path, *, num_clips: int, frames: int, size: int, seed: int
) -> Iterator[torch.Tensor]:
    """Up to `num_clips` random clips of `frames` frames (images as one frame), as (1, 3, T, size, size)."""
    from data.manifest import read_manifest
    from data.video_io import VideoReadError, read_clip

    records = read_manifest(manifest)
    random.Random(seed).shuffle(records)
    taken = skipped = 0
    for record in records:
        if taken == num_clips:
            break
        length = 1 if record.num_frames == 1 else frames
        if record.num_frames < length:
            skipped += 1
            continue
        try:
            clip = read_clip(record.path, length)  # (3, T, H, W)
        except VideoReadError as error:
            print(f"skipping unreadable {error}")
            skipped += 1
            continue
        taken += 1
        yield square_crop(clip, size).unsqueeze(0)  # (1, 3, T, size, size)
    print(f"read {taken} clips, skipped {skipped} (too short or unreadable)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vae", type=Path, required=True, help="VAE folder (model.safetensors + config.json)"
    )
    parser.add_argument("--manifest", type=Path, required=True, help="CSV or JSONL manifest of videos/images")
    parser.add_argument("--num-clips", type=int, default=256)
    parser.add_argument("--frames", type=int, default=17, help="frames per clip, 4k + 1")
    parser.add_argument(
        "--size", type=int, default=64, help="clips are resized and centre-cropped to size x size"
    )
    parser.add_argument("--seed", type=int, default=0, help="which clips are drawn")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    vae = CausalVAE.from_pretrained(args.vae, device=args.device)
    vae.validate_input(args.frames, args.size, args.size)
    clips = manifest_clips(
        args.manifest, num_clips=args.num_clips, frames=args.frames, size=args.size, seed=args.seed
    )
    mean, std = compute_latent_stats(vae, (clip.to(args.device) for clip in clips))
    vae.set_latent_stats(mean, std)
    save_config(vae.cfg, args.vae)
    print("latents_mean", [round(value, 4) for value in mean])
    print("latents_std ", [round(value, 4) for value in std])
    print(f"stored in {args.vae / 'config.json'}")


if __name__ == "__main__":
    main()
