"""The synthetic world: one coloured shape moving on a plain background, with captions.

Every sample is a `Scene` (what is shown) rendered by a pure function into pixels (3, T, H, W) in
[-1, 1]. The vocabularies are small and well separated so that `data/evaluate.py` can read every
attribute back from the pixels alone, which makes "does the model follow the prompt?" a number.

A fixed set of (colour, shape, motion) combinations (HELDOUT_COMBOS) never occurs in the "train"
split; the "heldout" split uses only those, to test whether a model composes attributes it has seen
separately.

    python -m data.synthetic --out data/synth --clips 2000 --images 500 --frames 17 --size 64
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import pathlib
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.video_io import write_video

# Well separated in RGB (every pair >= 150 apart, every colour >= 140 from every background) so that
# H.264's chroma subsampling cannot turn one into another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 180, 20),
    "blue": (30, 50, 220),
    "yellow": (230, 210, 20),
    "cyan": (20, 200, 210),
    "magenta": (200, 30, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Half the side of the shape's bounding box, as a fraction of min(H, W): 15 and 28 pixels wide at 64x64.
SIZES: dict[str, float] = {"small": 0.12, "large": 0.22}
MOTIONS = ("left", "right", "up", "down", "static")
# Unit vector of each motion in (x, y) image coordinates (y grows downwards).
MOTION_DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0),
}
# A moving shape travels this fraction of the frame along its axis over the whole clip, whatever the
# frame count, so every trajectory fits and the motion is obvious at 17 frames as at 5.
TRAVEL = 0.35
# The cross's arms are this fraction of its half-extent thick on each side of the centre line.
CROSS_ARM = 0.38
SPLITS = ("train", "heldout")

# Each colour, shape and motion appears in two or three held-out combinations and in many training
# ones, so the held-out split tests composition, not unseen words.
HELDOUT_COMBOS: frozenset[tuple[str, str, str]] = frozenset({
    ("red", "triangle", "up"), ("red", "cross", "static"),
    ("green", "circle", "left"), ("green", "square", "down"),
    ("blue", "triangle", "right"), ("blue", "cross", "left"),
    ("yellow", "square", "up"), ("yellow", "circle", "static"),
    ("cyan", "cross", "down"), ("cyan", "triangle", "left"),
    ("magenta", "circle", "right"), ("magenta", "square", "static"),
})

# Words for each value, first = the canonical one. The evaluator parses prompts with the same table.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk", "ball"),
    "square": ("square", "block"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moving left", "sliding to the left", "drifting leftward"),
    "right": ("moving right", "sliding to the right", "drifting rightward"),
    "up": ("moving up", "sliding upward", "rising up"),
    "down": ("moving down", "sliding downward", "falling down"),
    "static": ("standing still", "not moving", "resting motionless"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {"black": ("black",), "gray": ("gray", "grey"), "white": ("white",)}
CLIP_TEMPLATES = (
    "a {size} {colour} {shape} {motion} on a {background} background",
    "a {colour} {shape} {motion} on a {background} background",
    "a {size} {colour} {shape} {motion} over a {background} backdrop",
    "{background} background, a {size} {colour} {shape} {motion}",
    "a {colour} {shape}, {size}, {motion} against a {background} screen",
)
IMAGE_TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} over a {background} backdrop",
    "{background} background with a {size} {colour} {shape}",
)


def is_heldout(colour: str, shape: str, motion: str | None) -> bool:
    """Whether this combination is reserved for the held-out split (stills never are)."""
    return (colour, shape, motion) in HELDOUT_COMBOS


@dataclass(frozen=True)
class Scene:
    """What one sample shows; rendering it needs only a frame count and a frame size."""

    colour: str
    """Shape colour, a key of COLOURS."""
    shape: str
    """One of SHAPES."""
    size: str
    """A key of SIZES."""
    motion: str | None
    """One of MOTIONS, or None for a still image (its caption names no motion)."""
    background: str
    """A key of BACKGROUNDS."""
    start_x: float
    """Where the shape starts across the range that keeps its whole path inside the frame: 0 = leftmost."""
    start_y: float
    """As start_x, vertically: 0 = top."""

    def __post_init__(self):
        for field, value, allowed in (("colour", self.colour, tuple(COLOURS)), ("shape", self.shape, SHAPES),
                                      ("size", self.size, tuple(SIZES)), ("motion", self.motion, (*MOTIONS, None)),
                                      ("background", self.background, tuple(BACKGROUNDS))):
            if value not in allowed:
                raise ValueError(f"{field}={value!r}: must be one of {list(allowed)}")
        for field, value in (("start_x", self.start_x), ("start_y", self.start_y)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field}={value}: must be in [0, 1]")


def sample_scene(rng: random.Random, *, split: str, still: bool = False) -> Scene:
    """A random scene of `split`: "train" never draws a held-out combination, "heldout" only those."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {list(SPLITS)}")
    if still and split == "heldout":
        raise ValueError("still=True with split='heldout': held-out combinations include a motion, stills have none")
    if split == "heldout":
        colour, shape, motion = rng.choice(sorted(HELDOUT_COMBOS))
    else:
        while True:  # rejection keeps the other combinations uniform
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            motion = None if still else rng.choice(MOTIONS)
            if not is_heldout(colour, shape, motion):
                break
    return Scene(colour=colour, shape=shape, size=rng.choice(list(SIZES)), motion=motion,
                 background=rng.choice(list(BACKGROUNDS)), start_x=rng.random(), start_y=rng.random())


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption from a random template and random synonyms; names colour, shape, background, motion
    (clips only) and, in most templates, size."""
    templates = IMAGE_TEMPLATES if scene.motion is None else CLIP_TEMPLATES
    words = {
        "colour": scene.colour,
        "shape": rng.choice(SHAPE_WORDS[scene.shape]),
        "size": rng.choice(SIZE_WORDS[scene.size]),
        "background": rng.choice(BACKGROUND_WORDS[scene.background]),
        "motion": "" if scene.motion is None else rng.choice(MOTION_PHRASES[scene.motion]),
    }
    return rng.choice(templates).format(**words)


def parse_size(size: int | str | tuple[int, int]) -> tuple[int, int]:
    """(H, W) from 64, "64", "96x64" (H x W) or (96, 64)."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"size={size!r}: must be an int like '64' or 'HxW' like '96x64'")
        size = tuple(int(part) for part in parts) if len(parts) == 2 else int(parts[0])
    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) < 8:
        raise ValueError(f"size={size!r}: height and width must be >= 8 pixels")
    return height, width


def shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, half: float | torch.Tensor) -> torch.Tensor:
    """Inside test for a shape whose bounding box is [-half, half]^2 around the offsets (dx, dy).

    Every shape fills the same box, so the box's centre and side give a shape's centre and size
    whatever it is (the evaluator relies on this). The triangle points up with its base at the bottom.
    """
    if shape == "circle":
        return dx.square() + dy.square() <= half * half
    if shape == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "triangle":
        return (dy <= half) & (dx.abs() <= (dy + half) / 2)
    if shape == "cross":
        arm = CROSS_ARM * half
        return ((dx.abs() <= arm) & (dy.abs() <= half)) | ((dy.abs() <= arm) & (dx.abs() <= half))
    raise ValueError(f"shape={shape!r}: must be one of {list(SHAPES)}")


def trajectory(scene: Scene, *, frames: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pixel centre (x, y) of the shape in each frame, each (T,), and its half-extent in pixels."""
    height, width = size
    half = SIZES[scene.size] * min(height, width)
    step_x, step_y = MOTION_DIRECTIONS[scene.motion or "static"]
    travel_x, travel_y = TRAVEL * width * abs(step_x), TRAVEL * height * abs(step_y)
    # The start range leaves room for the whole path: a shape moving left starts at least travel_x from the left.
    lo_x, hi_x = half + (travel_x if step_x < 0 else 0), width - half - (travel_x if step_x > 0 else 0)
    lo_y, hi_y = half + (travel_y if step_y < 0 else 0), height - half - (travel_y if step_y > 0 else 0)
    start_x, start_y = lo_x + scene.start_x * (hi_x - lo_x), lo_y + scene.start_y * (hi_y - lo_y)
    progress = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)  # (T,), [0.] for a still
    centre_x = start_x + step_x * travel_x * progress  # (T,)
    centre_y = start_y + step_y * travel_y * progress  # (T,)
    return centre_x, centre_y, half


# Sub-pixel samples per axis: edges are anti-aliased by coverage, like a real camera's.
_SUPERSAMPLE = 4


@functools.lru_cache(maxsize=8)
def _sample_grid(height: int, width: int, supersample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-pixel sample positions in pixel units (pixel i spans [i, i+1)): (H*s, 1) and (1, W*s)."""
    ys = (torch.arange(height * supersample, dtype=torch.float32) + 0.5) / supersample
    xs = (torch.arange(width * supersample, dtype=torch.float32) + 0.5) / supersample
    return ys[:, None], xs[None, :]


def coverage(shape: str, centre_x: torch.Tensor, centre_y: torch.Tensor, half: float | torch.Tensor,
             size: tuple[int, int], *, supersample: int = _SUPERSAMPLE) -> torch.Tensor:
    """Fraction of each pixel covered by the shape in each frame: (T, H, W) in [0, 1].

    `supersample` sub-pixel samples per axis anti-alias the edges; the evaluator uses fewer for speed.
    """
    ys, xs = _sample_grid(*size, supersample)
    dx = xs[None] - torch.as_tensor(centre_x, dtype=torch.float32).reshape(-1, 1, 1)  # (T, 1, W*s)
    dy = ys[None] - torch.as_tensor(centre_y, dtype=torch.float32).reshape(-1, 1, 1)  # (T, H*s, 1)
    if isinstance(half, torch.Tensor):
        half = half.float().reshape(-1, 1, 1)  # (T, 1, 1)
    inside = shape_mask(shape, dx, dy, half).float()  # (T, H*s, W*s)
    return F.avg_pool2d(inside[:, None], supersample)[:, 0]  # (T, H, W)


def render(scene: Scene, *, frames: int, size: int | tuple[int, int]) -> torch.Tensor:
    """The scene as pixels (3, T, H, W) in [-1, 1]; size is H = W or (H, W)."""
    if frames < 1:
        raise ValueError(f"frames={frames}: must be >= 1")
    height, width = parse_size(size)
    centre_x, centre_y, half = trajectory(scene, frames=frames, size=(height, width))
    alpha = coverage(scene.shape, centre_x, centre_y, half, (height, width))[None]  # (1, T, H, W)
    shape_rgb = torch.tensor(COLOURS[scene.colour], dtype=torch.float32).reshape(3, 1, 1, 1) / 127.5 - 1
    background_rgb = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32).reshape(3, 1, 1, 1) / 127.5 - 1
    return background_rgb + alpha * (shape_rgb - background_rgb)  # (3, T, H, W)


