"""The Python generation API on a tiny random model: conditioning survives, seeds reproduce, sizes resolve.

One session model folder (debug VAE + perturbed debug DiT + the embedded default text encoder). Outputs
are 16x32 (H != W, so a swapped axis shows) with 2 sampler steps: each generation takes about a second.
"""

from __future__ import annotations

import pytest
import torch

from data.video_io import write_video
from dit.diffusion import DiffusionConfig
from dit.inputs import load_clip, load_still
from dit.modes import GenerationDefaults, GenerationRequest, InvalidRequest, SizeRules
from dit.pipeline import Pipeline, PipelineConfig, random_pipeline_folder, read_pipeline_config

DEFAULTS = GenerationDefaults(height=16, width=32, frames=9, fps=8.0, steps=2, sampler="euler", guidance_scale=2.0)
SIZE = {"height": 16, "width": 32}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return random_pipeline_folder(tmp_path_factory.mktemp("model"), defaults=DEFAULTS, seed=0)


@pytest.fixture(scope="session")
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """A still and two clips whose frame i has brightness rising with i, at sizes other than the output's."""
    folder = tmp_path_factory.mktemp("media")
    ramp = torch.linspace(-0.9, 0.9, 17)  # (T,) one brightness per frame
    clip = ramp[None, :, None, None].expand(3, 17, 24, 40).clone()  # (3, T, H, W)
    clip[0, :, :, :20] = -ramp[:, None, None]  # a left half that darkens, so frames differ in colour too
    still = torch.rand(3, 1, 20, 36, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (3, 1, H, W)
    return {
        "still": str(write_video(folder / "still.png", still)),
        "clip": str(write_video(folder / "clip.mp4", clip, fps=8.0)),
        "other": str(write_video(folder / "other.mp4", clip.flip(1), fps=8.0)),
    }


def round_trip(pipe: Pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """decode(encode(pixels)) for (3, T, H, W) -> (3, T, H, W)."""
    with torch.no_grad():
        return pipe.vae.decode(pipe.vae.encode(pixels[None]))[0]  # (3, T, H, W)


def encode(pipe: Pipeline, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.vae.encode(pixels[None])[0]  # (C, T', H', W')


def generate(pipe: Pipeline, **options):
    (sample,) = pipe.generate(GenerationRequest(prompt="a red circle moving left", **options), progress=False)
    return sample


# ---------------------------------------------------------------------------------------------------------
# Conditioning frames survive into the output
# ---------------------------------------------------------------------------------------------------------


def test_image_to_video_first_frame_is_the_image_after_the_vae_round_trip(pipe, media):
    sample = generate(pipe, mode="i2v", image=media["still"])
    expected = round_trip(pipe, load_still(media["still"], **SIZE))  # (3, 1, H, W)
    torch.testing.assert_close(sample.video[:, :1], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(sample.video[:, 1:], expected.expand_as(sample.video[:, 1:]), atol=0.05)


def test_extend_forward_keeps_the_clip_end_unchanged_after_the_round_trip(pipe, media):
    sample = generate(pipe, mode="extend", video=media["clip"], frames=13, context_frames=5)
    context = load_clip(media["clip"], 5, fps=8.0, from_end=True, **SIZE)  # the clip's last 5 frames
    torch.testing.assert_close(sample.video[:, :5], round_trip(pipe, context), atol=1e-5, rtol=0)


def test_context_frames_come_from_the_right_end_of_the_clip(media):
    ramp = torch.linspace(-0.9, 0.9, 17)
    last = load_clip(media["clip"], 5, fps=8.0, from_end=True, height=16, width=32)[1, :, 8, 24]  # right half
    first = load_clip(media["clip"], 5, fps=8.0, from_end=False, height=16, width=32)[1, :, 8, 24]
    torch.testing.assert_close(last, ramp[-5:], atol=0.03, rtol=0)  # H.264 at crf 18: a few levels
    torch.testing.assert_close(first, ramp[:5], atol=0.03, rtol=0)
    every_other = load_clip(media["clip"], 5, fps=4.0, from_end=False, height=16, width=32)[1, :, 8, 24]
    torch.testing.assert_close(every_other, ramp[:9:2], atol=0.03, rtol=0)


@pytest.mark.parametrize("case", ["extend_backward", "transition", "keyframes", "loop_image"])
def test_condition_latents_are_kept_where_the_mode_places_them(pipe, media, case):
    clip_head = load_clip(media["clip"], 5, fps=8.0, from_end=False, **SIZE)
    if case == "extend_backward":
        sample = generate(pipe, mode="extend", direction="backward", video=media["clip"], frames=13,
                          context_frames=5)
        expected = {-2: encode(pipe, clip_head)[:, 0], -1: encode(pipe, clip_head)[:, 1]}
    elif case == "transition":
        sample = generate(pipe, mode="transition", video=media["clip"], end_video=media["other"], frames=17,
                          context_frames=5)
        tail_of_a = encode(pipe, load_clip(media["clip"], 5, fps=8.0, from_end=True, **SIZE))
        head_of_b = encode(pipe, load_clip(media["other"], 5, fps=8.0, from_end=False, **SIZE))
        expected = {0: tail_of_a[:, 0], 1: tail_of_a[:, 1], -2: head_of_b[:, 0], -1: head_of_b[:, 1]}
    elif case == "keyframes":
        sample = generate(pipe, mode="keyframes", frames=13, keyframes=["0:" + media["still"], "8:" + media["clip"]])
        still = encode(pipe, load_still(media["still"], **SIZE))[:, 0]
        clip_first_frame = encode(pipe, load_still(media["clip"], **SIZE))[:, 0]
        expected = {0: still, 2: clip_first_frame}  # pixel frame 8 -> latent frame 2 (frames 5..8)
    else:
        sample = generate(pipe, mode="loop", image=media["still"])
        still = encode(pipe, load_still(media["still"], **SIZE))[:, 0]
        expected = {0: still, -1: still}
    for index, latent in expected.items():
        torch.testing.assert_close(sample.latents[:, index], latent, atol=1e-6, rtol=0, msg=f"latent {index}")


def test_loop_without_an_image_loops_through_the_prompt_s_own_first_frame(pipe):
    loop = generate(pipe, mode="loop", seed=3)
    still = generate(pipe, mode="t2i", seed=3)
    torch.testing.assert_close(loop.latents[:, 0], still.latents[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(loop.latents[:, -1], still.latents[:, 0], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Seeds, noise and SDEdit
# ---------------------------------------------------------------------------------------------------------


def test_same_seed_same_output_and_sample_i_uses_seed_plus_i(pipe):
    first = generate(pipe, seed=7)
    torch.testing.assert_close(generate(pipe, seed=7).video, first.video, atol=0, rtol=0)
    assert not torch.allclose(generate(pipe, seed=8).video, first.video, atol=1e-3)
    pair = pipe.generate(GenerationRequest(prompt="a red circle moving left", seed=7, num_samples=2), progress=False)
    assert [s.request.seed for s in pair] == [7, 8]
    torch.testing.assert_close(pair[0].video, first.video, atol=0, rtol=0)
    torch.testing.assert_close(pair[1].video, generate(pipe, seed=8).video, atol=0, rtol=0)


def test_interpolation_ends_are_the_two_seeds(pipe):
    walk = pipe.generate(GenerationRequest(prompt="a red circle moving left", mode="interpolate", seed=1, seed2=2,
                                           num_samples=3), progress=False)
    assert [s.request.alpha for s in walk] == [0.0, 0.5, 1.0]
    torch.testing.assert_close(walk[0].latents, generate(pipe, seed=1).latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(walk[2].latents, generate(pipe, seed=2).latents, atol=1e-5, rtol=0)
    assert not torch.allclose(walk[1].latents, walk[0].latents, atol=1e-3)


def test_video_to_video_at_full_strength_is_text_to_video(pipe, media):
    edit = generate(pipe, mode="v2v", video=media["clip"], strength=1.0, seed=4)
    torch.testing.assert_close(edit.latents, generate(pipe, seed=4).latents, atol=1e-5, rtol=0)
    light = generate(pipe, mode="v2v", video=media["clip"], strength=0.5, seed=4)
    source = encode(pipe, load_clip(media["clip"], 9, fps=8.0, from_end=False, **SIZE))
    assert (light.latents - source).abs().mean() < (edit.latents - source).abs().mean()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_ddpm_model_samples_reproducibly_and_rejects_flow_settings(tmp_path, sampler):
    folder = random_pipeline_folder(tmp_path, defaults=DEFAULTS, diffusion=DiffusionConfig.from_preset("ddpm"))
    ddpm = Pipeline.from_pretrained(folder)
    first = generate(ddpm, sampler=sampler, frames=5, seed=2)
    torch.testing.assert_close(generate(ddpm, sampler=sampler, frames=5, seed=2).video, first.video, atol=0, rtol=0)
    assert not torch.allclose(generate(ddpm, sampler=sampler, frames=5, seed=3).video, first.video, atol=1e-3)
    with pytest.raises(InvalidRequest, match=r"use one of \['ddim', 'ddpm'\]"):
        ddpm.resolve(GenerationRequest(prompt="x", sampler="euler"))
    with pytest.raises(InvalidRequest, match="shift"):
        ddpm.resolve(GenerationRequest(prompt="x", sampler="ddim", shift=3.0))


def test_python_call_returns_a_batch_of_videos_in_range(pipe):
    videos = pipe("a blue square", frames=5, num_samples=2, seed=0)
    assert videos.shape == (2, 3, 5, 16, 32)
    assert videos.min() >= -1 and videos.max() <= 1
    torch.testing.assert_close(videos[1], pipe("a blue square", frames=5, seed=1)[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Request resolution and size rules
# ---------------------------------------------------------------------------------------------------------

RULES = SizeRules(temporal_factor=4, spatial_factor=8, patch_size=(1, 2, 2))


def test_size_rules_name_the_nearest_valid_values():
    with pytest.raises(InvalidRequest, match=r"frames=18.*17 and 21"):
        RULES.check(frames=18, height=32, width=32)
    with pytest.raises(InvalidRequest, match=r"height=40.*32 and 48"):
        RULES.check(frames=17, height=40, width=32)
    with pytest.raises(InvalidRequest, match=r"width=8.*16"):
        RULES.check(frames=17, height=32, width=8)
    RULES.check(frames=1, height=16, width=48)
    two_frame_patch = SizeRules(temporal_factor=4, spatial_factor=8, patch_size=(2, 2, 2))
    assert [n for n in range(1, 30) if two_frame_patch.frames_valid(n)] == [5, 13, 21, 29]


@pytest.mark.parametrize(("resolution", "aspect", "expected"), [
    ("256p", "1:1", (256, 256)), ("480p", "16:9", (480, 848)), ("480", "9:16", (848, 480)),
    ("64px", "4:3", (64, 80))])
def test_resolution_and_aspect_ratio_give_valid_sizes(resolution, aspect, expected):
    assert RULES.size_from_resolution(resolution, aspect) == expected


def test_duration_rounds_to_the_nearest_valid_frame_count():
    assert RULES.frames_from_duration(2.0, 8.0) == 17  # 16 frames wanted: 17 is 1 away, 13 is 3
    assert RULES.frames_from_duration(1.0, 16.0) == 17
    assert RULES.frames_from_duration(0.1, 8.0) == 1


def test_resolve_fills_defaults_and_is_idempotent(pipe):
    resolved = pipe.resolve(GenerationRequest(prompt="x", mode="extend", video="clip.mp4", duration=2.0))
    assert (resolved.frames, resolved.height, resolved.width, resolved.steps) == (17, 16, 32, 2)
    assert resolved.context_frames == 5  # half of the 5 latent frames, rounded down: 2 latent = 5 pixel frames
    assert pipe.resolve(resolved) == resolved


@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "i2v"}, "image"),
    ({"mode": "t2v", "image": "a.png"}, "only modes"),
    ({"mode": "t2i", "frames": 9}, "one frame"),
    ({"resolution": "480p", "height": 480}, "not both"),
    ({"keyframes": ["x:a.png"], "mode": "keyframes"}, "FRAME:PATH"),
    ({"strength": 0.0}, "strength"),
    ({"mode": "nope"}, "mode='nope'"),
    ({"temporal_guidance": -0.5}, "temporal_guidance=-0.5: must be >= 0"),
    ({"temporal_guidance_start": 1.2}, "temporal_guidance_start=1.2: must be in"),
    ({"zero_init_steps": -1}, "zero_init_steps=-1: must be >= 0"),
    ({"zero_init_steps": 1, "sampler": "ddim"}, "zero_init_steps=1: a zero-velocity step needs a flow sampler"),
    ({"zero_init_steps": 4, "steps": 4}, "zero_init_steps=4: must be below steps=4"),
])
def test_bad_requests_name_the_field(options, message):
    with pytest.raises(InvalidRequest, match=message):
        GenerationRequest(prompt="x", **options)


def test_temporal_guidance_changes_clips_not_stills_and_comes_from_the_defaults(pipe):
    """A request's scale wins over the model's default (0 here, as in a pipeline.json written before the
    setting existed); a still has one latent frame, so the frame-local model would change nothing."""
    assert pipe.resolve(GenerationRequest(prompt="x")).temporal_guidance == 0.0
    assert pipe.resolve(GenerationRequest(prompt="x", temporal_guidance=2.0)).temporal_guidance == 2.0
    plain, guided = generate(pipe, seed=3), generate(pipe, seed=3, temporal_guidance=2.0)
    assert guided.request.temporal_guidance == 2.0
    assert not torch.allclose(guided.latents, plain.latents)
    still = generate(pipe, mode="t2i", seed=3)
    assert torch.equal(generate(pipe, mode="t2i", seed=3, temporal_guidance=2.0).latents, still.latents)


def test_temporal_guidance_start_guides_the_later_steps_only(pipe):
    """From step round(start * steps) on: start 1 guides no step (the unguided clip exactly), a start inside
    the run gives a clip of its own; an unset start resolves to the model's default (0)."""
    assert pipe.resolve(GenerationRequest(prompt="x")).temporal_guidance_start == 0.0
    plain = generate(pipe, seed=3)
    never = generate(pipe, seed=3, temporal_guidance=2.0, temporal_guidance_start=1.0)
    assert never.request.temporal_guidance_start == 1.0
    assert torch.equal(never.latents, plain.latents)
    every = generate(pipe, seed=3, temporal_guidance=2.0)
    late = generate(pipe, seed=3, temporal_guidance=2.0, temporal_guidance_start=0.5)
    assert not torch.allclose(late.latents, plain.latents) and not torch.allclose(late.latents, every.latents)


def test_cfg_zero_star_settings_come_from_the_defaults_and_change_the_clip(pipe):
    """Off in a pipeline.json that does not name them; a request turns each on, and each moves the clip.
    zero_init_steps is checked against the steps the request resolves to (the model's 2 here)."""
    resolved = pipe.resolve(GenerationRequest(prompt="x"))
    assert (resolved.cfg_zero_star, resolved.zero_init_steps) == (False, 0)
    plain = generate(pipe, seed=3)
    scaled = generate(pipe, seed=3, cfg_zero_star=True)
    zeroed = generate(pipe, seed=3, zero_init_steps=1)
    assert (scaled.request.cfg_zero_star, zeroed.request.zero_init_steps) == (True, 1)
    assert not torch.allclose(scaled.latents, plain.latents) and not torch.allclose(zeroed.latents, plain.latents)
    with pytest.raises(InvalidRequest, match="zero_init_steps=2: must be below steps=2"):
        pipe.resolve(GenerationRequest(prompt="x", zero_init_steps=2))


def test_pipeline_json_round_trips_and_rejects_unknown_keys(model_dir):
    config = read_pipeline_config(model_dir)
    assert PipelineConfig.from_json_dict(config.to_json_dict()) == config
    assert config.defaults == DEFAULTS
    older = {k: v for k, v in config.to_json_dict().items() if not k.startswith("temporal_guidance")}
    assert PipelineConfig.from_json_dict(older).defaults.temporal_guidance == 0.0
    assert PipelineConfig.from_json_dict(older).defaults.temporal_guidance_start == 0.0
    configured = {**config.to_json_dict(), "cfg_zero_star": True, "zero_init_steps": 1}
    assert PipelineConfig.from_json_dict(configured).defaults.zero_init_steps == 1
    assert PipelineConfig.from_json_dict(configured).defaults.cfg_zero_star
    with pytest.raises(ValueError, match="zero_init_steps=2: must be below steps=2"):
        PipelineConfig.from_json_dict({**configured, "zero_init_steps": 2})
    with pytest.raises(ValueError, match="unknown keys"):
        PipelineConfig.from_json_dict({**config.to_json_dict(), "stepz": 3})
