"""Our causal VAE against diffusers' AutoencoderKLWan at the same config and weights.

Speed and peak memory of encode and decode at several clip lengths:

    python -m bench.vae                                   # CPU: debug preset, 64x64
    python -m bench.vae --device cuda --preset wan2.1 --size 256

Reconstruction quality of a trained VAE (PSNR and SSIM over clips of a manifest):

    python -m bench.vae --weights DIR --manifest CSV [--num-clips 32 --frames 17 --size 64] [--evaluate]

With --evaluate (synthetic-world clips), each clip and its reconstruction are also read by
data.evaluate: the share of clips whose reconstruction reads as the clip does, per attribute, is the
ceiling a DiT on this VAE's latents can reach on the demo's accuracy table.

The table is printed; `--out FILE` also writes it there. docs/benchmarks-vae.md is assembled by hand
from these tables with the prose around them, so no run overwrites it unasked.

Method. Every (implementation, operation, length) runs in a fresh subprocess, so one measurement's
freed memory cannot hide the next one's. After a warm-up on a 5-frame clip, the call is timed with
wall-clock time (CUDA synchronised). Peak memory is the growth over the call: on CUDA,
torch.cuda.max_memory_allocated minus what was allocated before the call; on CPU, the process's
resident set size sampled every 2 ms in a thread, minus the RSS before the call (torch's CPU
allocations are invisible to tracemalloc), in a run with glibc's mmap threshold fixed so that freed
memory leaves the RSS (see EXACT_RSS_ENV); CPU time comes from a separate run without that setting.
Both implementations process the same chunks unless --chunk-latent-frames gives ours larger ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from vae.model import CausalVAE, VAEConfig

DOC = Path("docs/benchmarks-vae.md")


def peer_from(vae: CausalVAE):
    """diffusers' AutoencoderKLWan with our config and our weights."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as error:
        raise SystemExit("the benchmark compares against diffusers: pip install -e '.[dev]'") from error
    from vae.convert import diffusers_key

    cfg = vae.cfg
    peer = AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.latent_channels,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
    )
    peer.load_state_dict({diffusers_key(key, cfg): value for key, value in vae.state_dict().items()})
    return peer.to(next(vae.parameters()).device).eval()


