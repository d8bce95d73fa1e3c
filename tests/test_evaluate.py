"""The evaluator reads the synthetic world's attributes back from pixels, and nothing from noise."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from data.evaluate import (
    ATTRIBUTES,
    accuracy_table,
    breakdown_table,
    compare,
    describe,
    evaluate,
    frame_table,
    main,
    parse_prompt,
)
from data.synthetic import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, SIZES, Scene, caption, render, sample_scene
from data.video_io import read_clip, write_video

NUM_VALUES = {"colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES), "motion": len(MOTIONS)}
TARGET = 0.99


def _rates(results: list[dict[str, bool | None]]) -> dict[str, float]:
    """Match rate per attribute over the results that name it."""
    rates = {}
    for attribute in ATTRIBUTES:
        scored = [result[attribute] for result in results if result[attribute] is not None]
        rates[attribute] = sum(scored) / len(scored) if scored else float("nan")
    return rates


def _scenes(count: int, seed: int, *, still: bool = False) -> list[tuple[Scene, str]]:
    """Random scenes (a fifth of the clips held out) with a caption each."""
    rng = random.Random(seed)
    scenes = []
    for index in range(count):
        split = "heldout" if index % 5 == 0 and not still else "train"
        scene = sample_scene(rng, split=split, still=still)
        scenes.append((scene, caption(scene, rng)))
    return scenes


def _assert_reads_ground_truth(results, scenes, *, image: bool):
    rates = _rates(results)
    for attribute in ("colour", "shape", "size") + (() if image else ("motion",)):
        assert rates[attribute] >= TARGET, (attribute, rates)
    if image:
        assert all(result["motion"] is None for result in results)


def test_reads_rendered_clips():
    scenes = _scenes(200, seed=0)
    results = [evaluate(render(scene, frames=17, size=64), text) for scene, text in scenes]
    _assert_reads_ground_truth(results, scenes, image=False)


def test_reads_clips_after_an_mp4_round_trip(tmp_path):
    scenes = _scenes(200, seed=1)
    results = []
    for index, (scene, text) in enumerate(scenes):
        path = write_video(tmp_path / f"{index}.mp4", render(scene, frames=17, size=64), fps=8)
        results.append(evaluate(read_clip(path, 17), text))
    _assert_reads_ground_truth(results, scenes, image=False)


def test_reads_rendered_images_and_pngs(tmp_path):
    scenes = _scenes(200, seed=2, still=True)
    results = []
    for index, (scene, text) in enumerate(scenes):
        image = render(scene, frames=1, size=64)
        results.append(evaluate(write_video(tmp_path / f"{index}.png", image) if index % 2 else image, text))
    _assert_reads_ground_truth(results, scenes, image=True)


def test_reads_non_square_frames():
    scenes = _scenes(60, seed=3)
    results = [evaluate(render(scene, frames=9, size=(64, 96)), text) for scene, text in scenes]
    _assert_reads_ground_truth(results, scenes, image=False)


def test_reads_blurred_noisy_clips():
    # Generated clips are never clean renders: a 3x3 blur plus noise of 10 levels must not matter.
    scenes = _scenes(100, seed=6)
    generator = torch.Generator().manual_seed(6)
    results = []
    for scene, text in scenes:
        clip = render(scene, frames=17, size=64)  # (3, T, H, W)
        blurred = torch.nn.functional.avg_pool2d(clip.reshape(-1, 1, 64, 64), 3, stride=1, padding=1,
                                                 count_include_pad=False).reshape(clip.shape)
        noisy = blurred + torch.randn(clip.shape, generator=generator) * 10 / 127.5
        results.append(evaluate(noisy.clamp(-1, 1), text))
    _assert_reads_ground_truth(results, scenes, image=False)


def test_every_wrong_attribute_is_caught():
    # Change one attribute of the prompt at a time: exactly that attribute must stop matching.
    swaps = {"colour": dict(zip(COLOURS, list(COLOURS)[1:] + list(COLOURS)[:1], strict=True)),
             "shape": dict(zip(SHAPES, SHAPES[1:] + SHAPES[:1], strict=True)),
             "size": {"small": "large", "large": "small"},
             "motion": dict(zip(MOTIONS, MOTIONS[1:] + MOTIONS[:1], strict=True))}
    for scene, _ in _scenes(40, seed=4):
        seen = describe(render(scene, frames=17, size=64))
        truth = {attribute: getattr(scene, attribute) for attribute in ATTRIBUTES}
        for attribute in ATTRIBUTES:
            named = {**truth, attribute: swaps[attribute][truth[attribute]]}
            result = compare(named, seen)
            assert result == {other: other != attribute for other in ATTRIBUTES}


def _noise_clips(count: int, seed: int) -> list[torch.Tensor]:
    """Uniform noise, flat frames, smooth noise, faint noise and two-object frames."""
    generator = torch.Generator().manual_seed(seed)
    clips = []
    for index in range(count):
        kind = index % 5
        if kind == 0:
            clip = torch.rand(3, 17, 64, 64, generator=generator) * 2 - 1
        elif kind == 1:
            clip = (torch.rand(3, 1, 1, 1, generator=generator) * 2 - 1).expand(3, 17, 64, 64)
        elif kind == 2:
            coarse = torch.rand(1, 3 * 17, 6, 6, generator=generator)
            clip = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear")[0]
            clip = clip.reshape(3, 17, 64, 64) * 2 - 1
        elif kind == 3:
            clip = torch.randn(3, 17, 64, 64, generator=generator) * 0.1
        else:  # two shapes side by side, moving alike: not one clear object
            rng = random.Random(index)
            motion, background = rng.choice(["up", "down", "static"]), rng.choice(list(BACKGROUNDS))
            left, right = (Scene(colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES), size=rng.choice(list(SIZES)),
                                 motion=motion, background=background, start_x=x, start_y=0.5) for x in (0.0, 1.0))
            clip = render(left, frames=17, size=64)
            right_clip = render(right, frames=17, size=64)
            drawn = (right_clip != clip[:, :1, :1, :1]).any(dim=0, keepdim=True)  # (1, T, H, W) the right shape
            clip = torch.where(drawn, right_clip, clip)
        clips.append(clip)
    return clips


def test_noise_scores_no_better_than_chance():
    texts = [text for _, text in _scenes(200, seed=5)]
    results = [evaluate(clip, text) for clip, text in zip(_noise_clips(200, seed=5), texts, strict=True)]
    rates = _rates(results)
    for attribute in ATTRIBUTES:
        assert rates[attribute] <= 1 / NUM_VALUES[attribute], (attribute, rates)
    assert describe(torch.rand(3, 5, 64, 64) * 2 - 1)["shape"] == "unknown"


def test_parse_prompt_reads_free_text():
    assert parse_prompt("A big cyan ball rising up against a grey screen.") == {
        "colour": "cyan", "shape": "circle", "size": "large", "motion": "up", "background": "gray"}
    assert parse_prompt("white background with a tiny magenta plus sign") == {
        "colour": "magenta", "shape": "cross", "size": "small", "motion": None, "background": "white"}
    assert parse_prompt("a cat playing the piano") == dict.fromkeys(("colour", "shape", "size", "motion", "background"))
    # Word boundaries: "upright" is not "up", "bluest" is not "blue".
    assert parse_prompt("an upright bluest thing")["motion"] is None
    assert parse_prompt("an upright bluest thing")["colour"] is None


def test_evaluate_returns_none_for_unnamed_attributes():
    scene = Scene(colour="red", shape="triangle", size="large", motion="down", background="black",
                  start_x=0.3, start_y=0.2)
    assert evaluate(render(scene, frames=9, size=64), "a red triangle") == {
        "colour": True, "shape": True, "size": None, "motion": None}


def test_accuracy_table_counts_per_attribute_and_group():
    results = [
        {"colour": True, "shape": False, "size": None, "motion": True, "group": "train"},
        {"colour": True, "shape": True, "size": None, "motion": False, "group": "train"},
        {"colour": False, "shape": True, "size": True, "motion": None, "group": "heldout"},
    ]
    rows = {line.split()[0]: line.split()[1:] for line in accuracy_table(results).splitlines()[2:]}
    assert rows["all"] == ["3", "66.7%", "66.7%", "100.0%", "50.0%"]
    assert rows["train"] == ["2", "100.0%", "50.0%", "-", "50.0%"]
    assert rows["heldout"] == ["1", "0.0%", "100.0%", "100.0%", "-"]


def _scored(prompt: str, seen: dict) -> dict:
    named = parse_prompt(prompt)
    return {**compare(named, seen), "named": named, "seen": seen}


def test_breakdown_table_counts_per_named_combination_and_what_misses_read_as():
    def seen(shape, size="small", colour="red"):
        return {"colour": colour, "shape": shape, "size": size, "motion": "left", "background": "black"}

    results = [
        _scored("a small red cross moving left", seen("circle")),
        _scored("a small red cross moving left", seen("circle")),
        _scored("a small red cross moving left", seen("unknown")),
        _scored("a small red cross moving left", seen("cross")),
        _scored("a large red cross moving left", seen("cross", size="large", colour="blue")),
        _scored("a small red square moving left", seen("square")),
        _scored("a red square moving left", seen("circle")),  # names no size: its own "-" row
    ]
    lines = breakdown_table(results, ["size", "shape"]).splitlines()
    assert lines[0].split()[:4] == ["size", "shape", "n", "colour"]
    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in lines[2:]}
    assert rows["small cross"][:5] == ["4", "4/4", "1/4", "4/4", "4/4"]
    assert " ".join(rows["small cross"][5:]) == "circle 2, unknown 1"  # the misses of the last attribute
    assert rows["large cross"][:5] == ["1", "0/1", "1/1", "1/1", "1/1"] and rows["large cross"][5:] == []
    assert rows["- square"][:5] == ["1", "1/1", "0/1", "-", "1/1"] and rows["- square"][5:] == ["circle", "1"]
    assert [key for key in rows] == sorted(rows)  # stable order: one table reads against another
    by_shape = {line.split()[0]: line.split()[1] for line in breakdown_table(results, ["shape"]).splitlines()[2:]}
    assert by_shape == {"cross": "5", "square": "2"}
    with pytest.raises(ValueError, match="background"):
        breakdown_table(results, ["background"])


def test_cli_breaks_scores_down_within_the_chosen_groups(tmp_path, capsys):
    cross = Scene(colour="green", shape="cross", size="small", motion="up", background="gray", start_x=0.5, start_y=0.5)
    write_video(tmp_path / "a.mp4", render(cross, frames=17, size=64), fps=8)
    (tmp_path / "a.json").write_text(json.dumps({"prompt": "a small green cross moving up", "group": "seen"}))
    write_video(tmp_path / "b.mp4", render(cross, frames=17, size=64), fps=8)  # a cross where a square was asked
    (tmp_path / "b.json").write_text(json.dumps({"prompt": "a small green square moving up", "group": "heldout"}))
    write_video(tmp_path / "c.mp4", render(cross, frames=17, size=64), fps=8)
    (tmp_path / "c.json").write_text(json.dumps({"prompt": "a small green square moving up", "group": "i2v"}))
    main([str(tmp_path), "--groups", "seen", "heldout", "--by", "size", "shape"])
    output = capsys.readouterr().out
    assert output.splitlines()[2].split()[:3] == ["all", "2", "100.0%"]  # c (group i2v) left out
    breakdown = output[output.index("size shape"):].splitlines()
    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in breakdown[2:]}
    assert rows["small cross"][:3] == ["1", "1/1", "1/1"]
    assert rows["small square"][:3] == ["1", "1/1", "0/1"] and rows["small square"][-2:] == ["cross", "1"]
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--groups", "extend"])


def test_cli_scores_a_folder_with_sidecars(tmp_path, capsys):
    right = Scene(colour="blue", shape="square", size="large", motion="left", background="white",
                  start_x=0.5, start_y=0.5)
    write_video(tmp_path / "a.mp4", render(right, frames=17, size=64), fps=8)
    (tmp_path / "a.txt").write_text("a large blue square moving left on a white background\n")
    write_video(tmp_path / "sub" / "b.mp4", render(right, frames=17, size=64), fps=8)
    (tmp_path / "sub" / "b.json").write_text(json.dumps(
        {"prompt": "a large red square moving right on a white background", "group": "heldout"}))
    write_video(tmp_path / "c.png", render(right, frames=1, size=64))  # no sidecar: skipped
    (tmp_path / "d.mp4").write_bytes(b"not a video")  # unreadable: counts as showing nothing
    (tmp_path / "d.txt").write_text("a small red circle")
    main([str(tmp_path)])
    output = capsys.readouterr().out
    table = output[output.index("group"):].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table[2:] if line and line[0] != "("}
    assert rows["all"] == ["3", "33.3%", "66.7%", "66.7%", "50.0%"]
    assert rows["heldout"] == ["1", "0.0%", "100.0%", "100.0%", "0.0%"]
    assert "1 media files without a sidecar" in output and "unreadable" in output


def test_cli_reads_the_sidecars_generate_writes(tmp_path, capsys):
    scene = Scene(colour="red", shape="circle", size="large", motion="right", background="black",
                  start_x=0.5, start_y=0.5)
    write_video(tmp_path / "g.mp4", render(scene, frames=17, size=64), fps=8)
    (tmp_path / "g.json").write_text(json.dumps(  # the layout of generate.py's sidecar: prompt under "request"
        {"request": {"prompt": "a large red circle moving right on a black background", "seed": 0},
         "runtime": {}, "seconds": 1.0}))
    write_video(tmp_path / "h.mp4", render(scene, frames=17, size=64), fps=8)
    (tmp_path / "h.json").write_text(json.dumps({"seconds": 1.0}))  # names no prompt: skipped, not a crash
    main([str(tmp_path)])
    output = capsys.readouterr().out
    table = output[output.index("group"):].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table[2:] if line and line[0] != "("}
    assert rows["all"] == ["1", "100.0%", "100.0%", "100.0%", "100.0%"]
    assert "1 media files without a sidecar" in output


@pytest.mark.parametrize("frames", [1, 17])
def test_describe_accepts_a_file_path(tmp_path, frames):
    scene = Scene(colour="green", shape="cross", size="small", motion="up" if frames > 1 else None,
                  background="gray", start_x=0.5, start_y=0.5)
    path = write_video(tmp_path / ("x.mp4" if frames > 1 else "x.png"), render(scene, frames=frames, size=64))
    assert describe(path) == {"colour": "green", "shape": "cross", "size": "small", "background": "gray",
                              "motion": "up" if frames > 1 else None}


def test_frame_shapes_follow_each_frame_and_the_frame_table_counts_them(tmp_path, capsys):
    """describe(by_frame=True) reads every frame on its own: a clip that alternates a cross and a circle of the
    same colour, size and path reads so frame by frame, and frame_table shares those readings per frame."""
    scene = Scene(colour="red", shape="cross", size="large", motion="right", background="white", start_x=0.3,
                  start_y=0.5)
    cross = render(scene, frames=9, size=64)  # (3, 9, 64, 64)
    circle = render(dataclasses.replace(scene, shape="circle"), frames=9, size=64)
    mixed = torch.where((torch.arange(9) % 2 == 1).view(1, 9, 1, 1), circle, cross)  # circles on odd frames
    assert describe(cross, by_frame=True)["frame_shapes"] == ["cross"] * 9
    mixed_seen = describe(mixed, by_frame=True)
    assert mixed_seen["frame_shapes"] == ["cross", "circle"] * 4 + ["cross"]
    assert "frame_shapes" not in describe(mixed)  # only when asked
    assert describe(torch.rand(3, 5, 64, 64) * 2 - 1, by_frame=True)["frame_shapes"] is None  # no object

    named = parse_prompt("a large red cross moving right on a white background")
    results = [{**compare(named, seen), "named": named, "seen": seen}
               for seen in (describe(cross, by_frame=True), {**mixed_seen, "shape": "cross"},
                            {**mixed_seen, "shape": "circle"})]
    lines = frame_table(results, ["size", "shape"]).splitlines()
    rows = {" ".join(line.split()[:-10]): line.split()[-10:] for line in lines[2:]}  # key: n, then 9 frames
    # Three clips: the all-cross one and the alternating one twice, read right and read wrong. Even frames read
    # a cross in all three, odd frames in 1 of 3; the missed row holds the last clip alone.
    assert rows["large cross"] == ["3", "100", "33", "100", "33", "100", "33", "100", "33", "100"]
    assert rows["large cross missed"] == ["1", "100", "0", "100", "0", "100", "0", "100", "0", "100"]

    write_video(tmp_path / "clip.mp4", cross, fps=8.0)
    (tmp_path / "clip.json").write_text(json.dumps({"prompt": "a large red cross moving right on a white background"}))
    main([str(tmp_path), "--frames"])  # rows by the asked shape unless --by says otherwise
    table = capsys.readouterr().out.split("(% of clips, frame t)")[1].splitlines()
    assert table[2].split() == ["cross", "1", *["100"] * 9]
