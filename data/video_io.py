"""Reading and writing media files as pixel tensors (3, T, H, W) in [-1, 1].

Videos (mp4, webm, mov, mkv, gif, ...) are decoded with decord when it is installed (fast random
access) and with PyAV otherwise; both go through FFmpeg's default YUV -> RGB conversion, so they
give the same pixels (tests/test_video_io.py checks that they agree exactly). Still images are read
with Pillow as one-frame videos through the same functions, so every caller treats an image as T = 1.

The frame count always comes from the container (one demuxed packet per frame), never from stream
metadata alone, so that `probe` says the same thing whichever backend decodes afterwards. A file
whose packets stop well short of what its header declares is reported as truncated.

Writing goes through PyAV (H.264 yuv420p mp4) or Pillow (png, gif), always to a temporary file in
the destination folder that is renamed into place, so a crash or error never leaves a partial file.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from einops import rearrange

from data.atomic import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WRITE_SUFFIXES = (".mp4", ".png", ".gif")
BACKENDS = ("auto", "decord", "pyav")

# decord's FFmpeg build has no GIF demuxer, so GIFs always go through PyAV.
_DECORD_UNSUPPORTED = (".gif",)
# x264 constant-rate factor: 18 (x264's default is 23) is close to visually lossless, so the small
# shapes and flat colours of 64x64 clips survive a round trip (~35-39 dB PSNR on textured test clips).
_MP4_CRF = 18
# x264's macroblock-tree rate control makes the same frames encode to different bytes from run to run
# (seen with PyAV 18's x264); without it a seed always gives the same file, at a small cost in size.
_X264_PARAMS = "mbtree=0"
# A container whose packets stop this far short of its declared length was cut off (the header says
# 17 frames, 9 arrive). Metadata that is merely a frame or two off (rounded durations, edit lists)
# is tolerated and the demuxed count wins.
_TRUNCATION_TOLERANCE = 0.1


class VideoReadError(Exception):
    """The one error for media that is missing, truncated, corrupt or otherwise unreadable."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = pathlib.Path(path)
        self.cause = cause
        super().__init__(f"cannot read {self.path}: {cause}")


@dataclass(frozen=True)
class VideoInfo:
    """What a media file holds. Still images are num_frames=1, fps=1.0, is_image=True."""

    num_frames: int
    """Frames in the container (counted, not taken from the header)."""
    fps: float
    """Frame rate the stream declares (its guessed rate, else its average rate)."""
    height: int
    """Frame height in pixels, as stored (mp4 written from an odd size is one pixel taller)."""
    width: int
    """Frame width in pixels, as stored."""
    is_image: bool
    """True for still images read with Pillow."""


def available_backends() -> list[str]:
    """Video decoders installed here, fastest first: ["decord", "pyav"] or ["pyav"]."""
    return ["decord", "pyav"] if _has_decord() else ["pyav"]  # PyAV is a core dependency: always there


@functools.lru_cache(maxsize=1)
def _has_decord() -> bool:
    # Looked up, not imported: once loaded, decord's bundled FFmpeg shadows PyAV's libvpx (PyAV can no
    # longer encode VP8/VP9 in that process), so decord is loaded only when it first decodes.
    return importlib.util.find_spec("decord") is not None


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _resolve_backend(path: pathlib.Path, backend: str) -> str:
    """Which decoder reads this file: "pillow" for images, else decord or pyav."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {list(BACKENDS)}")
    if _is_image(path):
        return "pillow"
    if backend == "auto":
        if "decord" in available_backends() and path.suffix.lower() not in _DECORD_UNSUPPORTED:
            return "decord"
        return "pyav"
    if backend == "decord" and "decord" not in available_backends():
        raise ImportError("backend='decord' needs the decord package: `pip install decord` "
                          "(x86_64 wheels only), or use backend='pyav'")
    return backend


def _check_exists(path: pathlib.Path) -> None:
    if not path.is_file():
        raise VideoReadError(path, "no such file" if not path.exists() else "not a regular file")


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1]."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float()  # (T, H, W, 3)
    video = rearrange(video, "t h w c -> c t h w")  # (3, T, H, W)
    return video / 127.5 - 1.0


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """float (3, T, H, W) in [-1, 1] -> uint8 frames (T, H, W, 3)."""
    pixels = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(pixels, "c t h w -> t h w c").numpy()  # (T, H, W, 3)


# ----------------------------------------------------------------------------- images (Pillow)


def _open_image(path: pathlib.Path) -> np.ndarray:
    """The image as uint8 RGB (H, W, 3), upright per its EXIF orientation."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # Pillow decodes lazily: force it so truncation shows up here
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise VideoReadError(path, f"{type(err).__name__}: {err}") from err
    return np.asarray(image)  # (H, W, 3)


# ----------------------------------------------------------------------------- videos (PyAV)