class PeakRSS:
    """Highest resident set size seen while the block runs, sampled in a thread."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._process = psutil.Process()
        self.baseline = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def call(impl: str, op: str, model, inputs: torch.Tensor) -> torch.Tensor:
    if impl == "ours":
        return (
            model.encode(inputs, normalize=False) if op == "encode" else model.decode(inputs, normalize=False)
        )
    return model.encode(inputs).latent_dist.mode() if op == "encode" else model.decode(inputs).sample


def worker(spec: dict) -> dict:
    """One measurement; runs in its own process."""
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    vae = CausalVAE.from_pretrained(spec["weights"], device=device)
    model = vae if spec["impl"] == "ours" else peer_from(vae)
    size, cfg = spec["size"], vae.cfg

    def make_input(frames: int) -> torch.Tensor:
        if spec["op"] == "encode":
            return torch.rand(1, 3, frames, size, size, device=device) * 2 - 1  # (B, 3, T, H, W)
        latent_shape = vae.latent_shape(frames, size, size)
        return torch.randn(1, cfg.latent_channels, *latent_shape, device=device)  # (B, C, T', H', W')

    with torch.inference_mode():
        call(spec["impl"], spec["op"], model, make_input(5))  # warm-up: kernels, allocator
        inputs = make_input(spec["frames"])
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            call(spec["impl"], spec["op"], model, inputs)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() - before
        else:
            with PeakRSS() as rss:
                start = time.perf_counter()
                call(spec["impl"], spec["op"], model, inputs)
                seconds = time.perf_counter() - start
            peak = rss.peak - rss.baseline
    return {"seconds": seconds, "peak_mib": peak / 2**20}


# glibc keeps freed heap memory and grows its mmap threshold, so RSS would count long-dead tensors;
# with a fixed threshold large blocks are mmapped and unmapped on free, and RSS follows live memory.
# The page faults this costs slow the run, so CPU time is measured in a separate run without it.
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def run_in_subprocess(spec: dict, *, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "bench.vae", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if result.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(spec: dict) -> dict:
    if spec["device"] != "cpu":
        return run_in_subprocess(spec)
    timed = run_in_subprocess(spec)
    return {"seconds": timed["seconds"], "peak_mib": run_in_subprocess(spec, env=EXACT_RSS_ENV)["peak_mib"]}


def parity(weights: Path, *, device: str, size: int) -> tuple[float, float]:
    """Relative error of our latents and reconstructions against the peer's on a 17-frame clip."""
    vae = CausalVAE.from_pretrained(weights, device=device)
    peer = peer_from(vae)
    x = torch.rand(1, 3, 17, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    with torch.inference_mode():
        z_peer = peer.encode(x).latent_dist.mode()
        z_ours = vae.encode(x, normalize=False)
        video_peer, video_ours = peer.decode(z_peer).sample, vae.decode(z_peer, normalize=False)
    relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return relative(z_ours, z_peer), relative(video_ours, video_peer)


def speed_table(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    cfg = VAEConfig.from_preset(args.preset, chunk_latent_frames=args.chunk_latent_frames)
    with tempfile.TemporaryDirectory() as folder:
        CausalVAE(cfg).save_pretrained(folder)
        encode_error, decode_error = parity(Path(folder), device=args.device, size=min(args.size, 64))
        rows = []
        for frames in args.frames:
            for op in ("encode", "decode"):
                spec = {
                    "weights": folder,
                    "device": args.device,
                    "size": args.size,
                    "frames": frames,
                    "op": op,
                    "threads": args.threads,
                }
                ours = measure({**spec, "impl": "ours"})
                peer = measure({**spec, "impl": "peer"})
                rows.append(
                    f"| {frames} | {op} | {ours['seconds']:.2f} | {peer['seconds']:.2f} | "
                    f"{peer['seconds'] / ours['seconds']:.2f}x | {ours['peak_mib']:.0f} | {peer['peak_mib']:.0f} |"
                )
                print(rows[-1], flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({args.threads} threads)"
    params = sum(p.numel() for p in CausalVAE(cfg).parameters()) / 1e6
    header = [
        f"Preset `{args.preset}` ({params:.1f}M parameters), {args.size}x{args.size} pixels, batch 1, float32, "
        f"{device_name}, chunk_latent_frames={cfg.chunk_latent_frames}, torch {torch.__version__}.",
        f"Parity on the same weights (17 frames): latents {encode_error:.1e}, reconstructions {decode_error:.1e} "
        "relative L2 error.",
        "",
        "| frames | op | ours (s) | diffusers (s) | speed-up | ours peak (MiB) | diffusers peak (MiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    return "\n".join(header + rows)


def quality_table(args: argparse.Namespace) -> str:
    from vae.losses import ssim
    from vae.stats import manifest_clips

    vae = CausalVAE.from_pretrained(args.weights, device=args.device)
    clips = manifest_clips(
        args.manifest, num_clips=args.num_clips, frames=args.frames[0], size=args.size, seed=0
    )
    from data.evaluate import describe

    psnrs, ssims, readings = [], [], []
    with torch.inference_mode():
        for clip in clips:
            clip = clip.to(args.device)  # (1, 3, T, H, W)
            recon = vae.decode(vae.encode(clip))
            mse = (recon - clip).square().mean().item()
            psnrs.append(10 * math.log10(4.0 / max(mse, 1e-12)))  # peak-to-peak range 2 for [-1, 1]
            ssims.append(ssim(recon, clip).item())
            if args.evaluate:
                readings.append((describe(clip[0]), describe(recon[0])))
    lines = [
        f"Weights `{args.weights}`, {len(psnrs)} clips of {args.frames[0]} frames at {args.size}x{args.size} "
        f"from `{args.manifest}`.",
        "",
        "| PSNR (dB) | SSIM |",
        "| ---: | ---: |",
        f"| {sum(psnrs) / len(psnrs):.2f} | {sum(ssims) / len(ssims):.4f} |",
    ]
    return "\n".join(lines + (_evaluator_agreement(readings) if readings else []))


def _evaluator_agreement(readings: list[tuple[dict, dict]]) -> list[str]:
    """Per attribute, the share of clips whose reconstruction reads as the clip does (clips that read as
    unknown, and motion of stills, are not counted), and what the misread shapes read as."""
    from data.evaluate import ATTRIBUTES, UNKNOWN

    cells, confusions = [], {}
    for attribute in (*ATTRIBUTES, "background"):
        pairs = [(clip[attribute], recon[attribute]) for clip, recon in readings
                 if clip[attribute] not in (None, UNKNOWN)]
        cells.append(f"{100 * sum(a == b for a, b in pairs) / len(pairs):.1f}% of {len(pairs)}" if pairs else "-")
    for clip, recon in readings:
        if clip["shape"] not in (None, UNKNOWN) and recon["shape"] != clip["shape"]:
            key = f"{clip['shape']} -> {recon['shape']}"
            confusions[key] = confusions.get(key, 0) + 1
    return ["", "The reconstruction reads as the clip does (data.evaluate):", "",
            "| " + " | ".join((*ATTRIBUTES, "background")) + " |", "|" + " ---: |" * (len(ATTRIBUTES) + 1),
            "| " + " | ".join(cells) + " |", "",
            "Misread shapes: " + (", ".join(f"{key} ({count})" for key, count in sorted(confusions.items())) or "none")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="debug", help="VAE preset for the speed table")
    parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 65, 129, 257])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady on a shared machine)")
    parser.add_argument(
        "--chunk-latent-frames", type=int, default=1, help="ours: latent frames per time chunk"
    )
    parser.add_argument(
        "--weights", type=Path, help="a trained VAE folder: measure PSNR/SSIM instead of speed"
    )
    parser.add_argument("--manifest", type=Path, help="clips for --weights")
    parser.add_argument("--num-clips", type=int, default=32)
    parser.add_argument("--evaluate", action="store_true",
                        help="with --weights: also compare what data.evaluate reads from each clip and its "
                             "reconstruction (synthetic-world clips)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"also write the table to this markdown file (e.g. a new section for {DOC})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.weights is not None:
        if args.manifest is None:
            parser.error("--weights needs --manifest")
        table, title = quality_table(args), "Reconstruction quality"
    else:
        table, title = speed_table(args), "Speed and memory against diffusers' AutoencoderKLWan"
    command = "python -m bench.vae " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"## {title}\n\n`{command}`\n\n{table}\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
