"""bench.stream: a config's own data stream, loaded with and without the loader's cache, batch for batch."""

from __future__ import annotations

import pytest


def test_pixel_and_latent_streams_compare_equal_batches(tmp_path, capsys):
    from bench.stream import main
    from data.cache import build_cache
    from data.manifest import read_manifest
    from data.synthetic import write_dataset
    from dit.text_encoder import TextEncoder
    from vae.model import CausalVAE, VAEConfig

    manifest = write_dataset(tmp_path / "synth", clips=3, images=2, heldout=0, frames=5, size=32, seed=0, fps=8.0,
                             workers=1)
    buckets = "  buckets: {resolutions: [32px], frame_counts: [1], token_budget: 64, max_batch_size: 2}\n"
    pixels = tmp_path / "vae.yaml"
    pixels.write_text(f"task: vae\ndata:\n  manifest: {manifest}\n{buckets}")
    main(["--config", str(pixels), "--batches", "6", "--decoded-cache-mb", "4"])
    report = capsys.readouterr().out
    assert "decoded cache 4 MiB" in report and "same batches in both passes: yes" in report

    from data.buckets import BucketConfig

    vae = CausalVAE(VAEConfig.from_preset("debug"))
    vae.save_pretrained(tmp_path / "vae")
    cache = build_cache(read_manifest(manifest), vae=vae, text_encoder=TextEncoder.from_pretrained("default"),
                        config=BucketConfig(resolutions=["32px"], frame_counts=[1, 5], token_budget=64),
                        out_dir=tmp_path / "cache", shard_size=2, progress=False)
    latents = tmp_path / "dit.yaml"
    latents.write_text(f"task: dit\nvae_path: {tmp_path / 'vae'}\ndata:\n  latent_cache: {cache}\n")
    main(["--config", str(latents), "--batches", "4"])
    report = capsys.readouterr().out
    assert "shard readers kept open" in report and "same batches in both passes: yes" in report
    with pytest.raises(SystemExit):
        main(["--config", str(latents), "--batches", "0"])
