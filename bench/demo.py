"""The demo: generate a gallery with the shipped model and score it from the pixels alone.

Every generation mode the demo shows runs through `dit.pipeline.Pipeline` (what generate.py uses);
every output is read back by `data.evaluate.describe` and compared with its prompt. Two numbers the
evaluator does not give are measured here:

- image-to-video fidelity: PSNR of the first generated frame against the conditioning image;
- extension seams: the frame difference across the seam (last given frame -> first new frame) over
  the clip's mean frame difference; 1 means the seam is as smooth as the motion itself.

Gallery files are JSONL: one `GenerationRequest` per line (any of its fields) plus "group" (the row
it is scored in) and, for image-to-video and extension, "input": a synthetic-world scene that is
rendered to the still or clip the request conditions on (its first `input_frames` frames).

    python -m bench.demo                                   # configs/demo/gallery.jsonl -> outputs/demo/gallery
    python -m bench.demo --full --per-group 100            # random prompts: seen, held-out, i2v, extend

A decoder is compared with another on the same samples by keeping the sampled latents once and decoding
them again (the DiT's part, nearly all the time, runs once):

    python -m bench.demo --full --save-latents --out outputs/demo/eval
    python -m bench.demo --decode outputs/demo/eval --vae NEW_VAE --out outputs/demo/eval-new-vae
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GALLERY = ROOT / "configs" / "demo" / "gallery.jsonl"
GROUPS = ("seen", "heldout", "i2v", "extend", "still", "loop")
SEAM_TOLERANCE = 1.5  # target: the seam's frame difference within 1.5x the clip's mean frame difference
PSNR_TARGET = 30.0  # dB, first frame of image-to-video against the conditioning image
LATENTS_SUFFIX = ".latents.safetensors"  # --save-latents: NAME.latents.safetensors beside NAME.mp4


@dataclass
class GalleryItem:
    """One line of a gallery file: a request, the row it is scored in, and the scene its input shows."""

    request: dict
    """GenerationRequest fields (dit/modes.py); "image"/"video" are filled in from `scene`."""
    group: str
    """Row of the results table, e.g. "seen", "heldout", "i2v", "extend"."""
    scene: dict | None = None
    """data.synthetic.Scene fields of the still (i2v, loop) or clip (extend) the request conditions on."""
    input_frames: int = 9
    """Frames of the rendered input clip (extend); a still is its first frame."""
    name: str = ""
    """File stem of the output."""


@dataclass
class Result:
    """What one output scored."""

    item: GalleryItem
    path: Path
    attributes: dict = field(default_factory=dict)
    """data.evaluate.compare plus "background": True/False per attribute, None where the prompt names none."""
    psnr: float | None = None
    """i2v: first frame against the conditioning image, dB."""
    seam_ratio: float | None = None
    """extend: frame difference across the seam / the clip's mean frame difference."""
    seconds: float = 0.0


def read_gallery(path: Path) -> list[GalleryItem]:
    """Gallery items from a JSONL file ('#' lines and blank lines skipped)."""
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        values = json.loads(line)
        group, scene = values.pop("group", "gallery"), values.pop("input", None)
        input_frames = values.pop("input_frames", 9)
        items.append(GalleryItem(request=values, group=group, scene=scene, input_frames=input_frames,
                                 name=f"{number:03d}_{group}"))
    return items


FULL_GROUPS = ("seen", "heldout", "i2v", "extend")
NOISE_DRAW_STRIDE = 1000
"""--noise-draws: draw j of an item samples from its seed + 1000 j."""


def draw_items(per_group: int, *, seed: int) -> list[GalleryItem]:
    """Random evaluation prompts: `per_group` each of seen and held-out text-to-video, image-to-video
    from a rendered still (prompt names the motion) and forward extension of a rendered moving clip."""
    from data.synthetic import caption, sample_scene

    rng = random.Random(seed)
    items = []
    for index in range(per_group):
        for group in ("seen", "heldout"):
            scene = sample_scene(rng, split="train" if group == "seen" else "heldout")
            items.append(GalleryItem(request={"prompt": caption(scene, rng), "seed": index}, group=group,
                                     name=f"{group}_{index:04d}"))
        scene = sample_scene(rng, split="train")
        items.append(GalleryItem(request={"prompt": caption(scene, rng), "mode": "i2v", "seed": index},
                                 group="i2v", scene=_scene_dict(scene), name=f"i2v_{index:04d}"))
        while scene.motion == "static":  # a static clip has no frame difference to compare the seam with
            scene = sample_scene(rng, split="train")
        items.append(GalleryItem(request={"prompt": caption(scene, rng), "mode": "extend", "context_frames": 9,
                                          "seed": index},
                                 group="extend", scene=_scene_dict(scene), name=f"extend_{index:04d}"))
    return items


