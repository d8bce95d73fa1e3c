"""The demo: its gallery and evaluation prompts are what they claim, its measures are exact on known
cases, and the shipped weights/demo follow a prompt (checked only where the weights exist)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bench.demo import DEFAULT_GALLERY, draw_items, psnr, read_gallery, seam_ratio
from data.evaluate import describe, parse_prompt
from data.synthetic import MOTIONS, Scene, is_heldout, render
from dit.modes import GenerationRequest

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "demo"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is fastest, and far faster on a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _combination(prompt: str) -> tuple[str, str, str]:
    named = parse_prompt(prompt)
    return named["colour"], named["shape"], named["motion"]


def test_gallery_lines_are_valid_requests_in_their_group():
    items = read_gallery(DEFAULT_GALLERY)
    assert {item.group for item in items} >= {"seen", "heldout", "still", "i2v", "extend", "loop"}
    for item in items:
        rendered = {} if item.scene is None else {"video" if item.request.get("mode") == "extend" else "image": "input"}
        request = GenerationRequest(**item.request, **rendered)  # raises on an unknown field or a bad value
        if item.group in ("seen", "heldout"):
            assert is_heldout(*_combination(request.prompt)) == (item.group == "heldout"), request.prompt
        if item.scene is not None:
            scene = Scene(**item.scene)
            named = parse_prompt(request.prompt)
            assert (named["colour"], named["shape"], named["motion"]) == (scene.colour, scene.shape, scene.motion)


def test_drawn_items_respect_the_held_out_split():
    items = draw_items(20, seed=3)
    assert len(items) == 4 * 20
    for item in items:
        combination = _combination(item.request["prompt"])
        assert combination[2] in MOTIONS, item.request["prompt"]  # every prompt names its motion
        assert is_heldout(*combination) == (item.group == "heldout"), item.request["prompt"]
        if item.group == "extend":
            assert item.scene["motion"] != "static"  # a seam needs motion to be compared with
    assert draw_items(20, seed=3) == items  # a pure function of the seed


def test_full_evaluation_runs_the_named_groups_under_the_noise_asked_for(tmp_path, capsys):
    """`--groups` keeps the drawn items of those groups (the same prompts as a full run's), `--noise-offset`
    moves every item's noise seed, and `--noise-draws` runs each item under several noises, pooled in one table."""
    from bench.demo import main
    from dit.modes import GenerationDefaults
    from dit.pipeline import random_pipeline_folder

    model = random_pipeline_folder(tmp_path / "model", defaults=GenerationDefaults(
        height=16, width=16, frames=5, steps=2, guidance_scale=2.0))
    main(["--model", str(model), "--full", "--per-group", "2", "--groups", "seen", "--noise-offset", "1000",
          "--out", str(tmp_path / "eval"), "--threads", "1"])
    sidecars = sorted((tmp_path / "eval").glob("*.json"))
    assert [path.stem for path in sidecars] == ["seen_0000", "seen_0001"]
    drawn = [item for item in draw_items(2, seed=0) if item.group == "seen"]
    for path, item in zip(sidecars, drawn, strict=True):
        sidecar = json.loads(path.read_text())
        assert (sidecar["prompt"], sidecar["seed"]) == (item.request["prompt"], item.request["seed"] + 1000)
    with pytest.raises(SystemExit):
        main(["--model", str(model), "--groups", "seen"])  # the gallery names its own groups
    assert "--groups" in capsys.readouterr().err
    # Two noise draws of one prompt: draw 1 is the run at offset 1000, under its own name, and both are pooled.
    main(["--model", str(model), "--full", "--per-group", "1", "--groups", "seen", "--noise-draws", "2",
          "--out", str(tmp_path / "draws"), "--threads", "1"])
    draws = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "draws").glob("*.json")}
    assert sorted(draws) == ["seen_0000", "seen_0000_draw1"]
    assert (draws["seen_0000"]["seed"], draws["seen_0000_draw1"]["seed"]) == (0, 1000)
    assert draws["seen_0000_draw1"]["prompt"] == draws["seen_0000"]["prompt"] == drawn[0].request["prompt"]
    table = (tmp_path / "draws" / "results.txt").read_text().splitlines()[2:]  # below the header and its rule
    assert {line.split()[0]: line.split()[1] for line in table if line.strip()} == {"seen": "2"}  # pooled
    with pytest.raises(SystemExit):
        main(["--model", str(model), "--full", "--noise-draws", "0"])
    assert "--noise-draws 0" in capsys.readouterr().err


def test_psnr_is_exact_for_a_constant_offset():
    image = torch.rand(3, 16, 16) * 1.6 - 0.8
    # An offset of 0.2 in [-1, 1] is 0.1 of the full range: MSE 0.01, PSNR 20 dB.
    assert psnr(image + 0.2, image) == pytest.approx(20.0, abs=1e-4)
    assert psnr(image, image) == float("inf")


def test_seam_ratio_is_one_for_uniform_motion_and_large_for_a_jump():
    scene = Scene(colour="red", shape="square", size="large", motion="right", background="black",
                  start_x=0.3, start_y=0.5)
    clip = render(scene, frames=17, size=64)  # (3, T, H, W), constant speed
    assert seam_ratio(clip, 9) == pytest.approx(1.0, rel=0.15)
    # The second half comes from a scene that starts elsewhere: a cut at frame 9.
    other = render(dataclasses.replace(scene, start_y=0.1), frames=17, size=64)
    cut = torch.cat([clip[:, :9], other[:, 9:]], dim=1)  # (3, T, H, W)
    assert seam_ratio(cut, 9) > 3.0


