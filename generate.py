"""Generate videos and images with a trained model folder: every mode from one command.

Each output is written atomically (temporary name, then rename) beside a JSON sidecar holding the
prompt, the seed and every setting, so `--from-json` makes the same output again. Bad input (an
invalid size or frame count, a missing or unreadable input file, an output that exists without
--overwrite, a malformed prompts file) stops before any work with exit code 2 and a message that says
what would work. See `python generate.py --help` for one example per mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dit.inputs import check_inputs
from dit.modes import MODES, GenerationRequest, InvalidRequest

if TYPE_CHECKING:  # for the annotation only: run() imports the pipeline when it gets that far
    from dit.pipeline import Sample

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "demo"
CLIP_FORMATS = ("mp4", "gif")
DTYPES = ("float32", "bfloat16", "float16")
REQUEST_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)}

EXAMPLES = """\
examples (one per mode):
  text to video     python generate.py "a red circle moving left on a black background"
  text to image     python generate.py "a large blue square on a gray background" --mode t2i
  image to video    python generate.py "a red circle moving right" --mode i2v --image still.png
  extend forward    python generate.py "a red circle moving right" --mode extend --video clip.mp4 --frames 33
  extend backward   python generate.py "a red circle moving right" --mode extend --direction backward \\
                        --video clip.mp4 --context-frames 9
  looping clip      python generate.py "a green cross moving up on a black background" --mode loop
  keyframes         python generate.py "a yellow circle" --mode keyframes --keyframe 0:start.png --keyframe 16:end.png
  transition        python generate.py "a shape changing colour" --mode transition --video a.mp4 --end-video b.mp4
  video to video    python generate.py "a blue square sliding up" --mode v2v --video clip.mp4 --strength 0.6
  seed interpolate  python generate.py "a red circle" --mode interpolate --seed 0 --seed2 1 --num-samples 5
  many prompts      python generate.py --prompts-file prompts.jsonl --out outputs/batch
  make it again     python generate.py --from-json outputs/000_a-red-circle_seed0.json --overwrite