def under_noise(items: list[GalleryItem], *, offset: int, draws: int) -> list[GalleryItem]:
    """Each item once per noise draw, draw by draw: draw j samples from the item's seed (0 if it names none,
    the request's default) + offset + NOISE_DRAW_STRIDE j, and is named NAME_drawJ after the first."""
    out = []
    for draw in range(draws):
        for item in items:
            seed = item.request.get("seed", 0) + offset + NOISE_DRAW_STRIDE * draw
            name = f"{item.name}_draw{draw}" if draw else item.name
            out.append(replace(item, name=name, request={**item.request, "seed": seed}))
    return out


def _scene_dict(scene) -> dict:  # noqa: ANN001 (data.synthetic.Scene, imported lazily)
    import dataclasses

    return dataclasses.asdict(scene)


def render_input(item: GalleryItem, folder: Path, *, frames: int, size: tuple[int, int]) -> Path | None:
    """Write the still (png) or clip (mp4) of the item's scene; None when it conditions on nothing."""
    from data.synthetic import Scene, render
    from data.video_io import write_video

    if item.scene is None:
        return None
    scene = Scene(**item.scene)
    if item.request.get("mode") == "extend":
        video = render(scene, frames=frames, size=size)[:, : item.input_frames]  # (3, T_in, H, W)
        return write_video(folder / f"{item.name}_input.mp4", video, fps=8.0)
    still = render(scene, frames=frames, size=size)[:, :1]  # (3, 1, H, W): where the clip starts
    return write_video(folder / f"{item.name}_input.png", still, fps=1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1], with the peak at the full 0-255 range."""
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def seam_ratio(video: torch.Tensor, seam: int) -> float:
    """Mean absolute difference between frames seam-1 and seam, over the mean over all consecutive
    frame pairs of the (3, T, H, W) clip."""
    differences = (video[:, 1:] - video[:, :-1]).abs().mean(dim=(0, 2, 3))  # (T-1,)
    return float(differences[seam - 1] / differences.mean().clamp_min(1e-8))


def run_item(pipe, item: GalleryItem, out_dir: Path, *, save_latents: bool = False) -> Result:  # noqa: ANN001
    """Generate one item, write it with a sidecar that data.evaluate reads (and with `save_latents` its
    sampled latents, NAME.latents.safetensors, for `decode_item`), and score it."""
    from dit.modes import GenerationRequest

    defaults = pipe.config.defaults
    request = dict(item.request)
    source = render_input(item, out_dir / "inputs", frames=defaults.frames, size=(defaults.height, defaults.width))
    if source is not None:
        request["video" if request.get("mode") == "extend" else "image"] = str(source)
    start = time.perf_counter()
    sample = pipe.generate(GenerationRequest(**request), progress=False)[0]
    if save_latents:
        from safetensors.torch import save_file

        save_file({"latents": sample.latents.contiguous()}, out_dir / f"{item.name}{LATENTS_SUFFIX}")
    return _write_and_score(item, sample.video, sample.request, source, out_dir, start)


def decode_item(pipe, latents_path: Path, out_dir: Path) -> Result:  # noqa: ANN001 (dit.pipeline.Pipeline)
    """An output of an earlier run with `save_latents` (its NAME.latents.safetensors, beside NAME.json),
    decoded again by `pipe`'s VAE, written and scored: a decoder measured on the very samples another decoder
    was, without sampling them again."""
    from safetensors.torch import load_file

    from dit.modes import GenerationRequest

    name = latents_path.name.removesuffix(LATENTS_SUFFIX)
    values = json.loads(latents_path.with_name(f"{name}.json").read_text())
    group, request = values.pop("group"), GenerationRequest(**values)
    latents = load_file(latents_path)["latents"]  # (C, T', H', W')
    start = time.perf_counter()
    video = pipe.decode(latents[None])[0].float().cpu()  # (3, T, H, W)
    source = request.video if request.mode == "extend" else request.image
    item = GalleryItem(request=request.to_dict(), group=group, name=name)
    return _write_and_score(item, video, request, None if source is None else Path(source), out_dir, start)


def _write_and_score(item: GalleryItem, video: torch.Tensor, request, source: Path | None, out_dir: Path,  # noqa: ANN001
                     start: float) -> Result:
    """Write a (3, T, H, W) output with its sidecar, and score it against its (resolved) request."""
    from data.evaluate import compare, describe, parse_prompt
    from data.video_io import read_frames, write_video

    suffix = ".png" if video.shape[1] == 1 else ".mp4"
    path = write_video(out_dir / f"{item.name}{suffix}", video, fps=request.fps)
    sidecar = {"prompt": request.prompt, "group": item.group, **request.to_dict()}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    named, seen = parse_prompt(request.prompt), describe(video)
    attributes = {**compare(named, seen), "background": None if named["background"] is None
                  else seen["background"] == named["background"]}
    result = Result(item=item, path=path, attributes=attributes, seconds=time.perf_counter() - start)
    if request.mode == "i2v":
        result.psnr = psnr(video[:, 0], read_frames(source, [0])[:, 0])
    if request.mode == "extend" and request.direction == "forward":
        result.seam_ratio = seam_ratio(video, request.context_frames)
    return result


def results_table(results: list[Result]) -> str:
    """Per group: count, match rate per attribute (and background), and the i2v / extension measures."""
    from data.evaluate import ATTRIBUTES

    columns = (*ATTRIBUTES, "background")
    groups: dict[str, list[Result]] = {}
    for result in results:
        groups.setdefault(result.item.group, []).append(result)
    header = f"{'group':<9} {'n':>4} " + " ".join(f"{a[:7]:>7}" for a in columns) + "   extra"
    lines = [header, "-" * (len(header) + 30)]
    for group, members in sorted(groups.items(), key=lambda kv: _group_order(kv[0])):
        cells = []
        for attribute in columns:
            scored = [r.attributes[attribute] for r in members if r.attributes.get(attribute) is not None]
            cells.append(f"{100 * sum(scored) / len(scored):6.1f}%" if scored else f"{'-':>7}")
        lines.append(f"{group:<9} {len(members):>4} " + " ".join(cells) + "   " + _extra(members))
    return "\n".join(lines)


def _group_order(group: str) -> tuple[int, str]:
    return (GROUPS.index(group) if group in GROUPS else len(GROUPS), group)


def _extra(members: list[Result]) -> str:
    psnrs = [r.psnr for r in members if r.psnr is not None]
    seams = [r.seam_ratio for r in members if r.seam_ratio is not None]
    parts = []
    if psnrs:
        passing = sum(p >= PSNR_TARGET for p in psnrs) / len(psnrs)
        parts.append(f"first-frame PSNR mean {sum(psnrs) / len(psnrs):.1f} dB, min {min(psnrs):.1f} dB, "
                     f"{100 * passing:.0f}% >= {PSNR_TARGET:g} dB")
    if seams:
        seams = sorted(seams)
        passing = sum(s <= SEAM_TOLERANCE for s in seams) / len(seams)
        parts.append(f"seam/mean frame diff median {seams[len(seams) // 2]:.2f}, "
                     f"{100 * passing:.0f}% <= {SEAM_TOLERANCE:g}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "weights" / "demo", help="model folder")
    parser.add_argument("--gallery", type=Path, default=DEFAULT_GALLERY, help="gallery JSONL (without --full)")
    parser.add_argument("--full", action="store_true", help="random prompts instead of the gallery file")
    parser.add_argument("--per-group", type=int, default=100, help="--full: samples per group")
    parser.add_argument("--seed", type=int, default=0, help="--full: which prompts and scenes are drawn")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    parser.add_argument("--temporal-guidance", type=float, default=None,
                        help="temporal guidance scale, 0 = off (default: the model's)")
    parser.add_argument("--temporal-guidance-start", type=float, default=None,
                        help="temporal guidance from this share of the steps on, in [0, 1] (default: the model's)")
    parser.add_argument("--cfg-zero-star", action=argparse.BooleanOptionalAction, default=None,
                        help="CFG-Zero*'s scaled unconditional prediction (default: the model's)")
    parser.add_argument("--zero-init-steps", type=int, default=None,
                        help="first steps left at the noise, CFG-Zero*'s zero-init (default: the model's)")
    parser.add_argument("--noise-offset", type=int, default=0,
                        help="added to every item's noise seed: the same prompts and inputs with other noise, "
                             "to measure how far the table moves by noise alone")
    parser.add_argument("--noise-draws", type=int, default=1,
                        help=f"run every item under this many noise draws (draw j adds {NOISE_DRAW_STRIDE} j to "
                             "its seed) and pool them in the table; one draw of 100 prompts moves 5-7 points of "
                             "shape by noise alone (docs/demo.md)")
    parser.add_argument("--groups", nargs="+", choices=FULL_GROUPS, default=None,
                        help="--full: only these groups (default: all)")
    parser.add_argument("--sampler", choices=("euler", "heun", "euler_a"), default=None,
                        help="flow sampler (default: the model's); heun calls the model twice per step, euler_a "
                             "redraws part of the noise at every step")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default outputs/demo/gallery, or outputs/demo/eval with --full)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--save-latents", action="store_true",
                        help=f"also write each output's sampled latents (NAME{LATENTS_SUFFIX}), for --decode")
    parser.add_argument("--vae", type=Path, default=None,
                        help="decode (and encode inputs) with this VAE folder instead of the model's own; it must "
                             "share the model's latent space, e.g. a decoder fine-tune with the encoder frozen")
    parser.add_argument("--decode", type=Path, default=None, metavar="FOLDER",
                        help="sample nothing: decode the latents a --save-latents run left in FOLDER again (with "
                             "--vae's decoder) and score them, so two decoders are compared on the same samples; "
                             "the requests are FOLDER's sidecars, so the options that pick or change them do not apply")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.model / "pipeline.json").is_file():
        parser.error(f"--model {args.model}: no model folder there; train one with `make demo-train`")
    from dit.pipeline import Pipeline

    out_dir = args.out or ROOT / "outputs" / "demo" / ("eval" if args.full else "gallery")
    if args.groups and not args.full:
        parser.error("--groups picks among the random prompts of --full; the gallery file names its own")
    if args.noise_draws < 1:
        parser.error(f"--noise-draws {args.noise_draws}: must be >= 1")
    if args.noise_draws > 1 and args.full and args.per_group > NOISE_DRAW_STRIDE:
        parser.error(f"--noise-draws with --per-group {args.per_group}: the draws' seeds would overlap the items' "
                     f"(at most {NOISE_DRAW_STRIDE} per group)")
    if args.vae is not None and not (args.vae / "config.json").is_file():
        parser.error(f"--vae {args.vae}: no VAE folder there (config.json and model.safetensors, as a model's vae/)")
    if args.decode is not None:
        decoded = sorted(args.decode.glob(f"*{LATENTS_SUFFIX}"))
        if not decoded:
            parser.error(f"--decode {args.decode}: no *{LATENTS_SUFFIX} there; make them with --save-latents")
        if args.out is None or args.out.resolve() == args.decode.resolve():
            parser.error("--decode needs an --out folder of its own (the outputs it reads would be overwritten)")
    items = draw_items(args.per_group, seed=args.seed) if args.full else read_gallery(args.gallery)
    items = [item for item in items if not args.groups or item.group in args.groups]
    items = under_noise(items, offset=args.noise_offset, draws=args.noise_draws)
    for item in items:
        for name, value in (("steps", args.steps), ("guidance_scale", args.guidance_scale),
                            ("temporal_guidance", args.temporal_guidance),
                            ("temporal_guidance_start", args.temporal_guidance_start),
                            ("cfg_zero_star", args.cfg_zero_star), ("zero_init_steps", args.zero_init_steps),
                            ("sampler", args.sampler)):
            if value is not None:
                item.request.setdefault(name, value)
    pipe = Pipeline.from_pretrained(args.model)
    if args.vae is not None:
        from vae.model import CausalVAE

        vae = CausalVAE.from_pretrained(args.vae, dtype=pipe.dtype)
        own = pipe.vae.cfg
        if (vae.cfg.latents_mean, vae.cfg.latents_std) != (own.latents_mean, own.latents_std):
            parser.error(f"--vae {args.vae}: its latent statistics differ from the model's VAE's, so it does not "
                         "read the DiT's latents as they were made; give a decoder trained with the encoder frozen")
        pipe = Pipeline(dit=pipe.dit, vae=vae, text_encoder=pipe.text_encoder, config=pipe.config,
                        device=pipe.device, dtype=pipe.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)

    def outputs():  # one Result at a time, so the progress line can follow them
        if args.decode is not None:
            for path in decoded:
                yield decode_item(pipe, path, out_dir)
        else:
            for item in items:
                yield run_item(pipe, item, out_dir, save_latents=args.save_latents)

    total = len(decoded) if args.decode is not None else len(items)
    results, started = [], time.perf_counter()
    for number, result in enumerate(outputs(), start=1):
        results.append(result)
        if number % 20 == 0 or number == total:
            print(f"{number}/{total} samples, {time.perf_counter() - started:.0f}s", flush=True)
    table = results_table(results)
    (out_dir / "results.txt").write_text(table + "\n")
    print(table)
    seconds = sum(r.seconds for r in results) / len(results)
    inputs = (args.decode or out_dir) / "inputs"  # --decode scores against the inputs its run rendered
    print(f"\n{len(results)} outputs ({seconds:.1f}s each) with sidecars in {out_dir}/; inputs in {inputs}/; "
          f"table in {out_dir}/results.txt; rescore with `python -m data.evaluate {out_dir}`")


if __name__ == "__main__":
    main()
