"""Video I/O: backends agree, frame indices are exact, writes are atomic, bad media raise VideoReadError."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.video_io import (
    VideoReadError,
    available_backends,
    clip_indices,
    probe,
    read_clip,
    read_frames,
    write_video,
)

HAS_DECORD = "decord" in available_backends()
BOTH_BACKENDS = ["pyav", pytest.param("decord", marks=pytest.mark.skipif(not HAS_DECORD, reason="no decord"))]


def _textured_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random texture plus a moving bright block: (3, T, H, W) in [-1, 1], codec-friendly."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3 * frames, 4, 4, generator=generator)
    video = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    video = video.reshape(3, frames, height, width) * 1.2 - 0.6  # (3, T, H, W)
    for t in range(frames):
        video[:, t, 4:12, 2 + 2 * t: 10 + 2 * t] = 0.9
    return video


def _indexed_clip(frames: int, height: int = 32, width: int = 64) -> torch.Tensor:
    """Frame t is flat gray level LEVEL_STEP * t: its index can be read back from its brightness."""
    levels = torch.arange(frames, dtype=torch.float32) * LEVEL_STEP / 127.5 - 1  # (T,)
    return levels.reshape(1, frames, 1, 1).expand(3, frames, height, width).clone()  # (3, T, H, W)


LEVEL_STEP = 4  # H.264 keeps flat gray within a level or two, so 4 levels apart never confuses; 64 frames fit


def _index_of(video: torch.Tensor) -> list[int]:
    """Inverse of _indexed_clip."""
    levels = (video.mean(dim=(0, 2, 3)) + 1) * 127.5  # (T,)
    return [round(level / LEVEL_STEP) for level in levels.tolist()]


def _encode_in_process(path, video: torch.Tensor, *, fps: int, options: dict[str, str], format: str | None = None):
    """H.264 with chosen options (keyframe interval, B-frames) or container (raw .h264), via PyAV."""
    import av

    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    with av.open(str(path), "w", format=format) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = options
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _psnr(decoded: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two (3, T, H, W) clips in [-1, 1]."""
    mse = (((decoded - reference) * 127.5) ** 2).mean()
    return float(10 * torch.log10(255**2 / mse))


# x264 at crf 18 keeps these small textured clips at 35-39 dB; a wrong colour matrix, channel order or
# frame shift falls far below (a swapped red/blue channel alone gives ~15 dB).
MIN_MP4_PSNR = 33.0


