"""Buckets and the bucket batch sampler: assignment rules, token budgets, distribution, resuming."""

import logging
import math
import random
from collections import Counter

import pytest

from config import load_config
from data.buckets import PRESETS, Bucket, BucketBatchSampler, BucketConfig, upscale_factor
from data.video_io import VideoInfo, clip_indices

GRID = BucketConfig(
    resolutions=["64px", "128px"],
    aspect_ratios=[0.5625, 1.0, 1.7778],
    frame_counts=[1, 9, 17],
    fps=8.0,
    token_budget=2048,
)


def random_files(count, seed):
    """Metadata of plausible files: sizes from 24 to 300 px, 1 to 80 frames at 8 to 60 fps."""
    rng = random.Random(seed)
    files = []
    for _ in range(count):
        frames = 1 if rng.random() < 0.2 else rng.randint(2, 80)
        fps = 1.0 if frames == 1 else rng.choice([8.0, 12.0, 24.0, 29.97, 60.0])
        files.append(
            dict(num_frames=frames, fps=fps, height=rng.randint(24, 300), width=rng.randint(24, 300))
        )
    return files


@pytest.mark.parametrize("tolerance", [0.0, 0.25])
def test_assignment_never_upscales_past_the_tolerance_and_takes_the_largest_fit(tolerance):
    config = BucketConfig(**{**GRID.__dict__, "upscale_tolerance": tolerance})
    assigned = 0
    for file in random_files(400, seed=1):
        bucket = config.assign(**file)
        info = VideoInfo(**file, is_image=file["num_frames"] == 1)
        # Every bucket at the file's nearest aspect ratio (in log space: 2:1 is as far from 1:1 as 1:2).
        ratio = nearest_ratio(config, file["height"], file["width"])
        same_ratio = [b for b in config.buckets() if nearest_ratio(config, b.height, b.width) == ratio]
        fits = [
            b
            for b in same_ratio
            if upscale_factor(file["height"], file["width"], b) <= 1 + tolerance
            and (b.num_frames == 1 or len(info_clip(info, b.num_frames, config.fps)) == b.num_frames)
        ]
        if bucket is None:
            assert fits == [], f"{file} fits {fits} but got no bucket"
            continue
        assigned += 1
        assert upscale_factor(file["height"], file["width"], bucket) <= 1 + tolerance + 1e-9
        assert bucket in fits and config.tokens(bucket) == max(config.tokens(b) for b in fits)
    assert assigned > 100  # the property was exercised, not vacuously true


def nearest_ratio(config, height, width):
    return min(config.aspect_ratios, key=lambda r: abs(math.log(r * width / height)))


def info_clip(info, frames, fps):
    try:
        return clip_indices(info, frames, fps=fps)
    except ValueError:
        return []


def test_images_take_image_buckets_and_short_videos_shorter_buckets():
    config = GRID
    assert config.assign(num_frames=1, fps=1.0, height=128, width=128) == Bucket(1, 128, 128)
    # 17 frames at 8 fps need 16 / 8 = 2 s: 49 frames at 24 fps hold exactly that, 48 do not.
    assert config.assign(num_frames=49, fps=24.0, height=128, width=128) == Bucket(17, 128, 128)
    assert config.assign(num_frames=48, fps=24.0, height=128, width=128) == Bucket(9, 128, 128)
    # Landscape 16:9 at 720p goes to the landscape bucket of the larger area.
    assert config.assign(num_frames=300, fps=30.0, height=720, width=1280) == Bucket(17, 96, 176)
    # Too small for every bucket without upscaling: no bucket.
    assert config.assign(num_frames=300, fps=30.0, height=40, width=40) is None


