"""How fast is the data pipeline? Decoding per backend, loader workers, cached vs on-the-fly steps.

    python -m bench.data                      # prints a markdown report
    python -m bench.data --quick --out /tmp/b.md

docs/benchmarks-data.md collects the reports and says what they mean.

1. Decode: clips/s reading a T-frame clip at a target fps from a random start, per backend
   (decord, PyAV) on the same files.
2. Loader: samples/s of one epoch of ``VideoDataset`` (decode, resize, crop, collate) through a
   DataLoader with 0, 1 and 2 workers, worker start-up included.
3. Training step: seconds per DiT step when the batch comes from pixels (decode + VAE encode + text
   encode on the fly) and from a latent cache (``data.cache``); the DiT step itself is identical.
   The VAE and DiT are presets (``--vae``, ``--dit``) with random weights: speed does not depend on
   the values.

Source clips are the synthetic world (``data.synthetic``) written at the requested size and rate.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import random
import shlex
import sys
import tempfile
import time

import torch


def decode_throughput(records, *, frames: int, fps: float, rounds: int) -> dict[str, float]:
    """Clips per second for each installed backend, same clips and starts for all."""
    from data.video_io import VideoInfo, available_backends, clip_indices, read_frames

    rng = random.Random(0)
    jobs = []
    for _ in range(rounds):
        for record in records:
            info = VideoInfo(record.num_frames, record.fps, record.height, record.width, is_image=False)
            span = clip_indices(info, frames, fps=fps)[-1] + 1
            jobs.append(
                (
                    record.path,
                    clip_indices(info, frames, fps=fps, start=rng.randrange(info.num_frames - span + 1)),
                )
            )
    results = {}
    for backend in available_backends():
        read_frames(jobs[0][0], jobs[0][1], backend=backend)  # warm-up: library loading, first open
        start = time.perf_counter()
        for path, indices in jobs:
            read_frames(path, indices, backend=backend)  # (3, T, H, W)
        results[backend] = len(jobs) / (time.perf_counter() - start)
    return results


def loader_throughput(records, config, *, workers: list[int], epochs: int) -> dict[int, float]:
    """Samples per second through a DataLoader for each worker count (start-up included)."""
    from data.dataset import VideoDataset, make_loader

    dataset = VideoDataset(records, config)
    results = {}
    for num_workers in workers:
        sampler = dataset.sampler()
        samples = 0
        start = time.perf_counter()
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            for batch in make_loader(dataset, sampler, num_workers=num_workers):
                samples += batch["video"].shape[0]
        results[num_workers] = samples / (time.perf_counter() - start)
    return results


def step_times(
    records,
    config,
    *,
    cache_dir: pathlib.Path,
    steps: int,
    device: str,
    vae_preset: str,
    dit_preset: str,
    workers: int,
) -> dict[str, float]:
    """Seconds per training step from pixels (encode on the fly) and from a latent cache."""
    from data.cache import CachedLatentDataset, build_cache, collate_latents
    from data.dataset import VideoDataset, make_loader
    from dit.model import DiT, DiTConfig
    from dit.text_encoder import TextEncoder
    from vae.model import CausalVAE, VAEConfig

    torch.manual_seed(0)
    vae = CausalVAE(VAEConfig.from_preset(vae_preset)).to(device).eval()
    text_encoder = TextEncoder.from_pretrained("default", device=device)
    channels = vae.cfg.latent_channels
    dit_config = DiTConfig.from_preset(
        dit_preset,
        in_channels=channels,
        out_channels=channels,
        text_dim=text_encoder.dim,
        text_len=text_encoder.max_length,
    )
    model = DiT(dit_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(latents, hidden, mask):
        # One flow-matching step: x_σ = (1 − σ)·x0 + σ·ε, target ε − x0.
        sigma = torch.rand(latents.shape[0], device=device)  # (B,)
        noise = torch.randn_like(latents)  # (B, C, T', H', W')
        s = sigma.view(-1, 1, 1, 1, 1)
        prediction = model((1 - s) * latents + s * noise, 1000 * sigma, hidden, mask)  # (B, C, T', H', W')
        loss = torch.nn.functional.mse_loss(prediction.float(), noise - latents)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(batches, to_inputs) -> float:
        iterator = iter(batches)
        train_step(*to_inputs(next(iterator)))  # warm-up step, not timed
        _sync(device)
        start, done = time.perf_counter(), 0
        for batch in iterator:
            train_step(*to_inputs(batch))
            done += 1
            if done == steps:
                break
        _sync(device)
        return (time.perf_counter() - start) / max(done, 1)

    @torch.no_grad()
    def from_pixels(batch):
        latents = vae.encode(batch["video"].to(device))  # (B, C, T', H', W')
        hidden, mask = text_encoder.encode(batch["text"])  # (B, S, Dt), (B, S)
        return latents, hidden, mask

    def from_cache(batch):
        return (
            batch["latents"].to(device).float(),
            batch["text_hidden"].to(device),
            batch["text_mask"].to(device),
        )

    pixels = VideoDataset(records, config)
    start = time.perf_counter()
    build_cache(
        records,
        vae=vae,
        text_encoder=text_encoder,
        config=config,
        out_dir=cache_dir,
        device=device,
        progress=False,
    )
    build_seconds = (time.perf_counter() - start) / len(records)
    cache = CachedLatentDataset(cache_dir)
    return {
        "cache build, once (s/sample)": build_seconds,
        "on the fly (s/step)": timed(
            _repeat(lambda: make_loader(pixels, pixels.sampler(), num_workers=workers)), from_pixels
        ),
        "cached (s/step)": timed(
            _repeat(
                lambda: make_loader(cache, cache.sampler(), num_workers=workers, collate_fn=collate_latents)
            ),
            from_cache,
        ),
    }


def _repeat(make_iterable):
    while True:
        yield from make_iterable()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=12, help="source clips")
    parser.add_argument("--source-frames", type=int, default=65, help="frames per source clip")
    parser.add_argument("--source-fps", type=float, default=24.0)
    parser.add_argument("--size", type=int, default=256, help="source clip side in pixels")
    parser.add_argument("--frames", type=int, default=17, help="frames per training clip")
    parser.add_argument("--fps", type=float, default=12.0, help="training frame rate")
    parser.add_argument("--resolution", default="128px", help="training bucket area")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per path")
    parser.add_argument("--vae", default="debug", help="VAE preset (random weights) for encoding")
    parser.add_argument("--dit", default="debug", help="DiT preset (random weights) for the training step")
    parser.add_argument(
        "--loader-workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts to time"
    )
    parser.add_argument("--loader-epochs", type=int, default=2, help="epochs per loader timing")
    parser.add_argument("--step-workers", type=int, default=0, help="loader workers during the step timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--out", help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips, args.source_frames, args.size, args.resolution, args.steps = 4, 33, 64, "64px", 2

    from data.buckets import BucketConfig
    from data.manifest import read_manifest
    from data.synthetic import write_dataset

    # One bucket and a fixed batch of 4, so that both step timings compare like for like.
    config = BucketConfig(
        resolutions=[args.resolution],
        frame_counts=[args.frames],
        fps=args.fps,
        token_budget=10**9,
        max_batch_size=4,
    )
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        manifest = write_dataset(
            scratch / "clips",
            clips=args.clips,
            images=0,
            heldout=0,
            frames=args.source_frames,
            size=args.size,
            seed=0,
            fps=args.source_fps,
        )
        records = read_manifest(manifest)
        decode = decode_throughput(records, frames=args.frames, fps=args.fps, rounds=3)
        loader = loader_throughput(records, config, workers=args.loader_workers, epochs=args.loader_epochs)
        steps = step_times(
            records,
            config,
            cache_dir=scratch / "cache",
            steps=args.steps,
            device=args.device,
            vae_preset=args.vae,
            dit_preset=args.dit,
            workers=args.step_workers,
        )

    batch = config.batch_size(config.buckets()[0])
    command = "python -m bench.data " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    lines = [
        "# Data pipeline benchmarks",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, device `{args.device}`"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f", torch {torch.__version__}, Python {platform.python_version()}  ",
        f"Sources: {args.clips} synthetic clips, {args.source_frames} frames at {args.source_fps:g} fps, "
        f"{args.size}x{args.size} H.264. Training clips: {args.frames} frames at {args.fps:g} fps, "
        f"bucket {config.buckets()[0].name}, batch {batch}.",
        "",
        "## Decode (one clip = read_frames of a random-start clip)",
        "",
        "| backend | clips/s |",
        "| --- | ---: |",
        *(f"| {name} | {rate:.1f} |" for name, rate in decode.items()),
        "",
        f"## Loader (decode + resize + crop + collate, {args.loader_epochs} epochs, worker start-up included)",
        "",
        "| workers | samples/s |",
        "| ---: | ---: |",
        *(f"| {workers} | {rate:.1f} |" for workers, rate in loader.items()),
        "",
        f"## Training step ({args.vae} VAE, {args.dit} DiT, random weights, loader with {args.step_workers} workers)",
        "",
        "| what | seconds |",
        "| --- | ---: |",
        *(f"| {name} | {seconds:.3f} |" for name, seconds in steps.items()),
        "",
        f"Speed-up from the cache: {steps['on the fly (s/step)'] / steps['cached (s/step)']:.1f}x.",
        "",
    ]
    print("\n".join(lines))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