def _probe_pyav(path: pathlib.Path) -> VideoInfo:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
            stream = container.streams.video[0]
            rate = stream.guessed_rate or stream.average_rate
            if not rate:
                raise VideoReadError(path, "the video stream declares no frame rate")
            fps = float(rate)
            height, width = stream.height, stream.width
            declared = stream.frames  # 0 when the container keeps no frame count (webm, mkv)
            if not declared and container.duration:
                declared = round(container.duration / av.time_base * fps)
            # Demuxing touches no pixels, so counting packets is cheap next to decoding.
            counted = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.FFmpegError as err:
        raise VideoReadError(path, f"{type(err).__name__}: {err}") from err
    if counted == 0:
        raise VideoReadError(path, "the video stream holds no frames")
    if counted < declared * (1 - _TRUNCATION_TOLERANCE):
        raise VideoReadError(path, f"truncated: the header declares {declared} frames, only {counted} are present")
    return VideoInfo(num_frames=counted, fps=fps, height=height, width=width, is_image=False)


def _read_pyav(path: pathlib.Path, indices: Sequence[int]) -> np.ndarray:
    """Seek to the keyframe before the first wanted frame and decode from there.

    Frame i is the frame with the i-th smallest presentation timestamp among the container's packets
    (decord's definition too), so indices stay exact with B-frames and variable frame rates.
    Elementary streams (.h264) carry no timestamps and are decoded from the start instead.
    """
    import av

    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            timestamps = [packet.pts for packet in container.demux(stream) if packet.size > 0]
            if None in timestamps:
                return _read_pyav_sequential(path, indices)
            timestamps.sort()
            if max(indices) >= len(timestamps):
                raise VideoReadError(path, f"frame {max(indices)} requested but the video has {len(timestamps)} frames")
            wanted = {timestamps[index]: index for index in set(indices)}
            container.seek(timestamps[min(indices)], stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts in wanted:
                    frames[wanted[frame.pts]] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                if len(frames) == len(wanted) or (frame.pts is not None and frame.pts > timestamps[max(indices)]):
                    break
    except av.FFmpegError as err:
        raise VideoReadError(path, f"{type(err).__name__}: {err}") from err
    if len(frames) < len(wanted):
        missing = sorted(set(indices) - frames.keys())
        raise VideoReadError(path, f"frames {missing[:5]} did not decode (damaged stream)")
    return np.stack([frames[index] for index in indices])  # (T, H, W, 3)


def _read_pyav_sequential(path: pathlib.Path, indices: Sequence[int]) -> np.ndarray:
    """Decode from the start up to the last wanted frame, counting frames in output order."""
    import av

    wanted, last = set(indices), max(indices)
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if decoded in wanted:
                    frames[decoded] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                decoded += 1
                if decoded > last:
                    break
    except av.FFmpegError as err:
        raise VideoReadError(path, f"{type(err).__name__} after {decoded} frames: {err}") from err
    if decoded <= last:
        raise VideoReadError(path, f"frame {last} requested but the video ends after {decoded} frames")
    return np.stack([frames[index] for index in indices])  # (T, H, W, 3)


# ----------------------------------------------------------------------------- videos (decord)


def _open_decord(path: pathlib.Path):
    import decord

    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0))
    except (RuntimeError, decord.DECORDError) as err:
        raise VideoReadError(path, f"decord cannot open it: {str(err).strip()}") from err


def _read_decord(path: pathlib.Path, indices: Sequence[int]) -> np.ndarray:
    import decord

    reader = _open_decord(path)
    if max(indices) >= len(reader):
        raise VideoReadError(path, f"frame {max(indices)} requested but decord sees {len(reader)} frames")
    try:
        return reader.get_batch(list(indices)).asnumpy()  # (T, H, W, 3)
    except (RuntimeError, decord.DECORDError) as err:
        raise VideoReadError(path, f"decord failed to decode: {str(err).strip()}") from err


# ----------------------------------------------------------------------------- public reading API


def probe(path: str | os.PathLike, *, backend: str = "auto") -> VideoInfo:
    """Frame count, frame rate and size of a video or image, without decoding pixels.

    The frame count is the number of packets in the container, whichever backend is named, so that
    every index below it decodes with either backend. An explicit backend="decord" also checks that
    decord can open the file. Raises VideoReadError for missing, truncated, corrupt or unreadable files.
    """
    path = pathlib.Path(path)
    chosen = _resolve_backend(path, backend)
    _check_exists(path)
    if chosen == "pillow":
        height, width, _ = _open_image(path).shape
        return VideoInfo(num_frames=1, fps=1.0, height=height, width=width, is_image=True)
    info = _probe_pyav(path)
    if backend == "decord":
        _open_decord(path)
    return info


