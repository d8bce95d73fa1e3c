"""Conditioning: frame index mapping, condition builders, timesteps per frame/token, training masks."""

import pytest
import torch
from omegaconf import OmegaConf

from dit.conditioning import (
    Condition,
    MaskSamplerConfig,
    extend_backward,
    extend_forward,
    image_to_video,
    inpaint,
    interpolation_noises,
    keyframes,
    latent_index_of_pixel_frame,
    loop,
    model_timesteps,
    num_latent_frames,
    outpaint,
    pixel_frames_of_latent,
    sample_cond_mask,
    sdedit_start_step,
    slerp,
    transition,
)

B, C, T, H, W = 2, 3, 6, 4, 4


def _clip(frames, seed=0):
    return torch.randn(B, C, frames, H, W, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Pixel frames <-> latent frames
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pixel_frames", [1, 5, 17, 81])
def test_latent_frames_partition_the_pixel_frames(pixel_frames):
    latent_frames = num_latent_frames(pixel_frames)
    covered = [p for k in range(latent_frames) for p in pixel_frames_of_latent(k)]
    assert covered == list(range(pixel_frames))  # each pixel frame exactly once, in order
    for pixel in range(pixel_frames):
        assert pixel in pixel_frames_of_latent(latent_index_of_pixel_frame(pixel))
    assert list(pixel_frames_of_latent(0)) == [0] and list(pixel_frames_of_latent(2)) == [5, 6, 7, 8]


def test_invalid_frame_count_names_the_nearest_valid_ones():
    with pytest.raises(ValueError, match="nearest valid are 13 and 17"):
        num_latent_frames(16)


# ---------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------


def _cases():
    clip_a, clip_b, image = _clip(5, seed=1), _clip(4, seed=2), _clip(1, seed=3)
    frames = _clip(2, seed=4)
    return [
        # (condition, {new latent index: the source frame expected there})
        ("i2v", image_to_video(image, latent_frames=T), {0: image[:, :, 0]}),
        ("extend_forward", extend_forward(clip_a, 2, latent_frames=T), {0: clip_a[:, :, 3], 1: clip_a[:, :, 4]}),
        ("extend_backward", extend_backward(clip_a, 2, latent_frames=T), {4: clip_a[:, :, 0], 5: clip_a[:, :, 1]}),
        ("loop", loop(frames, latent_frames=T), {0: frames[:, :, 0], 1: frames[:, :, 1], 4: frames[:, :, 0], 5: frames[:, :, 1]}),
        ("keyframes", keyframes(frames, [1, -1], latent_frames=T), {1: frames[:, :, 0], 5: frames[:, :, 1]}),
        ("transition", transition(clip_a, clip_b, 1, latent_frames=T), {0: clip_a[:, :, 4], 5: clip_b[:, :, 0]}),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(6), ids=[name for name, _, _ in _cases()])
def test_frame_builders_place_the_right_frames(case):
    _, condition, expected = _cases()[case]
    assert condition.mask.shape == (B, T, H, W)
    frame_mask = condition.mask.all(dim=(2, 3))  # (B, T')
    assert frame_mask[0].nonzero().flatten().tolist() == sorted(expected)
    assert torch.equal(condition.mask.any(dim=(2, 3)), frame_mask)  # whole frames only
    for index, frame in expected.items():
        assert torch.equal(condition.latents[:, :, index], frame)


def test_region_builders():
    clip = _clip(T)
    region = torch.zeros(B, T, H, W, dtype=torch.bool)
    region[:, :, :2, :2] = True
    condition = inpaint(clip, region)
    assert torch.equal(condition.mask, ~region)
    small = _clip(T)[..., :2, :2]
    grown = outpaint(small, latent_size=(H, W), offset=(2, 0))
    assert torch.equal(grown.latents[..., 2:, :2], small)
    assert int(grown.mask.sum()) == B * T * 4 and grown.mask[:, :, 2:, :2].all()
    with pytest.raises(ValueError, match="does not fit"):
        outpaint(small, latent_size=(H, W), offset=(3, 0))


def test_invalid_conditions_are_rejected():
    with pytest.raises(ValueError, match="nothing is left to generate"):
        Condition(_clip(T), torch.ones(B, T, H, W, dtype=torch.bool))
    with pytest.raises(ValueError, match="same latent index"):
        keyframes(_clip(2), [1, 1 - T], latent_frames=T)
    with pytest.raises(ValueError, match="indices"):
        keyframes(_clip(1), [T], latent_frames=T)
    five_d = Condition(_clip(T), torch.zeros(B, 1, T, H, W, dtype=torch.bool))
    assert five_d.mask.shape == (B, T, H, W)


# ---------------------------------------------------------------------------------------------------------
# Timesteps the DiT reads
# ---------------------------------------------------------------------------------------------------------


def test_model_timesteps_per_sample_frame_and_token():
    t = torch.tensor([500.0, 250.0])
    assert torch.equal(model_timesteps(t, None), t)
    assert torch.equal(model_timesteps(t, torch.zeros(B, T, H, W, dtype=torch.bool)), t)

    frames = image_to_video(_clip(1), latent_frames=T).mask
    per_frame = model_timesteps(t, frames)
    assert torch.equal(per_frame, torch.tensor([[0.0] + [500.0] * 5, [0.0] + [250.0] * 5]))

    region = torch.zeros(B, T, H, W, dtype=torch.bool)
    region[1, 2, 2:, :2] = True  # one 2x2 patch of frame 2 in sample 1
    per_token = model_timesteps(t, region, patch_size=(1, 2, 2))  # L = 6 * 2 * 2, t-major then h then w
    expected = torch.tensor([500.0, 250.0])[:, None].repeat(1, T * 4)
    expected[1, 2 * 4 + 1 * 2 + 0] = 0  # frame 2, patch row 1, patch column 0
    assert torch.equal(per_token, expected)


def test_model_timesteps_reject_a_mask_that_splits_a_patch():
    region = torch.zeros(B, T, H, W, dtype=torch.bool)
    region[:, :, :1, :2] = True  # one row of a 2x2 patch
    with pytest.raises(ValueError, match="not constant within patches"):
        model_timesteps(torch.ones(B), region, patch_size=(1, 2, 2))
    frames = image_to_video(_clip(1), latent_frames=T).mask
    with pytest.raises(ValueError, match="not constant within patches"):
        model_timesteps(torch.ones(B), frames, patch_size=(2, 2, 2))  # frame 0 alone in a 2-frame patch


# ---------------------------------------------------------------------------------------------------------
# SDEdit and noise interpolation
# ---------------------------------------------------------------------------------------------------------


def test_sdedit_start_step():
    assert [sdedit_start_step(50, s) for s in (0.0, 0.3, 1.0)] == [50, 35, 0]
    with pytest.raises(ValueError, match="strength=1.5"):
        sdedit_start_step(50, 1.5)


def test_slerp_keeps_the_norm_and_hits_the_ends():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([[2**-0.5, 2**-0.5, 0.0]]))
    noises = interpolation_noises((4, 2, 8, 8), seed_a=1, seed_b=2, num=5)  # (N, B, C, H, W)
    torch.testing.assert_close(noises[0], torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(
        noises[-1], torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    )
    # Nearly orthogonal high-dimensional noises: slerp keeps the norm between the ends; lerp would shrink
    # the midpoint by about 1/sqrt(2), which the model has never seen as a starting noise.
    norms = noises.flatten(2).norm(dim=2)  # (N, B)
    low, high = norms[[0, -1]].min(dim=0).values, norms[[0, -1]].max(dim=0).values  # (B,)
    assert ((norms > 0.99 * low) & (norms < 1.01 * high)).all()
    lerp_mid = (0.5 * (noises[0] + noises[-1])).flatten(1).norm(dim=1)  # (B,)
    assert (norms[2] > 1.3 * lerp_mid).all()
    assert torch.equal(noises, interpolation_noises((4, 2, 8, 8), seed_a=1, seed_b=2, num=5))
    torch.testing.assert_close(slerp(a, a, 0.3), a)  # parallel vectors: no division by sin(0)


# ---------------------------------------------------------------------------------------------------------
# Training masks
# ---------------------------------------------------------------------------------------------------------


def test_sampled_masks_follow_the_ratios_and_stay_valid():
    cfg = MaskSamplerConfig()  # 25% conditioned
    masks = sample_cond_mask(cfg, 4000, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioned = masks.flatten(1).any(dim=1)
    assert abs(float(conditioned.float().mean()) - (1 - cfg.none)) < 0.03
    assert not masks.flatten(1).all(dim=1).any()  # something is always left to generate
    model_timesteps(torch.ones(4000), masks, patch_size=cfg.patch_size)  # aligned to patches, else it raises
    frame_masks = masks.all(dim=(2, 3))
    first_only = (frame_masks[:, 0] & ~frame_masks[:, 1:].any(dim=1)).float().mean()
    assert first_only > cfg.i2v * 0.7  # i2v (plus extend_head with k = 1, keyframes on frame 0)


def test_sampled_masks_are_deterministic_and_respect_short_clips():
    cfg = MaskSamplerConfig.from_preset("debug")
    first = sample_cond_mask(cfg, 64, 5, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, sample_cond_mask(cfg, 64, 5, 8, 8, generator=torch.Generator().manual_seed(3)))
    images = sample_cond_mask(cfg, 256, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert not images.flatten(1).all(dim=1).any()  # an image can only be inpainted
    assert images.any() and not images.all(dim=(1, 2, 3)).any()
    assert not sample_cond_mask(MaskSamplerConfig.from_preset("none"), 64, 5, 8, 8).any()


def test_mask_sampler_config_validation_and_omegaconf():
    with pytest.raises(ValueError, match="must sum to 1"):
        MaskSamplerConfig(none=0.9)
    with pytest.raises(ValueError, match="i2v=-0.1"):
        MaskSamplerConfig(none=0.85, i2v=-0.1, extend_head=0.1 + 0.06 + 0.05)
    with pytest.raises(ValueError, match="region_max_size=1.0"):
        MaskSamplerConfig(region_max_size=1.0)
    with pytest.raises(ValueError, match="valid presets"):
        MaskSamplerConfig.from_preset("everything")
    merged = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(MaskSamplerConfig), {"patch_size": [1, 4, 4]})
    )
    assert merged == MaskSamplerConfig(patch_size=(1, 4, 4))