def _encode_webm_in_subprocess(path, video: torch.Tensor, *, fps: int) -> None:
    """VP9 webm, in a fresh process: once decord is loaded (any earlier test may load it), its bundled
    FFmpeg shadows PyAV's libvpx and VP9 encoding fails in that process."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    np.save(f"{path}.npy", frames)
    script = (
        "import sys, av, numpy as np\n"
        "frames = np.load(sys.argv[1] + '.npy')\n"
        "with av.open(sys.argv[1], 'w') as container:\n"
        "    stream = container.add_stream('libvpx-vp9', rate=int(sys.argv[2]))\n"
        "    stream.height, stream.width = frames.shape[1:3]\n"
        "    stream.pix_fmt = 'yuv420p'\n"
        "    for frame in frames:\n"
        "        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))\n"
        "    container.mux(stream.encode())\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path), str(fps)], check=True)
    os.remove(f"{path}.npy")


@pytest.fixture(scope="module")
def video_files(tmp_path_factory) -> dict[str, os.PathLike]:
    """The same 17-frame textured clip as mp4 (write_video), webm (VP9), mov (H.264) and gif."""
    folder = tmp_path_factory.mktemp("video_io")
    clip = _textured_clip(17, 48, 80)
    files = {"mp4": write_video(folder / "clip.mp4", clip, fps=8), "gif": write_video(folder / "clip.gif", clip, fps=10)}
    _encode_webm_in_subprocess(folder / "clip.webm", clip, fps=8)
    _encode_in_process(folder / "clip.mov", clip, fps=8, options={})
    files.update(webm=folder / "clip.webm", mov=folder / "clip.mov")
    return files


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
@pytest.mark.parametrize("container", ["mp4", "webm", "mov"])
def test_decord_and_pyav_decode_identical_pixels(video_files, container):
    # Both go through FFmpeg's default YUV->RGB conversion: they agree bit for bit, not just within a level.
    path = video_files[container]
    indices = [16, 0, 5, 5, 11]  # any order, repeats
    from_decord = read_frames(path, indices, backend="decord")
    from_pyav = read_frames(path, indices, backend="pyav")
    assert torch.equal(from_decord, from_pyav)


@pytest.mark.parametrize("container", ["mp4", "webm", "mov", "gif"])
def test_probe_counts_frames_every_backend_can_decode(video_files, container):
    import av

    path = video_files[container]
    info = probe(path)
    with av.open(str(path)) as handle:
        decoded = sum(1 for _ in handle.decode(video=0))
    assert (info.num_frames, info.height, info.width, info.is_image) == (17, 48, 80, False)
    assert decoded == info.num_frames
    for backend in ["pyav"] + (["decord"] if HAS_DECORD and container != "gif" else []):
        assert probe(path, backend=backend) == info
        read_frames(path, [info.num_frames - 1], backend=backend)  # the last counted frame decodes
        with pytest.raises(VideoReadError, match="frame 17"):
            read_frames(path, [info.num_frames], backend=backend)


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_read_frames_returns_the_requested_indices(tmp_path, backend):
    path = write_video(tmp_path / "indexed.mp4", _indexed_clip(20), fps=10)
    indices = [7, 0, 19, 3, 3]
    assert _index_of(read_frames(path, indices, backend=backend)) == indices


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_seeking_reads_exact_frames_past_keyframes_and_b_frames(tmp_path, backend):
    # Keyframe every 8 frames and 3 B-frames: PyAV seeks to the keyframe before frame 45, not frame 0.
    path = tmp_path / "gop.mp4"
    _encode_in_process(path, _indexed_clip(60), fps=24, options={"g": "8", "bf": "3"})
    indices = [45, 12, 59, 30, 30, 1]
    assert probe(path).num_frames == 60
    assert _index_of(read_frames(path, indices, backend=backend)) == indices


def test_streams_without_timestamps_are_counted_from_the_start(tmp_path):
    path = tmp_path / "raw.h264"  # an elementary stream: packets carry no timestamps
    _encode_in_process(path, _indexed_clip(12), fps=8, options={}, format="h264")
    assert probe(path).num_frames == 12
    assert _index_of(read_frames(path, [11, 3, 7], backend="pyav")) == [11, 3, 7]


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
def test_read_clip_resamples_to_the_target_fps(tmp_path, backend):
    path = write_video(tmp_path / "indexed.mp4", _indexed_clip(20), fps=12)
    assert _index_of(read_clip(path, 5, fps=4, start=2, backend=backend)) == [2, 5, 8, 11, 14]
    assert _index_of(read_clip(path, 4, backend=backend)) == [0, 1, 2, 3]


def test_clip_indices_analytic():
    from data.video_io import VideoInfo

    info = VideoInfo(num_frames=100, fps=30.0, height=8, width=8, is_image=False)
    assert clip_indices(info, 4, fps=10) == [0, 3, 6, 9]
    assert clip_indices(info, 3, start=97) == [97, 98, 99]
    assert clip_indices(info, 3, fps=12, start=1) == [1, 4, 6]  # stride 2.5, nearest frame
    assert clip_indices(info, 3, fps=60) == [0, 1, 1]  # above the native rate frames repeat
    with pytest.raises(ValueError, match="needs source frame 100"):
        clip_indices(info, 4, start=97)
    with pytest.raises(ValueError, match="needs source frame 102"):
        clip_indices(info, 35, fps=10)
    image = VideoInfo(num_frames=1, fps=1.0, height=8, width=8, is_image=True)
    assert clip_indices(image, 1, fps=8) == [0]
    with pytest.raises(ValueError, match="one frame"):
        clip_indices(image, 2)


@pytest.mark.parametrize("fps", [8.0, 12.5, 24.0, 30000 / 1001])
def test_mp4_keeps_fps_frame_count_and_pixels(tmp_path, fps):
    clip = _textured_clip(9, 32, 48)
    info = probe(write_video(tmp_path / "clip.mp4", clip, fps=fps))
    assert (info.num_frames, info.height, info.width) == (9, 32, 48)
    assert math.isclose(info.fps, fps, rel_tol=1e-9)
    assert _psnr(read_clip(tmp_path / "clip.mp4", 9), clip) > MIN_MP4_PSNR


def test_mp4_single_frame(tmp_path):
    clip = _textured_clip(1, 32, 32)
    info = probe(write_video(tmp_path / "one.mp4", clip))
    assert (info.num_frames, info.fps) == (1, 16.0)
    assert _psnr(read_clip(tmp_path / "one.mp4", 1), clip) > MIN_MP4_PSNR


def test_mp4_odd_size_is_padded_by_edge_replication(tmp_path):
    clip = _textured_clip(5, 33, 47)
    info = probe(write_video(tmp_path / "odd.mp4", clip, fps=8))
    assert (info.height, info.width) == (34, 48)
    decoded = read_clip(tmp_path / "odd.mp4", 5, backend="pyav")
    assert _psnr(decoded[:, :, :33, :47], clip) > MIN_MP4_PSNR
    # The extra row and column repeat the last ones (up to compression error).
    assert ((decoded[:, :, 33] - decoded[:, :, 32]).abs() * 127.5).mean() < 3.0
    assert ((decoded[..., 47] - decoded[..., 46]).abs() * 127.5).mean() < 3.0


def test_mp4_writes_are_reproducible(tmp_path):
    clip = _textured_clip(17, 64, 96, seed=3)
    first = write_video(tmp_path / "a.mp4", clip).read_bytes()
    assert all(write_video(tmp_path / "b.mp4", clip).read_bytes() == first for _ in range(5))


def test_png_round_trip_is_exact_to_8_bits(tmp_path):
    image = _textured_clip(1, 17, 23)
    path = write_video(tmp_path / "still.png", image)
    info = probe(path)
    assert (info.num_frames, info.fps, info.height, info.width, info.is_image) == (1, 1.0, 17, 23, True)
    quantised = ((image + 1) * 127.5).round() / 127.5 - 1
    assert torch.allclose(read_frames(path, [0]), quantised, atol=1e-6)
    assert torch.equal(read_frames(path, [0, 0, 0])[:, 2], read_frames(path, [0])[:, 0])
    with pytest.raises(ValueError, match="T=1"):
        write_video(tmp_path / "two.png", _textured_clip(2, 8, 8))


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp", ".bmp"])
def test_still_images_read_as_one_frame_videos(tmp_path, suffix):
    from PIL import Image

    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, 24:] = (200, 40, 40)
    pixels[:16, :24] = (40, 160, 220)
    Image.fromarray(pixels).save(tmp_path / f"still{suffix}", quality=95)
    info = probe(tmp_path / f"still{suffix}")
    assert (info.num_frames, info.fps, info.height, info.width, info.is_image) == (1, 1.0, 32, 48, True)
    frame = read_clip(tmp_path / f"still{suffix}", 1)
    expected = torch.from_numpy(pixels).permute(2, 0, 1)[:, None].float() / 127.5 - 1  # (3, 1, H, W)
    if suffix == ".bmp":
        assert torch.equal(frame, expected)
    else:  # lossy at quality 95 these sharp colour edges measure ~31.7 dB; a flip or channel swap is < 15
        assert _psnr(frame, expected) > 30.0
    with pytest.raises(ValueError, match="one frame"):
        read_clip(tmp_path / f"still{suffix}", 2)


def test_gif_round_trip(tmp_path):
    clip = _textured_clip(6, 24, 40)
    info = probe(write_video(tmp_path / "clip.gif", clip, fps=10))
    assert (info.num_frames, info.height, info.width) == (6, 24, 40)
    assert math.isclose(info.fps, 10.0, rel_tol=1e-6)  # 10 fps = 10 cs per frame, exact in GIF
    assert ((read_clip(tmp_path / "clip.gif", 6) - clip).abs() * 127.5).mean() < 4.0  # 256-colour palette


@pytest.mark.parametrize("backend", BOTH_BACKENDS)
@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "random bytes", "truncated webm"])
def test_damaged_media_raise_video_read_error(video_files, tmp_path, backend, damage):
    source = video_files["webm" if "webm" in damage else "mp4"]
    path = tmp_path / f"damaged{source.suffix}"
    data = source.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage.startswith("truncated"):
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    for call in (lambda: probe(path, backend=backend), lambda: read_clip(path, 17, backend=backend),
                 lambda: read_frames(path, range(17), backend=backend)):
        with pytest.raises(VideoReadError) as caught:
            call()
        assert caught.value.path == path and caught.value.cause
        assert str(path) in str(caught.value) and caught.value.cause in str(caught.value)


def test_damaged_image_raises_video_read_error(tmp_path):
    write_video(tmp_path / "still.png", _textured_clip(1, 32, 32))
    data = (tmp_path / "still.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for path in (tmp_path / "cut.png", tmp_path / "absent.jpg"):
        with pytest.raises(VideoReadError, match="cut.png|absent.jpg"):
            probe(path)


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".png"])
def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch, suffix):
    import data.video_io as video_io

    target = tmp_path / f"out{suffix}"
    target.write_bytes(b"previous version")

    def write_half_then_fail(temp, *args):
        with open(temp, "wb") as handle:
            handle.write(b"half a file")
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(video_io, "_write_mp4", write_half_then_fail)
    monkeypatch.setattr(video_io, "_write_pillow", write_half_then_fail)
    with pytest.raises(RuntimeError, match="exploded"):
        write_video(target, _textured_clip(1, 16, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert target.read_bytes() == b"previous version"


def test_decord_narrow_width_frames_are_read_by_auto(tmp_path):
    # decord 0.6 returns 4-channel buffers for some narrow widths (48 here); auto must still be right.
    path = write_video(tmp_path / "narrow.mp4", _textured_clip(5, 32, 48), fps=8)
    assert torch.equal(read_clip(path, 5), read_clip(path, 5, backend="pyav"))


def test_bad_arguments_raise_value_error(tmp_path):
    path = write_video(tmp_path / "clip.mp4", _textured_clip(3, 16, 16))
    with pytest.raises(ValueError, match="backend='ffmpeg'"):
        probe(path, backend="ffmpeg")
    with pytest.raises(ValueError, match="indices"):
        read_frames(path, [])
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "clip.avi", _textured_clip(3, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        write_video(tmp_path / "clip.mp4", torch.zeros(16, 16, 3))
