"""Generation time and peak memory per sample, resident and with --offload, on random weights.

    python -m bench.generate --device cuda --preset wan2.1-1.3b --height 480 --width 832 --frames 81 --steps 10

Builds a model folder with a random DiT of the given preset and a Wan 2.1-shaped VAE, then generates the
same request twice per mode and reports the second run (the first pays for kernel selection). Random
weights run at the same speed as trained ones. Checks that --offload gives bit-identical output.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from dit.diffusion import DiffusionConfig
from dit.model import DiT, DiTConfig
from dit.modes import GenerationDefaults, GenerationRequest
from dit.pipeline import Pipeline, save_pipeline_folder
from dit.text_encoder import TextEncoder
from vae.model import CausalVAE, VAEConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_folder(folder: str, *, preset: str, vae_preset: str, defaults: GenerationDefaults) -> None:
    text_encoder = TextEncoder.from_pretrained("default")
    torch.manual_seed(0)
    vae = CausalVAE(VAEConfig.from_preset(vae_preset))
    dit = DiT(DiTConfig.from_preset(preset, text_dim=text_encoder.dim, text_len=text_encoder.max_length))
    print(f"DiT {preset}: {dit.num_params() / 1e6:.0f}M parameters; VAE {vae_preset}")
    save_pipeline_folder(folder, dit=dit, vae=vae, diffusion=DiffusionConfig.from_preset("wan"), defaults=defaults)


def measure(folder: str, *, device: str, dtype: torch.dtype, offload: bool) -> tuple[float, float, torch.Tensor]:
    """Seconds per sample (second run) and peak memory in GiB (CUDA allocator; 0 on CPU)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pipe = Pipeline.from_pretrained(folder, device=device, dtype=dtype, offload=offload)
    for _ in range(2):
        (sample,) = pipe.generate(GenerationRequest(prompt="a red circle moving left", seed=0), progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return sample.seconds, peak, sample.video


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--preset", default="base", help="DiT preset (dit/model.py PRESETS)")
    parser.add_argument("--vae-preset", default="wan2.1")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--temporal-guidance", type=float, default=0.0,
                        help="temporal guidance scale; above 0 each step adds a frame-local model call")
    parser.add_argument("--temporal-guidance-start", type=float, default=0.0,
                        help="temporal guidance from this share of the steps on (0.5: the extra call on half of them)")
    parser.add_argument("--cfg-zero-star", action="store_true", help="CFG-Zero*'s scaled unconditional prediction")
    parser.add_argument("--zero-init-steps", type=int, default=0, help="first steps left at the noise (CFG-Zero*)")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    defaults = GenerationDefaults(height=args.height, width=args.width, frames=args.frames, fps=16, steps=args.steps,
                                  temporal_guidance=args.temporal_guidance,
                                  temporal_guidance_start=args.temporal_guidance_start,
                                  cfg_zero_star=args.cfg_zero_star, zero_init_steps=args.zero_init_steps)

    with tempfile.TemporaryDirectory() as folder:
        build_folder(folder, preset=args.preset, vae_preset=args.vae_preset, defaults=defaults)
        rows, videos = [], {}
        for offload in (False, True):
            seconds, peak, videos[offload] = measure(folder, device=args.device, dtype=dtype, offload=offload)
            rows.append(f"| `{args.preset}` | {args.height}×{args.width}×{args.frames} | "
                        f"{'`--offload`' if offload else 'resident'} | {seconds:.2f} | {peak:.2f} GiB |")
    print("| DiT | size | mode | s/sample | peak memory |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"--offload output identical to resident: {torch.equal(videos[False], videos[True])}")


if __name__ == "__main__":
    main()