def clip_indices(info: VideoInfo, num_frames: int, *, fps: float | None = None, start: int = 0) -> list[int]:
    """Source-frame indices of a num_frames clip sampled at `fps` (None = native) from frame `start`.

    Target frame i shows the source frame nearest to time i / fps after `start`, so a 30 fps source
    sampled at 10 fps takes every third frame; a target fps above the source's repeats frames.
    Raises ValueError if the clip does not fit in the video.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: must be >= 1")
    if start < 0:
        raise ValueError(f"start={start}: must be >= 0")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps={fps}: must be > 0 (or None for the native rate)")
    if info.is_image:
        if num_frames != 1 or start != 0:
            raise ValueError(f"num_frames={num_frames}, start={start}: an image holds one frame "
                             "(num_frames=1, start=0)")
        return [0]
    stride = 1.0 if fps is None else info.fps / fps  # source frames per target frame
    indices = [start + math.floor(i * stride + 0.5) for i in range(num_frames)]
    if indices[-1] >= info.num_frames:
        rate = "native fps" if fps is None else f"{fps:g} fps"
        raise ValueError(f"num_frames={num_frames} at {rate} from start={start} needs source frame {indices[-1]}, "
                         f"but the video has {info.num_frames} frames at {info.fps:g} fps")
    return indices


def read_frames(path: str | os.PathLike, indices: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """The frames at `indices` (any order, repeats allowed) as float32 (3, T, H, W) in [-1, 1]."""
    return frames_to_tensor(read_frames_uint8(path, indices, backend=backend))  # (3, T, H, W)


def read_frames_uint8(path: str | os.PathLike, indices: Sequence[int], *, backend: str = "auto") -> np.ndarray:
    """`read_frames` as decoded: uint8 (T, H, W, 3), a quarter of the float32 size (for keeping in memory)."""
    path = pathlib.Path(path)
    chosen = _resolve_backend(path, backend)
    indices = [int(index) for index in indices]
    if not indices:
        raise ValueError("indices=[]: ask for at least one frame")
    if min(indices) < 0:
        raise ValueError(f"indices: {min(indices)} is negative; frame indices start at 0")
    _check_exists(path)
    if chosen == "pillow":
        if max(indices) > 0:
            raise VideoReadError(path, f"frame {max(indices)} requested but an image holds one frame")
        frames = np.stack([_open_image(path)] * len(indices))  # (T, H, W, 3)
    elif chosen == "decord":
        try:
            frames = _read_decord(path, indices)  # (T, H, W, 3)
        except VideoReadError:
            if backend != "auto":
                raise
            # decord 0.6 returns 4-channel buffers for frames 2-24, 48 or 72 pixels wide and fails;
            # PyAV reads those (and reports a really broken file with its own VideoReadError).
            frames = _read_pyav(path, indices)  # (T, H, W, 3)
    else:
        frames = _read_pyav(path, indices)  # (T, H, W, 3)
    return frames  # (T, H, W, 3)


def read_clip(path: str | os.PathLike, num_frames: int, *, fps: float | None = None, start: int = 0,
              backend: str = "auto") -> torch.Tensor:
    """A num_frames clip at `fps` (None = native) from source frame `start`: (3, T, H, W) in [-1, 1]."""
    info = probe(path, backend=backend)
    return read_frames(path, clip_indices(info, num_frames, fps=fps, start=start), backend=backend)


# ----------------------------------------------------------------------------- writing


def _write_mp4(target: str, frames: np.ndarray, fps: float) -> None:
    """H.264 yuv420p. 4:2:0 chroma needs even sizes: odd ones gain one edge-replicated row/column."""
    import av

    _, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")  # (T, H', W', 3)
    # A fraction keeps NTSC rates exact (29.97 -> 2997/100) so probe reads back the same fps.
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(target, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = height + pad_h, width + pad_w
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(_MP4_CRF), "x264-params": _X264_PARAMS}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the frames x264 still holds for lookahead


def _write_pillow(target: str, frames: np.ndarray, fps: float, image_format: str) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    if image_format == "PNG":
        images[0].save(target, format="PNG")
    else:  # GIF stores delays in centiseconds, so fps is honoured to the nearest 10 ms
        images[0].save(target, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(1000 / fps), loop=0)


def write_video(path: str | os.PathLike, video: torch.Tensor, *, fps: float = 16.0) -> pathlib.Path:
    """Write (3, T, H, W) in [-1, 1] to .mp4 (H.264), .png (T must be 1) or .gif; returns the path.

    Atomic: the file is written under a temporary name in the same folder and renamed into place, so
    readers never see half a file and a failed write leaves nothing behind. Odd sizes are padded by
    one replicated row/column in mp4 (yuv420p cannot hold them), and stored exactly in png and gif.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"path={str(path)!r}: suffix must be one of {list(WRITE_SUFFIXES)}")
    if video.ndim != 4 or video.shape[0] != 3 or video.shape[1] < 1:
        raise ValueError(f"video.shape={tuple(video.shape)}: must be (3, T, H, W) with T >= 1")
    if suffix == ".png" and video.shape[1] != 1:
        raise ValueError(f"video.shape={tuple(video.shape)}: a .png holds one frame (T=1); use .mp4 or .gif")
    if not fps > 0:
        raise ValueError(f"fps={fps}: must be > 0")
    frames = _to_uint8(video)  # (T, H, W, 3)
    with atomic_path(path) as temp:
        if suffix == ".mp4":
            _write_mp4(str(temp), frames, fps)
        else:
            _write_pillow(str(temp), frames, fps, "PNG" if suffix == ".png" else "GIF")
    return path
