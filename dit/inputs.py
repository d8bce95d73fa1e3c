"""Input media for the conditioned modes: read, resample to the request's fps, resize and centre-crop.

Every failure here is an InvalidRequest naming the file: missing, unreadable, a still where a clip is
needed, or a clip too short for the frames asked of it. `check_inputs` runs the same checks without
decoding pixels, so generate.py can stop before it loads any model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from data.video_io import VideoInfo, VideoReadError, clip_indices, probe, read_frames
from dit.modes import GenerationRequest, InvalidRequest


def _probe(path: str) -> VideoInfo:
    try:
        return probe(path)
    except VideoReadError as err:
        raise InvalidRequest(f"input {path}: {err.cause}") from None


def _clip_indices(path: str, count: int, *, fps: float, from_end: bool) -> list[int]:
    """Source frames of `count` frames at `fps` from the start (or to the end) of a clip, or InvalidRequest."""
    info = _probe(path)
    if info.is_image:
        raise InvalidRequest(f"input {path}: is a still image; this mode needs a clip of >= {count} frames")
    span = math.floor((count - 1) * info.fps / fps + 0.5)  # source frames from the first to the last one
    start = info.num_frames - 1 - span if from_end else 0
    try:
        return clip_indices(info, count, fps=fps, start=start)
    except ValueError:
        raise InvalidRequest(f"input {path}: {count} frames at {fps:g} fps are needed but it holds "
                             f"{info.num_frames} frames at {info.fps:g} fps") from None


def check_inputs(request: GenerationRequest) -> None:
    """Probe every input of a resolved request (readable, long enough) before any model is loaded."""
    clips = {"extend": [(request.video, request.context_frames, request.direction == "forward")],
             "transition": [(request.video, request.context_frames, True),
                            (request.end_video, request.context_frames, False)],
             "v2v": [(request.video, request.frames, False)]}.get(request.mode, [])
    for path, count, from_end in clips:
        _clip_indices(path, count, fps=request.fps, from_end=from_end)
    for path in request.input_paths():
        _probe(path)


def fit_to_size(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (3, T, h, w) to cover (height, width), keeping the aspect ratio, then crop the centre."""
    _, _, src_h, src_w = video.shape
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    frames = rearrange(video, "c t h w -> t c h w")  # (T, 3, h, w)
    if (new_h, new_w) != (src_h, src_w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True,
                               align_corners=False)  # (T, 3, H*, W*)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    frames = frames[:, :, top : top + height, left : left + width]  # (T, 3, H, W)
    return rearrange(frames, "t c h w -> c t h w").clamp(-1, 1)  # (3, T, H, W)


def load_still(path: str, *, height: int, width: int) -> torch.Tensor:
    """An image, or the first frame of a clip, as (3, 1, H, W) in [-1, 1]."""
    try:
        still = read_frames(path, [0])  # (3, 1, h, w)
    except VideoReadError as err:
        raise InvalidRequest(f"input {path}: {err.cause}") from None
    return fit_to_size(still, height, width)  # (3, 1, H, W)


def load_clip(path: str, count: int, *, fps: float, from_end: bool, height: int, width: int) -> torch.Tensor:
    """`count` frames of a clip sampled at `fps`: its first ones, or its last with `from_end`.

    Returns (3, count, H, W) in [-1, 1]. A still image or a clip too short is an InvalidRequest that
    says how many frames it holds.
    """
    indices = _clip_indices(path, count, fps=fps, from_end=from_end)
    try:
        clip = read_frames(path, indices)  # (3, count, h, w)
    except VideoReadError as err:
        raise InvalidRequest(f"input {path}: {err.cause}") from None
    return fit_to_size(clip, height, width)  # (3, count, H, W)
