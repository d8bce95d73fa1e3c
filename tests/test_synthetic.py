"""The synthetic world: exact rendering, trajectories inside the frame, held-out split, deterministic dataset."""

from __future__ import annotations

import csv
import itertools
import math
import random

import pytest
import torch

from data.evaluate import parse_prompt
from data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    CROSS_ARM,
    HELDOUT_COMBOS,
    MOTIONS,
    SHAPES,
    SIZES,
    TRAVEL,
    Scene,
    caption,
    coverage,
    is_heldout,
    main,
    parse_size,
    render,
    sample_scene,
    trajectory,
)
from data.video_io import probe, read_clip


def _area_factor(shape: str) -> float:
    """Area of each shape divided by half-extent squared (all fill the box [-r, r]^2)."""
    return {"circle": math.pi, "square": 4.0, "triangle": 2.0,
            "cross": 8 * CROSS_ARM - 4 * CROSS_ARM**2}[shape]


def _alpha(video: torch.Tensor, scene: Scene) -> torch.Tensor:
    """Recover per-pixel coverage (T, H, W) from the rendered colours (the render is a linear blend)."""
    shape_rgb = torch.tensor(COLOURS[scene.colour], dtype=torch.float32) / 127.5 - 1
    background_rgb = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32) / 127.5 - 1
    direction = shape_rgb - background_rgb
    offset = video - background_rgb.reshape(3, 1, 1, 1)
    return torch.einsum("cthw,c->thw", offset, direction) / direction.dot(direction)


SIZES_TO_TRY = [(64, 64), (96, 64), (48, 128), (32, 32)]


@pytest.mark.parametrize("size", SIZES_TO_TRY, ids=lambda s: f"{s[0]}x{s[1]}")
def test_shapes_stay_whole_inside_the_frame_and_move_as_named(size):
    rng = random.Random(0)
    height, width = size
    for index in range(30):
        scene = sample_scene(rng, split="train" if index % 4 else "heldout")
        frames = rng.choice([2, 5, 17])
        video = render(scene, frames=frames, size=size)  # (3, T, H, W)
        assert video.shape == (3, frames, height, width) and video.abs().max() <= 1
        alpha = _alpha(video, scene)  # (T, H, W)
        half = SIZES[scene.size] * min(height, width)
        # Whole: the frame holds all the coverage of the same shape drawn into a canvas with a wide margin
        # (shifted by whole pixels, so sampled identically), in every frame: nothing is clipped.
        centre_x, centre_y, _ = trajectory(scene, frames=frames, size=size)
        margin = 16
        unclipped = coverage(scene.shape, centre_x + margin, centre_y + margin, half,
                             (height + 2 * margin, width + 2 * margin))  # (T, H + 2m, W + 2m)
        assert torch.allclose(alpha.sum(dim=(1, 2)), unclipped.sum(dim=(1, 2)), rtol=1e-5)
        # And the shapes are what they say: the area is the analytic one up to sub-pixel sampling.
        expected_area = _area_factor(scene.shape) * half**2
        assert torch.allclose(alpha.sum(dim=(1, 2)), torch.full((frames,), expected_area), rtol=0.06)
        # Moving as named: the centroid travels TRAVEL of the frame along the motion's axis (up to the
        # 1/4-pixel sampling of the edges at each end).
        ys, xs = torch.arange(height) + 0.5, torch.arange(width) + 0.5
        mass = alpha.sum(dim=(1, 2))
        centre_x = (alpha.sum(dim=1) * xs).sum(dim=1) / mass  # (T,)
        centre_y = (alpha.sum(dim=2) * ys).sum(dim=1) / mass  # (T,)
        step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}[scene.motion]
        assert math.isclose(centre_x[-1] - centre_x[0], step[0] * TRAVEL * width, abs_tol=0.3)
        assert math.isclose(centre_y[-1] - centre_y[0], step[1] * TRAVEL * height, abs_tol=0.3)


def test_render_uses_exact_palette_colours():
    scene = Scene(colour="magenta", shape="square", size="large", motion="static", background="gray",
                  start_x=0.5, start_y=0.5)
    video = render(scene, frames=3, size=64)
    background = torch.tensor(BACKGROUNDS["gray"]) / 127.5 - 1
    colour = torch.tensor(COLOURS["magenta"]) / 127.5 - 1
    assert torch.allclose(video[:, :, 0, 0], background[:, None].expand(3, 3))  # corner: background
    assert torch.allclose(video[:, :, 32, 32], colour[:, None].expand(3, 3))  # centre: the shape
    assert torch.equal(video[:, 0], video[:, 2])  # static: every frame the same