@pytest.mark.parametrize(
    "vae_stride, patch_size, bucket, tokens",
    [
        ((4, 8, 8), (1, 2, 2), Bucket(17, 64, 64), 5 * 4 * 4),
        ((4, 8, 8), (1, 2, 2), Bucket(1, 96, 176), 1 * 6 * 11),
        ((8, 16, 16), (1, 1, 1), Bucket(17, 64, 128), 3 * 4 * 8),
        ((4, 8, 8), (2, 2, 2), Bucket(5, 64, 64), 1 * 4 * 4),
    ],
)
def test_tokens_and_batch_size_follow_the_compression_factors(vae_stride, patch_size, bucket, tokens):
    config = BucketConfig(
        frame_counts=[bucket.num_frames], vae_stride=vae_stride, patch_size=patch_size, token_budget=1000
    )
    assert config.tokens(bucket) == tokens
    assert config.batch_size(bucket) == 1000 // tokens
    assert config.bucket_of_latent(*config.latent_shape(bucket)) == bucket


def test_small_clips_batch_wide_long_clips_narrow_and_the_cap_holds():
    config = BucketConfig.from_preset("debug")
    image, clip = Bucket(1, 64, 64), Bucket(17, 64, 64)
    assert config.batch_size(clip) == 640 // 80 == 8
    assert config.batch_size(image) == min(640 // 16, 32) == 32
    assert BucketConfig(token_budget=10).batch_size(clip) == 1  # never zero


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"frame_counts": [1, 16]}, r"frame_counts entry 16: must be k\*4 \+ 1.*nearest valid: 17"),
        ({"resolutions": ["256"]}, r"resolutions entry '256': must read 'Npx'"),
        (
            {"size_multiple": 8},
            r"size_multiple=8: must be divisible by vae_stride\[1\] \* patch_size\[1\] = 16",
        ),
        (
            {"frame_counts": [9], "patch_size": (2, 2, 2)},
            r"3 latent frames must be divisible by patch_size\[0\]=2",
        ),
        ({"aspect_ratios": [0.0]}, r"aspect_ratios=\[0.0\]"),
        ({"token_budget": 0}, r"token_budget=0"),
    ],
)
def test_config_validation_names_the_field_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        BucketConfig(**overrides)


def test_presets_are_valid_and_an_unknown_name_lists_them():
    assert set(PRESETS) >= {"debug", "demo"}
    assert BucketConfig.from_preset("demo", fps=24.0).fps == 24.0 and PRESETS["demo"].fps is None
    with pytest.raises(ValueError, match=r"unknown bucket preset 'huge'.*'debug'.*'demo'"):
        BucketConfig.from_preset("huge")


def test_yaml_maps_onto_the_config(tmp_path):
    path = tmp_path / "buckets.yaml"
    path.write_text("resolutions: [32px, 64px]\nframe_counts: [1, 9]\nvae_stride: [4, 8, 8]\nfps: 12\n")
    config = load_config(BucketConfig, path, ["token_budget=99"])
    assert config.resolutions == ["32px", "64px"] and config.fps == 12.0 and config.token_budget == 99
    assert {b.height for b in config.buckets()} == {32, 64}


# ----------------------------------------------------------------------------- the sampler


def assignments(count, seed=0, config=GRID):
    return [config.assign(**file) for file in random_files(count, seed)]


def epoch_of(samplers, epoch):
    per_rank = []
    for sampler in samplers:
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    return per_rank


@pytest.mark.parametrize("world_size, count", [(1, 150), (2, 150), (2, 151), (3, 97), (4, 40)])
def test_each_sample_appears_exactly_once_per_epoch_across_ranks(world_size, count):
    buckets = assignments(count)
    samplers = [
        BucketBatchSampler(buckets, GRID, seed=3, rank=r, world_size=world_size) for r in range(world_size)
    ]
    for epoch in (0, 1):
        per_rank = epoch_of(samplers, epoch)
        assert len({len(batches) for batches in per_rank}) == 1  # all ranks take the same number of steps
        seen = Counter(i for batches in per_rank for batch in batches for i in batch)
        assert seen == Counter(i for i, b in enumerate(buckets) if b is not None)
        for batches in per_rank:
            for batch in batches:
                assert len({buckets[i] for i in batch}) == 1
                assert len(batch) <= GRID.batch_size(buckets[batch[0]])