# ----------------------------------------------------------------------------- the dataset writer

MANIFEST_COLUMNS = ("path", "text", "num_frames", "height", "width", "aspect_ratio", "fps",
                    "split", "colour", "shape", "size", "motion", "background")


@dataclass(frozen=True)
class _Job:
    index: int
    kind: str  # "clip" or "image"
    split: str
    seed: int
    frames: int
    size: tuple[int, int]
    fps: float
    out: pathlib.Path


def _make_sample(job: _Job) -> dict[str, str | int | float]:
    """Render, write and describe one sample. Its randomness depends only on (seed, kind, split, index),
    so the dataset is identical whatever the worker count."""
    rng = random.Random(f"{job.seed}/{job.kind}/{job.split}/{job.index}")
    still = job.kind == "image"
    scene = sample_scene(rng, split=job.split, still=still)
    frames = 1 if still else job.frames
    relative = (f"images/{job.index:06d}.png" if still else f"clips/{job.split}_{job.index:06d}.mp4")
    write_video(job.out / relative, render(scene, frames=frames, size=job.size), fps=job.fps)
    height, width = job.size
    return {
        "path": relative, "text": caption(scene, rng), "num_frames": frames, "height": height, "width": width,
        "aspect_ratio": round(height / width, 6), "fps": 1.0 if still else job.fps, "split": job.split,
        "colour": scene.colour, "shape": scene.shape, "size": scene.size, "motion": scene.motion or "none",
        "background": scene.background,
    }