def test_vocabularies_are_well_separated():
    palette = {**COLOURS, **BACKGROUNDS}
    assert len(COLOURS) >= 6 and len(SHAPES) == 4 and len(SIZES) == 2 and len(MOTIONS) == 5
    assert len(BACKGROUNDS) >= 2 and "static" in MOTIONS
    for (name_a, rgb_a), (name_b, rgb_b) in itertools.combinations(palette.items(), 2):
        if not (name_a in BACKGROUNDS and name_b in BACKGROUNDS):
            assert math.dist(rgb_a, rgb_b) >= 140, (name_a, name_b)


def test_heldout_split_never_leaks_into_train():
    rng = random.Random(1)
    train = [sample_scene(rng, split="train") for _ in range(2000)]
    heldout = [sample_scene(rng, split="heldout") for _ in range(300)]
    assert not any(is_heldout(s.colour, s.shape, s.motion) for s in train)
    assert all(is_heldout(s.colour, s.shape, s.motion) for s in heldout)
    assert {(s.colour, s.shape, s.motion) for s in heldout} == set(HELDOUT_COMBOS)
    # Every single value still appears in training: the held-out split tests composition only.
    for attribute, values in (("colour", COLOURS), ("shape", SHAPES), ("motion", MOTIONS)):
        assert {getattr(s, attribute) for s in train} == set(values)
    stills = [sample_scene(rng, split="train", still=True) for _ in range(50)]
    assert all(s.motion is None for s in stills)


def test_captions_name_the_scene():
    rng = random.Random(2)
    templates_seen = set()
    for index in range(400):
        scene = sample_scene(rng, split="train", still=index % 5 == 0)
        text = caption(scene, rng)
        named = parse_prompt(text)
        assert (named["colour"], named["shape"], named["background"], named["motion"]) == (
            scene.colour, scene.shape, scene.background, scene.motion), text
        assert named["size"] in (scene.size, None), text
        templates_seen.add(text.split(" ")[0] + str(named["size"] is None))
    assert len(templates_seen) >= 3  # several templates, some without size


def test_scene_and_size_validation():
    with pytest.raises(ValueError, match="colour='purple'"):
        Scene(colour="purple", shape="circle", size="small", motion="left", background="black",
              start_x=0.5, start_y=0.5)
    with pytest.raises(ValueError, match="start_x=1.5"):
        Scene(colour="red", shape="circle", size="small", motion="left", background="black",
              start_x=1.5, start_y=0.5)
    with pytest.raises(ValueError, match="split='test'"):
        sample_scene(random.Random(0), split="test")
    assert parse_size("96x64") == (96, 64) and parse_size(64) == (64, 64) and parse_size("48") == (48, 48)
    with pytest.raises(ValueError, match="size='64x'"):
        parse_size("64x")


def _write(tmp_path, name: str, *extra: str):
    main(["--out", str(tmp_path / name), "--clips", "4", "--images", "2", "--heldout", "2", "--frames", "5",
          "--size", "32x48", "--seed", "7", *extra])
    with open(tmp_path / name / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_dataset_cli_writes_a_consistent_manifest(tmp_path):
    rows = _write(tmp_path, "a")
    assert list(rows[0]) == ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps",
                             "split", "colour", "shape", "size", "motion", "background"]
    assert [row["split"] for row in rows].count("heldout") == 2 and len(rows) == 8
    for row in rows:
        info = probe(tmp_path / "a" / row["path"])  # paths are relative to the manifest's folder
        assert (info.num_frames, info.height, info.width) == (int(row["num_frames"]), 32, 48)
        assert info.is_image == (row["motion"] == "none") == row["path"].endswith(".png")
        assert math.isclose(info.fps, float(row["fps"])) and math.isclose(float(row["aspect_ratio"]), 32 / 48, rel_tol=1e-5)
        motion = None if row["motion"] == "none" else row["motion"]
        assert is_heldout(row["colour"], row["shape"], motion) == (row["split"] == "heldout")
        assert parse_prompt(row["text"])["colour"] == row["colour"]


def test_dataset_is_a_pure_function_of_the_seed(tmp_path):
    first, second = _write(tmp_path, "a"), _write(tmp_path, "b")
    assert first == second
    for row in first:
        assert (tmp_path / "a" / row["path"]).read_bytes() == (tmp_path / "b" / row["path"]).read_bytes()
    different = _write(tmp_path, "c", "--seed", "8")
    assert [row["text"] for row in different] != [row["text"] for row in first]


@pytest.mark.slow
def test_dataset_is_the_same_with_parallel_workers(tmp_path):
    serial, parallel = _write(tmp_path, "serial"), _write(tmp_path, "parallel", "--workers", "2")
    assert serial == parallel
    for row in serial:
        assert torch.equal(read_clip(tmp_path / "serial" / row["path"], int(row["num_frames"])),
                           read_clip(tmp_path / "parallel" / row["path"], int(row["num_frames"])))