def test_too_few_samples_drop_the_remainder_and_say_so():
    # Batches of one sample cannot be split: 5 samples over 2 ranks leave one out.
    config = BucketConfig(frame_counts=[1], token_budget=1)
    buckets = [Bucket(1, 64, 64)] * 5
    samplers = [BucketBatchSampler(buckets, config, rank=r, world_size=2) for r in range(2)]
    per_rank = epoch_of(samplers, 0)
    assert [len(batches) for batches in per_rank] == [2, 2]
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == 4 and samplers[0].dropped_samples == 1


def test_order_is_a_function_of_seed_and_epoch():
    buckets = assignments(120)

    def order(seed, epoch):
        return epoch_of([BucketBatchSampler(buckets, GRID, seed=seed)], epoch)[0]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resuming_mid_epoch_yields_exactly_the_remaining_batches(world_size):
    buckets = assignments(200)
    for rank in range(world_size):
        sampler = BucketBatchSampler(buckets, GRID, seed=5, rank=rank, world_size=world_size)
        full = epoch_of([sampler], 2)[0]
        sampler.set_epoch(2)
        iterator = iter(sampler)
        done = [next(iterator) for _ in range(3)]
        state = sampler.state_dict()
        resumed = BucketBatchSampler(buckets, GRID, seed=5, rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the training loop re-selects the epoch it resumes; the position survives
        assert len(resumed) == len(full) - 3
        assert done + list(resumed) == full
        resumed.set_epoch(3)
        assert len(list(resumed)) == len(full)  # the next epoch is whole again


def test_state_dict_takes_the_steps_the_loop_really_finished():
    # With workers the loader fetches ahead; the training loop's own count is what counts.
    buckets = assignments(200)
    sampler = BucketBatchSampler(buckets, GRID)
    full = list(sampler)
    resumed = BucketBatchSampler(buckets, GRID)
    resumed.load_state_dict(sampler.state_dict(steps_done=4))
    assert list(resumed) == full[4:]


@pytest.mark.parametrize(
    "change",
    [
        {"config": BucketConfig(**{**GRID.__dict__, "token_budget": 512})},
        {"world_size": 2},
        {"seed": 9},
        {"count": 150},
    ],
)
def test_a_changed_setup_restarts_the_epoch_cleanly(change, caplog):
    sampler = BucketBatchSampler(assignments(200), GRID, seed=5)
    sampler.set_epoch(1)
    iterator = iter(sampler)
    for _ in range(len(sampler) - 1):  # late in the epoch: a stale position would overrun a shorter one
        next(iterator)
    state = sampler.state_dict()
    config = change.get("config", GRID)
    resumed = BucketBatchSampler(
        assignments(change.get("count", 200), config=config),
        config,
        seed=change.get("seed", 5),
        world_size=change.get("world_size", 1),
    )
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(state)
    assert "restarting epoch 1" in caplog.text
    assert resumed.epoch == 1 and len(list(resumed)) == resumed.steps_per_epoch


def test_a_position_past_the_epoch_restarts_it():
    sampler = BucketBatchSampler(assignments(100), GRID)
    state = sampler.state_dict(steps_done=sampler.steps_per_epoch + 7)
    sampler.load_state_dict(state)
    assert len(list(sampler)) == sampler.steps_per_epoch


def test_unassigned_samples_are_counted_and_the_table_reports_them(caplog):
    buckets = assignments(100)
    with caplog.at_level(logging.INFO, logger="data.buckets"):
        sampler = BucketBatchSampler(buckets, GRID)
    missing = buckets.count(None)
    assert missing > 0 and sampler.unassigned == missing
    rows = {line[:16].strip(): line[16:].split() for line in sampler.occupancy_table().splitlines()[1:-1]}
    assert rows.pop("no bucket") == [str(missing)]
    assert {name: int(row[2]) for name, row in rows.items()} == Counter(
        b.name for b in buckets if b is not None
    )
    assert sampler.occupancy_table() in caplog.text  # logged at start


def test_no_sample_fitting_any_bucket_is_a_clear_error():
    with pytest.raises(ValueError, match="none of the 3 samples fits a bucket"):
        BucketBatchSampler([None, None, None], GRID)