sizes: frames must be 4k+1 (1, 5, 9, 17, 33, ...), height and width multiples of 16 for the default
models; or give --resolution 480p --aspect-ratio 16:9 --duration 2 --fps 16 and they are rounded to
valid values. A prompts file holds one prompt per line, or JSON objects with per-line options (any
request field: {"prompt": "...", "seed": 3, "mode": "i2v", "image": "a.png"}); '#' lines are skipped.
"""


class UsageError(Exception):
    """A problem with the command line or its files: printed without a traceback, exit code 2."""


# ---------------------------------------------------------------------------------------------------------
# Command line -> requests
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate.py", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # Request options default to None: "not given", so a --from-json or prompts-file value stands.
    what = parser.add_argument_group("what to generate")
    what.add_argument("prompt", nargs="?", default=None, help="the text prompt (or use --prompts-file)")
    what.add_argument("--prompt", dest="prompt_option", default=None, metavar="PROMPT",
                      help="the text prompt, as an option (same as the positional)")
    what.add_argument("--mode", choices=MODES, default=None, help="generation mode (default t2v)")
    what.add_argument("--negative-prompt", default=None, help="what guidance steers away from")
    what.add_argument("--prompts-file", type=Path, default=None,
                      help="one prompt per line, or JSONL lines with per-line options")
    what.add_argument("--from-json", type=Path, default=None,
                      help="a sidecar JSON written beside an earlier output: make it again")
    size = parser.add_argument_group("size (explicit, or from resolution/aspect ratio/duration)")
    size.add_argument("--height", type=int, default=None)
    size.add_argument("--width", type=int, default=None)
    size.add_argument("--frames", type=int, default=None, help="4k+1 frames; 1 is an image")
    size.add_argument("--resolution", default=None, help="short side, e.g. 480p or 256")
    size.add_argument("--aspect-ratio", default=None, help="WIDTH:HEIGHT, e.g. 16:9 (with --resolution)")
    size.add_argument("--duration", type=float, default=None, help="seconds (with --fps)")
    size.add_argument("--fps", type=float, default=None, help="output frame rate; input clips are sampled at it")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=None)
    sampling.add_argument("--sampler", default=None, help="euler, heun or euler_a (flow models; euler_a redraws noise every step), ddpm or ddim (DDPM models)")
    sampling.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance; 1 = off")
    sampling.add_argument("--guidance-rescale", type=float, default=None)
    sampling.add_argument("--temporal-guidance", type=float, default=None,
                          help="steer away from the model's frame-by-frame prediction so the frames agree "
                               "(0 = off; one more model call per step; the demo model's default: see its pipeline.json)")
    sampling.add_argument("--temporal-guidance-start", type=float, default=None,
                          help="temporal guidance only from this share of the steps on, in [0, 1]: 0 every step, "
                               "0.5 the less noisy half (half the extra calls)")
    sampling.add_argument("--cfg-zero-star", action=argparse.BooleanOptionalAction, default=None,
                          help="CFG-Zero*: scale the unconditional prediction to best match the conditional one "
                               "before guidance (--no-cfg-zero-star: plain CFG; default: the model's)")
    sampling.add_argument("--zero-init-steps", type=int, default=None,
                          help="flow samplers: leave the noise as it is for this many first steps (CFG-Zero*'s "
                               "zero-init; 0 = none; default: the model's)")
    sampling.add_argument("--shift", type=float, default=None, help="flow-matching timestep shift")
    sampling.add_argument("--seed", type=int, default=None, help="sample i uses seed + i (default 0)")
    sampling.add_argument("--num-samples", type=int, default=None)
    inputs = parser.add_argument_group("inputs of the conditioned modes")
    inputs.add_argument("--image", default=None, help="i2v: the first frame; loop: the frame it loops through")
    inputs.add_argument("--video", default=None, help="extend / v2v: the source clip; transition: the first clip")
    inputs.add_argument("--end-video", default=None, help="transition: the clip to lead into")
    inputs.add_argument("--direction", choices=("forward", "backward"), default=None, help="extend direction")
    inputs.add_argument("--context-frames", type=int, default=None,
                        help="extend / transition: frames taken from each clip (4k+1)")
    inputs.add_argument("--keyframe", dest="keyframes", action="append", default=None, metavar="FRAME:PATH",
                        help="keyframes: a still at output frame FRAME (repeat the option)")
    inputs.add_argument("--strength", type=float, default=None,
                        help="v2v, in (0, 1]: near 0 keeps the source, 1 ignores it")
    inputs.add_argument("--seed2", type=int, default=None, help="interpolate: the seed at the other end")
    inputs.add_argument("--alpha", type=float, default=None, help="interpolate: one point in [0, 1]")
    run = parser.add_argument_group("model, device and output")
    run.add_argument("--model", type=Path, default=None, help=f"model folder (default {DEFAULT_MODEL})")
    run.add_argument("--out", type=Path, default=Path("outputs"),
                     help="output folder, or a file name (.mp4/.gif/.png) for a single output")
    run.add_argument("--format", choices=CLIP_FORMATS, default="mp4", help="file type of clips (images are png)")
    run.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: stop)")
    run.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default float32)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    run.add_argument("--vae-tiling", action="store_true", default=None, help="encode/decode in spatial tiles")
    run.add_argument("--offload", action="store_true", help="keep models on the CPU except while each works")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _request(values: dict, where: str) -> GenerationRequest:
    unknown = sorted(set(values) - REQUEST_FIELDS)
    if unknown:
        raise UsageError(f"{where}: unknown options {unknown}; valid: {sorted(REQUEST_FIELDS)}")
    try:
        return GenerationRequest(**values)
    except (InvalidRequest, TypeError) as err:  # TypeError: a JSON value of the wrong kind
        raise UsageError(f"{where}: {err}") from None


def read_prompts_file(path: Path, base: dict) -> list[GenerationRequest]:
    """One request per line: a plain prompt, or a JSON object of request fields over `base`.

    Input paths on a line are relative to the prompts file's folder, like paths in a manifest.
    """
    if not path.is_file():
        raise UsageError(f"--prompts-file {path}: no such file")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        if line.startswith("{"):
            try:
                options = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        else:
            options = {"prompt": line}
        requests.append(_request({**base, **_relative_to(options, path.parent)}, where))
    if not requests:
        raise UsageError(f"--prompts-file {path}: holds no prompts")
    return requests


def _relative_to(options: dict, folder: Path) -> dict:
    """A line's input paths joined to `folder` (absolute paths stay as they are)."""
    joined = dict(options)
    for name in ("image", "video", "end_video"):
        if isinstance(joined.get(name), str):
            joined[name] = str(folder / joined[name])
    if isinstance(joined.get("keyframes"), list):
        keyframes = []
        for item in joined["keyframes"]:
            frame, sep, path = str(item).partition(":")
            keyframes.append(f"{frame}:{folder / path}" if sep else item)  # a malformed item fails validation
        joined["keyframes"] = keyframes
    return joined


def read_sidecar(path: Path) -> dict:
    try:
        sidecar = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--from-json {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--from-json {path}: not valid JSON ({err.msg})") from None
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("request"), dict):
        raise UsageError(f"--from-json {path}: not a generate.py sidecar (no 'request' object)")
    return sidecar


def requests_from_args(args: argparse.Namespace, sidecar: dict | None) -> list[GenerationRequest]:
    """Precedence, lowest first: field defaults, --from-json, command-line options, prompts-file lines."""
    given = {k: v for k, v in vars(args).items() if k in REQUEST_FIELDS and v is not None}
    base = {**(sidecar["request"] if sidecar else {}), **given}
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise UsageError("give a prompt or --prompts-file, not both")
        return read_prompts_file(args.prompts_file, base)
    return [_request(base, "command line" if sidecar is None else f"--from-json {args.from_json}")]


# ---------------------------------------------------------------------------------------------------------
# Outputs: names, existence checks, atomic writes with a sidecar
# ---------------------------------------------------------------------------------------------------------