def write_dataset(out: str | pathlib.Path, *, clips: int, images: int, heldout: int, frames: int,
                  size: int | str | tuple[int, int], seed: int, fps: float = 8.0, workers: int = 1) -> pathlib.Path:
    """Write clips/*.mp4, images/*.png and manifest.csv under `out`; returns the manifest's path.

    `clips` training clips, `heldout` held-out clips and `images` stills (all "train").
    """
    height, width = parse_size(size)
    if height % 2 or width % 2:
        raise ValueError(f"size={size!r}: height and width must be even (H.264 yuv420p)")
    for name, value in (("clips", clips), ("images", images), ("heldout", heldout)):
        if value < 0:
            raise ValueError(f"{name}={value}: must be >= 0")
    if frames < 2:
        raise ValueError(f"frames={frames}: clips need >= 2 frames (stills come from --images)")
    out = pathlib.Path(out)
    common = dict(seed=seed, frames=frames, size=(height, width), fps=fps, out=out)
    jobs = ([_Job(index=i, kind="clip", split="train", **common) for i in range(clips)]
            + [_Job(index=i, kind="clip", split="heldout", **common) for i in range(heldout)]
            + [_Job(index=i, kind="image", split="train", **common) for i in range(images)])
    progress = dict(total=len(jobs), desc=f"synthetic world -> {out}", unit="sample")
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers, initializer=torch.set_num_threads,
                                                      initargs=(1,)) as pool:
            rows = list(tqdm(pool.imap(_make_sample, jobs, chunksize=8), **progress))
    else:
        rows = [_make_sample(job) for job in tqdm(jobs, **progress)]
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Write the synthetic world: clips of one coloured shape moving on a plain background, "
                    "still images of the same, captions, and a manifest.csv with Open-Sora's columns "
                    "(path,text,num_frames,height,width,aspect_ratio,fps) plus split,colour,shape,size,motion,"
                    "background. The same --seed gives the same files, whatever --workers.",
        epilog="example: python -m data.synthetic --out data/synth --clips 2000 --images 500 --frames 17 "
               "--size 64 --seed 0   (then: python -m data.evaluate to score generated clips)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, type=pathlib.Path,
                        help="output folder; gets clips/, images/ and manifest.csv")
    parser.add_argument("--clips", type=int, default=2000, help="training clips (mp4)")
    parser.add_argument("--images", type=int, default=500, help="still images (png), split 'train'")
    parser.add_argument("--heldout", type=int, default=None,
                        help="extra clips whose (colour, shape, motion) never occurs in training "
                             "(split 'heldout'); default: 10%% of --clips")
    parser.add_argument("--frames", type=int, default=17,
                        help="frames per clip; 4k+1 (5, 9, 17, 33) fits the causal VAE")
    parser.add_argument("--size", default="64", help="frame size: '64' (square) or 'HxW' such as '64x96'; even")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate written into the mp4 files")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a pure function of the seed")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering and encoding in parallel")
    args = parser.parse_args(argv)
    # Frames are tiny: parallelism comes from --workers; intra-op threads only contend with them.
    torch.set_num_threads(1)
    heldout = math.ceil(0.1 * args.clips) if args.heldout is None else args.heldout
    manifest = write_dataset(args.out, clips=args.clips, images=args.images, heldout=heldout, frames=args.frames,
                             size=args.size, seed=args.seed, fps=args.fps, workers=args.workers)
    print(f"wrote {args.clips + heldout} clips and {args.images} images; manifest: {manifest}")


if __name__ == "__main__":
    main()
