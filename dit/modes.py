"""What to generate: one typed request for every mode, the size rules it must meet, and its resolution.

A `GenerationRequest` says everything that decides an output: the mode, the prompt, the size, the
sampler settings, the seed and the input media. Fields left as None take the model folder's
`GenerationDefaults` (`resolve_request` fills them in and checks the size against the `SizeRules`), so a
resolved request written beside an output makes that output again exactly (`generate.py --from-json`).
The same dataclass is what a JSONL prompts-file line holds. Reading the input media is dit/inputs.py.

Modes, all through the one conditioning mechanism of dit/conditioning.py (clean latent frames kept at
timestep 0 while the rest is sampled):

    t2v          text to video, no condition
    t2i          text to image: a one-frame video, written as png
    i2v          image to video: the still's latent is the first latent frame
    extend       continue a clip forward (its last frames at the head) or backward (its first at the tail)
    loop         the same frame at the head and the tail (a still, or one made from the prompt first)
    keyframes    stills at chosen pixel-frame positions, the frames between are generated
    transition   the end of one clip at the head, the start of another at the tail
    v2v          video to video (SDEdit): the source latents noised to `strength`, then denoised
    interpolate  spherical interpolation between the noise of `seed` and of `seed2`

The output of every mode has `frames` frames. Clip inputs give `context_frames` of their frames (at the
request's fps, resized and centre-cropped to the output size) which appear first (extend forward,
transition) or last (extend backward, transition) in the output.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

MODES = ("t2v", "t2i", "i2v", "extend", "loop", "keyframes", "transition", "v2v", "interpolate")
DIRECTIONS = ("forward", "backward")

# Which modes read which input; an input given to any other mode is a mistake worth stopping for.
_INPUT_MODES = {
    "image": ("i2v", "loop"),
    "video": ("extend", "transition", "v2v"),
    "end_video": ("transition",),
    "keyframes": ("keyframes",),
    "seed2": ("interpolate",),
    "alpha": ("interpolate",),
    "context_frames": ("extend", "transition"),
}
_REQUIRED_INPUTS = {"i2v": "image", "extend": "video", "transition": "video", "v2v": "video",
                    "keyframes": "keyframes", "interpolate": "seed2"}


class InvalidRequest(ValueError):
    """A request that cannot run as asked: a bad value, a missing or unreadable input, an invalid size.

    generate.py turns it into exit code 2; the message names the field or file and what would work.
    """


@dataclass
class GenerationRequest:
    """Everything that decides one request's outputs; None fields take the model's defaults."""

    prompt: str = ""
    """What to generate. The empty prompt is the unconditional input."""
    mode: str = "t2v"
    """One of MODES: t2v, t2i, i2v, extend, loop, keyframes, transition, v2v, interpolate."""
    negative_prompt: str | None = None
    """What to steer away from under classifier-free guidance; None: the model's default."""
    height: int | None = None
    """Output height in pixels; None: from `resolution`/`aspect_ratio`, else the model's default."""
    width: int | None = None
    """Output width in pixels; None: from `resolution`/`aspect_ratio`, else the model's default."""
    frames: int | None = None
    """Output frame count (4k+1 for the causal VAE); None: from `duration`, else the model's default."""
    fps: float | None = None
    """Frames per second of the output, and the rate input clips are sampled at; None: model default."""
    resolution: str | None = None
    """Short side in pixels, e.g. "480p" or "256"; with `aspect_ratio` it sets height and width."""
    aspect_ratio: str | None = None
    """Width:height, e.g. "16:9" or "9:16"; used with `resolution` (default "1:1")."""
    duration: float | None = None
    """Seconds of video; with `fps` it sets `frames` (rounded to the nearest valid count)."""
    steps: int | None = None
    """Sampler steps; None: the model's default."""
    sampler: str | None = None
    """Sampler name (see dit/sampling.py); None: the model's default."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale; 1 turns guidance off. None: the model's default."""
    guidance_rescale: float | None = None
    """Guidance rescale factor in [0, 1] (Lin et al. 2023); None: the model's default."""
    temporal_guidance: float | None = None
    """Temporal guidance scale >= 0 (dit/sampling.py): steers away from the model's frame-by-frame prediction
    so the frames agree; 0 turns it off. None: the model's default."""
    temporal_guidance_start: float | None = None
    """Temporal guidance only from step round(this * steps) on, in [0, 1]: 0 every step, 0.5 the less noisy
    half. None: the model's default."""
    cfg_zero_star: bool | None = None
    """CFG-Zero* (dit/sampling.py): scale the unconditional prediction by s* per sample before guidance.
    None: the model's default."""
    zero_init_steps: int | None = None
    """Flow samplers: leave the noise as it is for this many first steps (CFG-Zero*'s zero-init); 0 none.
    None: the model's default."""
    shift: float | None = None
    """Flow-matching timestep shift; None: the model's diffusion config."""
    seed: int = 0
    """Seed of the initial noise; sample i of a request uses seed + i."""
    num_samples: int = 1
    """Outputs per request (seeds seed, seed+1, ...; for interpolate: points from seed to seed2)."""
    image: str | None = None
    """Still image (or a clip's first frame) for i2v, and for loop (else loop makes one from the prompt)."""
    video: str | None = None
    """Source clip: extended (extend), edited (v2v) or the start of a transition."""
    end_video: str | None = None
    """The clip a transition leads into."""
    direction: str = "forward"
    """extend: "forward" continues the clip after its end, "backward" leads into its start."""
    context_frames: int | None = None
    """Frames taken from each source clip for extend and transition (4k+1); None: a default by mode."""
    keyframes: list[str] = field(default_factory=list)
    """keyframes mode: "FRAME:PATH" items, a still (or a clip's first frame) at output pixel frame FRAME."""
    strength: float = 0.7
    """v2v: how much of the source is re-generated, in (0, 1]; 1 ignores the source entirely."""
    seed2: int | None = None
    """interpolate: the seed at the other end of the walk."""
    alpha: float | None = None
    """interpolate: one point of the walk in [0, 1]; None: num_samples points evenly from 0 to 1."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequest(f"mode={self.mode!r}: must be one of {list(MODES)}")
        if self.direction not in DIRECTIONS:
            raise InvalidRequest(f"direction={self.direction!r}: must be one of {list(DIRECTIONS)}")
        for name in ("height", "width", "frames", "steps", "context_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidRequest(f"{name}={value}: must be >= 1")
        if self.num_samples < 1:
            raise InvalidRequest(f"num_samples={self.num_samples}: must be >= 1")
        for name in ("fps", "duration"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InvalidRequest(f"{name}={value}: must be > 0")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise InvalidRequest(f"guidance_scale={self.guidance_scale}: must be >= 0 (1 turns guidance off)")
        if self.guidance_rescale is not None and not 0 <= self.guidance_rescale <= 1:
            raise InvalidRequest(f"guidance_rescale={self.guidance_rescale}: must be in [0, 1]")
        if self.temporal_guidance is not None and self.temporal_guidance < 0:
            raise InvalidRequest(f"temporal_guidance={self.temporal_guidance}: must be >= 0 (0 turns it off)")
        if self.temporal_guidance_start is not None and not 0 <= self.temporal_guidance_start <= 1:
            raise InvalidRequest(f"temporal_guidance_start={self.temporal_guidance_start}: must be in [0, 1] "
                                 "(the share of the steps before temporal guidance starts)")
        if self.zero_init_steps is not None:  # against the sampler and steps too once resolved (replace re-runs this)
            _check_zero_init(self.zero_init_steps, sampler=self.sampler, steps=self.steps)
        if self.shift is not None and not self.shift > 0:
            raise InvalidRequest(f"shift={self.shift}: must be > 0")
        if not 0 < self.strength <= 1:
            raise InvalidRequest(f"strength={self.strength}: must be in (0, 1]")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise InvalidRequest(f"alpha={self.alpha}: must be in [0, 1]")
        if self.alpha is not None and self.num_samples > 1:
            raise InvalidRequest(f"alpha={self.alpha}: names one point of the walk, so num_samples must be 1 "
                                 f"(got {self.num_samples}); leave alpha unset for evenly spaced points")
        if self.mode == "t2i" and self.frames not in (None, 1):
            raise InvalidRequest(f"frames={self.frames}: mode 't2i' makes one frame (leave frames unset or 1)")
        if self.mode == "t2i" and self.duration is not None:
            raise InvalidRequest(f"duration={self.duration}: mode 't2i' makes one frame, a still has no duration")
        if (self.height is not None or self.width is not None) and self.resolution is not None:
            raise InvalidRequest(f"resolution={self.resolution!r}: give either height/width or resolution, not both")
        if self.aspect_ratio is not None and self.resolution is None:
            raise InvalidRequest(f"aspect_ratio={self.aspect_ratio!r}: needs a resolution, e.g. resolution='480p'")
        if self.frames is not None and self.duration is not None:
            raise InvalidRequest(f"duration={self.duration}: give either frames or duration, not both")
        if self.resolution is not None:
            parse_resolution(self.resolution)
        if self.aspect_ratio is not None:
            parse_aspect_ratio(self.aspect_ratio)
        self.keyframes = list(self.keyframes)
        for item in self.keyframes:
            parse_keyframe(item)
        self._check_inputs_fit_mode()

    def _check_inputs_fit_mode(self) -> None:
        required = _REQUIRED_INPUTS.get(self.mode)
        if required is not None and not getattr(self, required):
            flag = "--" + required.replace("_", "-")
            raise InvalidRequest(f"{required}: mode {self.mode!r} needs it (on the command line: {flag})")
        if self.mode == "transition" and not self.end_video:
            raise InvalidRequest("end_video: mode 'transition' needs the clip to lead into (--end-video)")
        for name, modes in _INPUT_MODES.items():
            if getattr(self, name) not in (None, []) and self.mode not in modes:
                raise InvalidRequest(f"{name}={getattr(self, name)!r}: only modes {list(modes)} use it, "
                                     f"not mode {self.mode!r}")

    def input_paths(self) -> list[str]:
        """Every media file this request reads."""
        paths = [p for p in (self.image, self.video, self.end_video) if p]
        return paths + [parse_keyframe(item)[1] for item in self.keyframes]

    def to_dict(self) -> dict:
        """Plain JSON-ready values: what a sidecar and a prompts-file line hold."""
        return dataclasses.asdict(self)


def parse_keyframe(item: str) -> tuple[int, str]:
    """"16:still.png" -> (16, "still.png")."""
    frame, sep, path = item.partition(":")
    if not sep or not frame.strip().isdigit() or not path:
        raise InvalidRequest(f"keyframes item {item!r}: must be FRAME:PATH with FRAME a pixel frame index >= 0, "
                             "e.g. '0:first.png' or '16:last.png'")
    return int(frame), path


def parse_resolution(resolution: str) -> int:
    """"480p", "480px" or "480" -> 480 (the short side in pixels)."""
    text = resolution.strip().lower().removesuffix("px").removesuffix("p")
    if not text.isdigit() or int(text) < 1:
        raise InvalidRequest(f"resolution={resolution!r}: must be a short side in pixels like '480p' or '256'")
    return int(text)


def parse_aspect_ratio(aspect_ratio: str) -> float:
    """"16:9" -> 16/9 (width over height)."""
    width, sep, height = aspect_ratio.partition(":")
    try:
        ratio = float(width) / float(height) if sep else float("nan")
    except (ValueError, ZeroDivisionError):
        ratio = float("nan")
    if not ratio > 0:
        raise InvalidRequest(f"aspect_ratio={aspect_ratio!r}: must be WIDTH:HEIGHT like '16:9', '1:1' or '9:16'")
    return ratio


# ---------------------------------------------------------------------------------------------------------
# Size rules: which frame counts and sizes the VAE and the DiT patch grid accept
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeRules:
    """Valid output sizes: T = temporal_factor*(T'-1) + 1 with T' a multiple of pt; H, W multiples of
    spatial_factor*ph and spatial_factor*pw (the VAE's compression times the DiT's patch)."""

    temporal_factor: int
    spatial_factor: int
    patch_size: tuple[int, int, int]

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_factor + 1

    def nearest_frames(self, frames: int) -> list[int]:
        """The valid frame counts just below and above `frames` (one if it is below the smallest)."""
        patch_t = self.patch_size[0]
        latent = max(0, (frames - 1) // self.temporal_factor + 1)
        below = latent // patch_t * patch_t
        above = below + patch_t
        counts = [self.temporal_factor * (t - 1) + 1 for t in (below, above) if t >= 1]
        return counts

    def frames_valid(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % self.temporal_factor == 0 and \
            self.latent_frames(frames) % self.patch_size[0] == 0

    def spatial_multiples(self) -> tuple[int, int]:
        return self.spatial_factor * self.patch_size[1], self.spatial_factor * self.patch_size[2]

    def check(self, *, frames: int, height: int, width: int) -> None:
        """Raise InvalidRequest naming the nearest valid values for a bad frame count or size."""
        if not self.frames_valid(frames):
            nearest = " and ".join(str(n) for n in self.nearest_frames(frames))
            patch = f", with T' a multiple of the patch {self.patch_size[0]}" if self.patch_size[0] > 1 else ""
            raise InvalidRequest(
                f"frames={frames}: must be {self.temporal_factor}k+1 (the causal VAE encodes the first frame "
                f"alone, then groups of {self.temporal_factor}){patch}; nearest valid: {nearest}")
        for name, size, multiple in zip(("height", "width"), (height, width), self.spatial_multiples(), strict=True):
            if size % multiple:
                below = size // multiple * multiple
                nearest = " and ".join(str(n) for n in (below, below + multiple) if n > 0)
                raise InvalidRequest(f"{name}={size}: must be a multiple of {multiple} (VAE x{self.spatial_factor} "
                                     f"times patch); nearest valid: {nearest}")

    def size_from_resolution(self, resolution: str, aspect_ratio: str) -> tuple[int, int]:
        """(height, width) with the short side at `resolution`, both snapped to the nearest valid size."""
        short, ratio = parse_resolution(resolution), parse_aspect_ratio(aspect_ratio)
        height, width = (short, short * ratio) if ratio >= 1 else (short / ratio, short)
        multiple_h, multiple_w = self.spatial_multiples()
        return (max(multiple_h, round(height / multiple_h) * multiple_h),
                max(multiple_w, round(width / multiple_w) * multiple_w))

    def frames_from_duration(self, duration: float, fps: float) -> int:
        """The valid frame count nearest to duration * fps."""
        wanted = duration * fps
        return min(self.nearest_frames(max(1, math.floor(wanted))), key=lambda n: (abs(n - wanted), n))


# ---------------------------------------------------------------------------------------------------------
# Defaults and resolution: a request with every field concrete
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GenerationDefaults:
    """What a request that leaves a setting unset gets; stored in pipeline.json by whoever exports."""

    height: int = 64
    """Output height in pixels."""
    width: int = 64
    """Output width in pixels."""
    frames: int = 17
    """Output frame count (4k+1)."""
    fps: float = 8.0
    """Output frame rate."""
    steps: int = 30
    """Sampler steps."""
    sampler: str = "euler"
    """Sampler name; it must suit the process (flow: euler, heun, euler_a; ddpm: ddpm, ddim)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale (1 = off)."""
    guidance_rescale: float = 0.0
    """Guidance rescale in [0, 1]."""
    temporal_guidance: float = 0.0
    """Temporal guidance scale (>= 0; 0 = off: no extra model call)."""
    temporal_guidance_start: float = 0.0
    """Temporal guidance from step round(this * steps) on, in [0, 1]."""
    cfg_zero_star: bool = False
    """CFG-Zero*: the unconditional prediction scaled by s* before guidance."""
    zero_init_steps: int = 0
    """Flow samplers: the noise left as it is for this many first steps (CFG-Zero*'s zero-init)."""
    negative_prompt: str = ""
    """Default negative prompt; empty = the unconditional input."""

    def __post_init__(self) -> None:
        for name in ("height", "width", "frames", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.fps > 0:
            raise ValueError(f"fps={self.fps}: must be > 0")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale}: must be >= 0")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale={self.guidance_rescale}: must be in [0, 1]")
        if self.temporal_guidance < 0:
            raise ValueError(f"temporal_guidance={self.temporal_guidance}: must be >= 0")
        if not 0 <= self.temporal_guidance_start <= 1:
            raise ValueError(f"temporal_guidance_start={self.temporal_guidance_start}: must be in [0, 1]")
        from dit.sampling import check_zero_init_steps

        check_zero_init_steps(self.zero_init_steps, sampler=self.sampler, steps=self.steps)


def resolve_request(request: GenerationRequest, *, defaults: GenerationDefaults, rules: SizeRules) -> GenerationRequest:
    """Fill every unset field of a request from the defaults and check its sizes (InvalidRequest if bad).

    The result has concrete values everywhere the output depends on them, so written beside the output
    it makes that output again. Resolving a resolved request changes nothing.
    """
    r = request
    fps = r.fps if r.fps is not None else defaults.fps
    if r.mode == "t2i":
        frames = 1
    elif r.frames is not None:
        frames = r.frames
    elif r.duration is not None:
        frames = rules.frames_from_duration(r.duration, fps)
    else:
        frames = defaults.frames
    if r.resolution is not None:
        height, width = rules.size_from_resolution(r.resolution, r.aspect_ratio or "1:1")
    else:
        height = r.height if r.height is not None else defaults.height
        width = r.width if r.width is not None else defaults.width
    rules.check(frames=frames, height=height, width=width)
    resolved = dataclasses.replace(
        r, frames=frames, height=height, width=width, fps=fps, resolution=None, aspect_ratio=None,
        duration=None, context_frames=_context_frames(r, frames, rules),
        steps=r.steps if r.steps is not None else defaults.steps,
        sampler=r.sampler if r.sampler is not None else defaults.sampler,
        guidance_scale=r.guidance_scale if r.guidance_scale is not None else defaults.guidance_scale,
        guidance_rescale=r.guidance_rescale if r.guidance_rescale is not None else defaults.guidance_rescale,
        temporal_guidance=r.temporal_guidance if r.temporal_guidance is not None else defaults.temporal_guidance,
        temporal_guidance_start=(r.temporal_guidance_start if r.temporal_guidance_start is not None
                                 else defaults.temporal_guidance_start),
        cfg_zero_star=r.cfg_zero_star if r.cfg_zero_star is not None else defaults.cfg_zero_star,
        zero_init_steps=r.zero_init_steps if r.zero_init_steps is not None else defaults.zero_init_steps,
        negative_prompt=r.negative_prompt if r.negative_prompt is not None else defaults.negative_prompt)
    _check_condition_fits(resolved, rules)
    return resolved


def _check_zero_init(zero_init_steps: int, *, sampler: str | None, steps: int | None) -> None:
    from dit.sampling import check_zero_init_steps

    try:
        check_zero_init_steps(zero_init_steps, sampler=sampler, steps=steps)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None


def _context_frames(request: GenerationRequest, frames: int, rules: SizeRules) -> int | None:
    """Frames taken from each source clip: given, or half the output (extend), a quarter (transition)."""
    if request.mode not in ("extend", "transition"):
        return None
    latent_frames = rules.latent_frames(frames)
    sides = 1 if request.mode == "extend" else 2
    if request.context_frames is None:
        context_latents = max(1, latent_frames // (2 * sides))
        return rules.temporal_factor * (context_latents - 1) + 1
    context = request.context_frames
    if not rules.frames_valid(context):
        nearest = " and ".join(str(n) for n in rules.nearest_frames(context))
        raise InvalidRequest(f"context_frames={context}: must be a valid frame count like frames; "
                             f"nearest valid: {nearest}")
    if sides * rules.latent_frames(context) >= latent_frames:
        raise InvalidRequest(f"context_frames={context}: {sides} x {context} context frames leave nothing "
                             f"to generate in frames={frames}; use fewer context frames or more frames")
    return context


def _check_condition_fits(request: GenerationRequest, rules: SizeRules) -> None:
    latent_frames = rules.latent_frames(request.frames)
    needed = {"i2v": 2, "loop": 3}.get(request.mode, 1)
    if latent_frames < needed:
        smallest = rules.temporal_factor * (needed - 1) + 1
        raise InvalidRequest(f"frames={request.frames}: mode {request.mode!r} needs frames >= {smallest}")
    if request.mode == "keyframes":
        from dit.conditioning import latent_index_of_pixel_frame

        positions = [parse_keyframe(item)[0] for item in request.keyframes]
        bad = [p for p in positions if p >= request.frames]
        if bad:
            raise InvalidRequest(f"keyframes at frames {bad}: beyond the output's frames={request.frames} "
                                 f"(valid positions 0..{request.frames - 1})")
        latents = [latent_index_of_pixel_frame(p, rules.temporal_factor) for p in positions]
        if len(set(latents)) != len(latents) or len(latents) >= latent_frames:
            raise InvalidRequest(f"keyframes at frames {positions}: two land in the same group of "
                                 f"{rules.temporal_factor} frames, or they leave no frame to generate")


def expand_request(request: GenerationRequest) -> list[GenerationRequest]:
    """A resolved request -> one request per output, each with num_samples=1 and its own seed (or alpha)."""
    count = request.num_samples
    if request.mode == "interpolate":
        if request.alpha is not None:
            return [request]
        alphas = [i / (count - 1) for i in range(count)] if count > 1 else [0.0]
        return [dataclasses.replace(request, num_samples=1, alpha=alpha) for alpha in alphas]
    return [dataclasses.replace(request, num_samples=1, seed=request.seed + i) for i in range(count)]