def absolute_inputs(request: GenerationRequest) -> GenerationRequest:
    """Input paths made absolute, so the sidecar works from any folder."""
    def absolute(path: str | None) -> str | None:
        return None if path is None else str(Path(path).resolve())

    keyframes = [f"{frame}:{absolute(path)}" for frame, _, path in (k.partition(":") for k in request.keyframes)]
    return dataclasses.replace(request, image=absolute(request.image), video=absolute(request.video),
                               end_video=absolute(request.end_video), keyframes=keyframes)


def slug(prompt: str, limit: int = 40) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-")
    return text or "unconditional"


def output_path(out: Path, index: int, request: GenerationRequest, clip_format: str, single: bool) -> Path:
    """`out` itself for a single output named with a suffix, else OUT/NNN_prompt_seedS[_aA].ext."""
    suffix = ".png" if request.frames == 1 else f".{clip_format}"
    if single:
        return out
    stem = f"{index:03d}_{slug(request.prompt)}_seed{request.seed}"
    if request.mode == "interpolate":
        stem += f"_alpha{request.alpha:.3f}"
    return out / (stem + suffix)


def plan_outputs(outputs: list[GenerationRequest], *, out: Path, clip_format: str, overwrite: bool) -> list[Path]:
    """Every output's path, checked before any work so that a clash stops the run before it costs minutes."""
    single = out.suffix.lower() in (".mp4", ".gif", ".png")
    if single and len(outputs) > 1:
        raise UsageError(f"--out {out}: names one file but this run makes {len(outputs)} outputs; "
                         "give a folder instead")
    paths = [output_path(out, i, one, clip_format, single) for i, one in enumerate(outputs)]
    if single and paths[0].suffix.lower() != (".png" if outputs[0].frames == 1 else f".{clip_format}"):
        wanted = ".png for one frame" if outputs[0].frames == 1 else f".{clip_format} for a clip"
        raise UsageError(f"--out {out}: use {wanted}")
    existing = [str(p) for p in paths if p.exists() or p.with_suffix(".json").exists()]
    if existing and not overwrite:
        raise UsageError(f"outputs exist (kept; pass --overwrite to replace): {', '.join(existing)}")
    return paths


def write_output(path: Path, sample: Sample, *, sidecar: dict) -> None:
    """The media file, then its sidecar; both atomic, and no media file stays without its sidecar."""
    from data.video_io import write_video
    from dit.pipeline import write_json_atomic

    write_video(path, sample.video, fps=sample.request.fps)
    try:
        write_json_atomic(path.with_suffix(".json"), sidecar)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def peak_memory() -> str:
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB CUDA (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt_option is not None:
        if args.prompt is not None:
            parser.error("give the prompt once: positionally or with --prompt")
        args.prompt = args.prompt_option
    try:
        return run(args)
    except (UsageError, InvalidRequest) as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    from dit.modes import expand_request
    from dit.pipeline import Pipeline, read_pipeline_config, read_size_rules, resolve_for_model

    sidecar = read_sidecar(args.from_json) if args.from_json is not None else None
    runtime = sidecar.get("runtime", {}) if sidecar else {}
    requests = requests_from_args(args, sidecar)
    model = args.model or (Path(runtime["model"]) if "model" in runtime else DEFAULT_MODEL)
    if not model.is_dir():
        hint = (" Train the demo model first (`make demo` writes weights/demo), or pass --model DIR with a "
                "folder exported by `python train.py --export RUN_DIR --out DIR`.") if model == DEFAULT_MODEL else ""
        raise UsageError(f"model folder {model} does not exist.{hint}")
    try:
        config, rules = read_pipeline_config(model), read_size_rules(model)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    resolved = [absolute_inputs(resolve_for_model(r, config, rules)) for r in requests]
    for request in resolved:
        check_inputs(request)

    outputs = [one for request in resolved for one in expand_request(request)]
    paths = plan_outputs(outputs, out=args.out, clip_format=args.format, overwrite=args.overwrite)

    # dtype and tiling change the output, so --from-json restores them; the device is this machine's.
    dtype_name = args.dtype or runtime.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise UsageError(f"dtype={dtype_name!r} in {args.from_json}: must be one of {list(DTYPES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae_tiling = args.vae_tiling if args.vae_tiling is not None else bool(runtime.get("vae_tiling", False))
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # its per-file "Loading weights" bars
    pipe = Pipeline.from_pretrained(model, device=device, dtype=getattr(torch, dtype_name), offload=args.offload,
                                    vae_tiling=vae_tiling)
    runtime = {"model": str(model.resolve()), "dtype": dtype_name, "device": device, "vae_tiling": vae_tiling}
    seconds = []
    for one, path in zip(outputs, paths, strict=True):
        (sample,) = pipe.generate(one, progress=not args.quiet)
        write_output(path, sample, sidecar={
            "request": sample.request.to_dict(), "runtime": runtime,
            "diffusion": dataclasses.asdict(pipe.config.diffusion), "seconds": round(sample.seconds, 3)})
        seconds.append(sample.seconds)
        print(f"wrote {path} ({sample.seconds:.2f} s)")
    print(f"{len(seconds)} output(s), {sum(seconds) / len(seconds):.2f} s per sample, peak memory {peak_memory()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