needs_weights = pytest.mark.skipif(not (WEIGHTS / "pipeline.json").is_file(), reason="weights/demo not trained yet")
MAX_SHIPPED_BYTES = 15 * 2**20  # the repository carries the demo weights: keep them small


@needs_weights
def test_shipped_weights_are_small_and_load_as_float32():
    """weights/demo is stored in float16; the pipeline must still compute in float32."""
    from dit.pipeline import Pipeline

    assert sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file()) <= MAX_SHIPPED_BYTES
    pipe = Pipeline.from_pretrained(WEIGHTS)
    for module in (pipe.dit, pipe.vae):
        assert {p.dtype for p in module.parameters()} == {torch.float32}


@needs_weights
@pytest.mark.parametrize("prompt,seed", [
    ("a large red circle moving left on a black background", 0),
    ("a small blue square moving down on a white background", 1),
])
def test_shipped_weights_follow_the_prompt(prompt: str, seed: int):
    """The shipped model, loaded as generate.py loads it, shows what the prompt names."""
    from dit.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(WEIGHTS)
    video = pipe(prompt, seed=seed)[0]  # (3, T, H, W)
    seen, named = describe(video), parse_prompt(prompt)
    for attribute in ("colour", "shape", "size", "motion", "background"):
        assert seen[attribute] == named[attribute], (attribute, seen)


def test_decode_scores_saved_latents_again_with_the_decoder_asked_for(tmp_path, capsys):
    """`--save-latents` keeps each sample's latents; `--decode` decodes exactly those again: with the model's own
    VAE it gives back the same outputs and table, with another decoder the same requests and other pixels."""
    from bench.demo import main
    from data.video_io import read_frames
    from dit.modes import GenerationDefaults
    from dit.pipeline import random_pipeline_folder
    from vae.model import CausalVAE

    model = random_pipeline_folder(tmp_path / "model", defaults=GenerationDefaults(
        height=16, width=16, frames=13, steps=2, guidance_scale=2.0))
    common = ["--model", str(model), "--threads", "1"]
    main([*common, "--full", "--per-group", "1", "--save-latents", "--out", str(tmp_path / "eval")])
    names = sorted(path.name.removesuffix(".latents.safetensors") for path in (tmp_path / "eval").glob("*.latents.*"))
    assert names == ["extend_0000", "heldout_0000", "i2v_0000", "seen_0000"]

    main([*common, "--decode", str(tmp_path / "eval"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "results.txt").read_text() == (tmp_path / "eval" / "results.txt").read_text()
    for name in names:
        first, again = (json.loads((tmp_path / folder / f"{name}.json").read_text()) for folder in ("eval", "again"))
        assert again == first
        assert torch.equal(read_frames(tmp_path / "again" / f"{name}.mp4", range(13)),
                           read_frames(tmp_path / "eval" / f"{name}.mp4", range(13)))

    other = CausalVAE.from_pretrained(model / "vae")
    with torch.no_grad():
        other.decoder.head[-1].bias.add_(0.3)  # the same latent space (encoder untouched), another decoder
    other.save_pretrained(tmp_path / "other")
    main([*common, "--decode", str(tmp_path / "eval"), "--vae", str(tmp_path / "other"), "--out", str(tmp_path / "b")])
    for name in names:
        assert json.loads((tmp_path / "b" / f"{name}.json").read_text()) == json.loads(
            (tmp_path / "eval" / f"{name}.json").read_text())
        assert not torch.equal(read_frames(tmp_path / "b" / f"{name}.mp4", range(13)),
                               read_frames(tmp_path / "eval" / f"{name}.mp4", range(13)))

    other.set_latent_stats([0.5] * other.cfg.latent_channels, [2.0] * other.cfg.latent_channels)
    other.save_pretrained(tmp_path / "stranger")  # another latent space: the DiT's latents would decode wrong
    for argv, message in ((["--decode", str(tmp_path / "eval"), "--out", str(tmp_path / "eval")], "--out folder"),
                          (["--decode", str(tmp_path / "eval"), "--vae", str(tmp_path / "stranger"),
                            "--out", str(tmp_path / "d")], "latent statistics differ"),
                          (["--decode", str(tmp_path / "other"), "--out", str(tmp_path / "c")], "--save-latents"),
                          (["--vae", str(tmp_path / "eval")], "no VAE folder")):
        with pytest.raises(SystemExit):
            main([*common, *argv])
        assert message in capsys.readouterr().err


@needs_weights
def test_the_recipe_writes_the_shipped_generation_defaults():
    """The last DiT stage's config stack (the Makefile's) exports the sampling defaults weights/demo has, so
    a retrained model samples as the shipped one was measured."""
    from config import load_config
    from dit.pipeline import read_pipeline_config
    from dit.training import pipeline_config
    from train import TrainConfig

    stages = ["recipe-dit", "recipe-dit-finish", "recipe-dit-finish-2", "recipe-dit-fine", "recipe-dit-selfcond"]
    root = Path(__file__).resolve().parents[1] / "configs" / "demo"
    cfg = load_config(TrainConfig, [root / f"{stage}.yaml" for stage in stages])
    assert pipeline_config(cfg).defaults == read_pipeline_config(WEIGHTS).defaults
