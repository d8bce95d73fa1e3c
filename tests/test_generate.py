"""generate.py end to end on a tiny random model: every mode, sidecars, prompts files, bad input -> exit 2.

`generate.main(argv)` runs in-process (fast); one test runs the script as a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from data.video_io import probe, read_frames, write_video
from dit.modes import MODES, GenerationDefaults
from dit.pipeline import random_pipeline_folder

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = GenerationDefaults(height=16, width=32, frames=9, fps=8.0, steps=2, sampler="euler", guidance_scale=2.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_pipeline_folder(tmp_path_factory.mktemp("model"), defaults=DEFAULTS, seed=0)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    clip = torch.linspace(-0.9, 0.9, 17)[None, :, None, None].expand(3, 17, 24, 40).contiguous()  # (3, T, H, W)
    still = torch.rand(3, 1, 20, 36, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (3, 1, H, W)
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(bytes(range(256)) * 8)
    return {"still": str(write_video(folder / "still.png", still)),
            "clip": str(write_video(folder / "clip.mp4", clip, fps=8.0)),
            "other": str(write_video(folder / "other.mp4", clip.flip(1), fps=8.0)),
            "corrupt": str(corrupt)}


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


MODE_ARGS = {
    "t2v": [],
    "t2i": ["--mode", "t2i"],
    "i2v": ["--mode", "i2v", "--image", "{still}"],
    "extend": ["--mode", "extend", "--video", "{clip}", "--frames", "13", "--context-frames", "5"],
    "loop": ["--mode", "loop"],
    "keyframes": ["--mode", "keyframes", "--keyframe", "0:{still}", "--keyframe", "8:{clip}"],
    "transition": ["--mode", "transition", "--video", "{clip}", "--end-video", "{other}", "--frames", "17"],
    "v2v": ["--mode", "v2v", "--video", "{clip}", "--strength", "0.5"],
    "interpolate": ["--mode", "interpolate", "--seed2", "1", "--num-samples", "2"],
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_writes_outputs_with_sidecars(model_dir, media, tmp_path, mode):
    argv = ["a red circle moving left", "--model", str(model_dir), "--out", str(tmp_path), "--quiet", "--seed", "3"]
    argv += [arg.format(**media) for arg in MODE_ARGS[mode]]
    assert generate.main(argv) == 0
    outputs = sorted(p for p in tmp_path.iterdir() if p.suffix != ".json")
    assert len(outputs) == (2 if mode == "interpolate" else 1)
    for output in outputs:
        sidecar = json.loads(output.with_suffix(".json").read_text())
        request = sidecar["request"]
        assert (request["mode"], request["prompt"], request["seed"]) == (mode, "a red circle moving left", 3)
        info = probe(output)
        assert output.suffix == (".png" if request["frames"] == 1 else ".mp4")
        assert (info.num_frames, info.height, info.width) == (request["frames"], 16, 32)
    assert not [name for name in files_in(tmp_path) if name.endswith(".tmp")]


def test_size_from_resolution_aspect_ratio_and_duration_as_gif(model_dir, tmp_path):
    argv = ["a red circle", "--model", str(model_dir), "--out", str(tmp_path / "clip.gif"), "--format", "gif",
            "--resolution", "16p", "--aspect-ratio", "2:1", "--duration", "0.5", "--fps", "8", "--quiet"]
    assert generate.main(argv) == 0
    info = probe(tmp_path / "clip.gif")
    assert (info.num_frames, info.height, info.width) == (5, 16, 32)  # 0.5 s x 8 fps = 4 -> nearest valid 5
    request = json.loads((tmp_path / "clip.json").read_text())["request"]
    assert (request["frames"], request["height"], request["width"], request["resolution"]) == (5, 16, 32, None)


def test_from_json_makes_the_same_output_again(model_dir, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    argv = ["a blue square", "--model", str(model_dir), "--mode", "t2i", "--seed", "11", "--quiet"]
    assert generate.main([*argv, "--out", str(first)]) == 0
    (image,) = first.glob("*.png")
    assert generate.main(["--from-json", str(image.with_suffix(".json")), "--out", str(again), "--quiet"]) == 0
    (copy,) = again.glob("*.png")
    assert torch.equal(read_frames(copy, [0]), read_frames(image, [0]))
    assert json.loads(copy.with_suffix(".json").read_text())["request"] == \
        json.loads(image.with_suffix(".json").read_text())["request"]


def test_cfg_zero_star_flags_reach_the_sidecar_and_the_command_line_turns_them_off(model_dir, tmp_path):
    """--cfg-zero-star and --zero-init-steps are recorded; over a sidecar that has them on,
    --no-cfg-zero-star and --zero-init-steps 0 win (command line over --from-json)."""
    on, off = tmp_path / "on", tmp_path / "off"
    argv = ["a blue square", "--model", str(model_dir), "--mode", "t2i", "--quiet"]
    assert generate.main([*argv, "--cfg-zero-star", "--zero-init-steps", "1", "--out", str(on)]) == 0
    (sidecar,) = on.glob("*.json")
    request = json.loads(sidecar.read_text())["request"]
    assert (request["cfg_zero_star"], request["zero_init_steps"]) == (True, 1)
    assert generate.main(["--from-json", str(sidecar), "--no-cfg-zero-star", "--zero-init-steps", "0",
                          "--out", str(off), "--quiet"]) == 0
    request = json.loads(next(off.glob("*.json")).read_text())["request"]
    assert (request["cfg_zero_star"], request["zero_init_steps"]) == (False, 0)


def test_prompt_option_equals_positional_prompt(model_dir, tmp_path):
    common = ["--model", str(model_dir), "--mode", "t2i", "--seed", "5", "--quiet"]
    assert generate.main(["a red circle", *common, "--out", str(tmp_path / "pos")]) == 0
    assert generate.main(["--prompt", "a red circle", *common, "--out", str(tmp_path / "opt")]) == 0
    (pos,), (opt,) = (tmp_path / "pos").glob("*.png"), (tmp_path / "opt").glob("*.png")
    assert torch.equal(read_frames(pos, [0]), read_frames(opt, [0]))
    assert json.loads(opt.with_suffix(".json").read_text())["request"]["prompt"] == "a red circle"
    with pytest.raises(SystemExit):
        generate.main(["a red circle", "--prompt", "a blue square", *common])


def test_prompts_file_with_mixed_options(model_dir, media, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    (tmp_path / "still.png").write_bytes(Path(media["still"]).read_bytes())
    prompts.write_text("\n".join([
        "# a comment, then a blank line",
        "",
        "a red circle moving left",
        json.dumps({"prompt": "a green cross", "seed": 5, "frames": 5}),
        json.dumps({"prompt": "a large blue square", "mode": "t2i", "guidance_scale": 1.0}),
        json.dumps({"prompt": "a still that moves", "mode": "i2v", "image": "still.png"}),  # next to the file
    ]))
    out = tmp_path / "out"
    assert generate.main(["--prompts-file", str(prompts), "--model", str(model_dir), "--out", str(out),
                          "--steps", "1", "--seed", "2", "--quiet"]) == 0
    sidecars = [json.loads(p.read_text())["request"] for p in sorted(out.glob("*.json"))]
    got = [(s["prompt"], s["seed"], s["frames"], s["steps"], s["guidance_scale"], s["mode"]) for s in sidecars]
    assert got == [("a red circle moving left", 2, 9, 1, 2.0, "t2v"), ("a green cross", 5, 5, 1, 2.0, "t2v"),
                   ("a large blue square", 2, 1, 1, 1.0, "t2i"), ("a still that moves", 2, 9, 1, 2.0, "i2v")]
    assert sidecars[3]["image"] == str(tmp_path / "still.png")
    assert len(list(out.glob("*.png"))) == 1 and len(list(out.glob("*.mp4"))) == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--frames", "10"], "nearest valid: 9 and 13"),
    (["--height", "20"], "nearest valid: 16 and 32"),
    (["--mode", "i2v", "--image", "{missing}"], "{missing}"),
    (["--mode", "v2v", "--video", "{corrupt}"], "{corrupt}"),
    (["--mode", "extend", "--video", "{still}"], "still image"),
    (["--mode", "v2v", "--video", "{clip}", "--frames", "33"], "holds 17 frames"),
    (["--mode", "keyframes", "--keyframe", "20:{still}"], "beyond"),
    (["--mode", "t2i", "--out", "{out}/clip.mp4"], ".png for one frame"),
    (["--num-samples", "2", "--out", "{out}/one.mp4"], "names one file"),
    (["--prompts-file", "{prompts}"], "unknown options"),
    (["--sampler", "ddim"], "use one of ['euler', 'euler_a', 'heun']"),
    (["--temporal-guidance", "-1"], "temporal_guidance=-1.0: must be >= 0"),
    (["--temporal-guidance-start", "2"], "temporal_guidance_start=2.0: must be in"),
    (["--zero-init-steps", "5"], "zero_init_steps=5: must be below steps=2"),
])
def test_bad_input_exits_2_naming_the_problem_and_leaves_no_file(model_dir, media, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "x", "stepz": 3}\n')
    names = {**media, "missing": str(tmp_path / "nope.png"), "out": str(out), "prompts": str(prompts)}
    argv = ["--model", str(model_dir), "--out", str(out), "--quiet", *[a.format(**names) for a in args]]
    if "--prompts-file" not in args:
        argv.insert(0, "a red circle")
    assert generate.main(argv) == 2
    assert message.format(**names) in capsys.readouterr().err
    assert files_in(out) == []


def test_existing_output_is_kept_unless_overwrite(model_dir, tmp_path, capsys):
    target = tmp_path / "image.png"
    argv = ["a red circle", "--model", str(model_dir), "--mode", "t2i", "--out", str(target), "--quiet"]
    assert generate.main([*argv, "--seed", "1"]) == 0
    before = target.read_bytes()
    assert generate.main([*argv, "--seed", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert target.read_bytes() == before
    assert generate.main([*argv, "--seed", "2", "--overwrite"]) == 0
    assert target.read_bytes() != before
    assert json.loads(target.with_suffix(".json").read_text())["request"]["seed"] == 2


def test_a_failed_sidecar_write_leaves_no_media_file(model_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dit.pipeline.write_json_atomic", fail)
    with pytest.raises(OSError, match="disk full"):
        generate.main(["a red circle", "--model", str(model_dir), "--mode", "t2i", "--out", str(tmp_path / "o"),
                       "--quiet"])
    assert files_in(tmp_path / "o") == []


def test_missing_default_model_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "DEFAULT_MODEL", tmp_path / "weights" / "demo")
    assert generate.main(["a red circle", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "make demo" in err and str(tmp_path / "weights" / "demo") in err


def test_help_has_an_example_for_every_mode():
    text = generate.build_parser().format_help()
    for mode in MODES:
        assert mode == "t2v" or f"--mode {mode}" in text, mode


def test_subprocess_smoke(model_dir, tmp_path):
    target = tmp_path / "still.png"
    result = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), "a red circle", "--model", str(model_dir), "--mode", "t2i",
         "--out", str(target), "--quiet"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert target.is_file() and "s per sample" in result.stdout and "peak memory" in result.stdout
