"""Latent statistics: computed stats normalise the data they came from to zero mean, unit std."""

import json

import torch

from vae.model import CausalVAE, VAEConfig
from vae.stats import compute_latent_stats, main, manifest_clips, square_crop


def assert_normalises(vae: CausalVAE, clips: list[torch.Tensor]) -> None:
    with torch.no_grad():
        z = torch.cat([vae.encode(clip).transpose(0, 1).flatten(1) for clip in clips], dim=1)  # (C, N)
    assert torch.allclose(z.mean(1), torch.zeros(z.shape[0]), atol=1e-4)
    assert torch.allclose(z.std(1, correction=0), torch.ones(z.shape[0]), atol=1e-4)


def test_stats_match_the_pooled_latents_and_normalise_them():
    torch.manual_seed(0)
    vae = CausalVAE(VAEConfig.from_preset("debug")).eval()
    generator = torch.Generator().manual_seed(1)
    clips = [
        torch.rand(2, 3, 5, 16, 16, generator=generator) * 2 - 1,
        torch.rand(1, 3, 1, 24, 16, generator=generator),
    ]
    mean, std = compute_latent_stats(vae, clips)
    with torch.no_grad():
        pooled = torch.cat([vae.encode(c, normalize=False).transpose(0, 1).flatten(1) for c in clips], dim=1)
    assert torch.allclose(torch.tensor(mean), pooled.double().mean(1).float(), atol=1e-6)
    assert torch.allclose(torch.tensor(std), pooled.double().std(1, correction=0).float(), atol=1e-6)
    vae.set_latent_stats(mean, std)
    assert_normalises(vae, clips)


def test_square_crop_keeps_the_centre():
    clip = torch.zeros(3, 2, 20, 40)
    clip[:, :, :, 6:34] = 1.0  # bright around the central square (10..30), dark at the sides
    out = square_crop(clip, 10)
    assert out.shape == (3, 2, 10, 10) and torch.allclose(out, torch.ones_like(out))


def test_cli_writes_stats_into_the_folder(tmp_path):
    from data.manifest import Record, write_manifest
    from data.video_io import write_video

    generator = torch.Generator().manual_seed(0)
    records = []
    for name, frames in (("a.mp4", 9), ("b.mp4", 9), ("short.mp4", 5), ("still.png", 1)):
        video = torch.rand(3, frames, 24, 32, generator=generator) * 2 - 1  # (3, T, H, W)
        write_video(tmp_path / name, video)
        records.append(
            Record(path=str(tmp_path / name), text="", num_frames=frames, height=24, width=32, fps=16.0)
        )
    write_manifest(tmp_path / "data.csv", records)
    torch.manual_seed(0)
    CausalVAE(VAEConfig.from_preset("debug")).save_pretrained(tmp_path / "vae")

    argv = [
        "--vae",
        str(tmp_path / "vae"),
        "--manifest",
        str(tmp_path / "data.csv"),
        "--frames",
        "9",
        "--size",
        "16",
    ]
    main([*argv, "--device", "cpu"])
    stored = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert len(stored["latents_mean"]) == 4 and len(stored["latents_std"]) == 4
    vae = CausalVAE.from_pretrained(tmp_path / "vae")
    clips = list(manifest_clips(tmp_path / "data.csv", num_clips=10, frames=9, size=16, seed=0))
    assert sorted(clip.shape[2] for clip in clips) == [1, 9, 9]  # the 5-frame video is skipped
    assert_normalises(vae, clips)
