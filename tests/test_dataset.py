"""The pixel dataset: fps resampling, random starts, resize/crop, images, bad files, loaders."""

import pathlib

import pytest
import torch

from data.buckets import Bucket, BucketConfig
from data.dataset import (
    BadDataError,
    BadDataMonitor,
    VideoDataset,
    collate_samples,
    make_loader,
    resize_and_crop,
)
from data.manifest import Record, write_manifest
from data.video_io import probe, write_video

SOURCE_FRAMES, SOURCE_FPS = 30, 30.0
CONFIG = BucketConfig(resolutions=["32px"], frame_counts=[1, 5], fps=10.0, token_budget=64)
# 5 frames at 10 fps from 30 fps take every third source frame: a span of 13 source frames.


def counter_clip(num_frames, size=(48, 48)):
    """Frame i is flat grey with brightness proportional to i, so decoded pixels name their frame."""
    levels = torch.linspace(-1, 1, num_frames)  # (T,)
    return levels.view(1, num_frames, 1, 1).expand(3, num_frames, *size).contiguous()  # (3, T, H, W)


def frame_numbers(video, num_frames=SOURCE_FRAMES):
    """Inverse of counter_clip: the source frame index of every frame of a (3, T, H, W) clip."""
    brightness = video.mean(dim=(0, 2, 3))  # (T,)
    return ((brightness + 1) / 2 * (num_frames - 1)).round().long().tolist()


def record_of(path, text=""):
    info = probe(path)
    return Record(
        path=str(path),
        text=text,
        num_frames=info.num_frames,
        height=info.height,
        width=info.width,
        fps=info.fps,
    )


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Three good counter clips, one still image and three bad files (missing, truncated, garbage)."""
    root = tmp_path_factory.mktemp("media")
    good = [write_video(root / f"clip{i}.mp4", counter_clip(SOURCE_FRAMES), fps=SOURCE_FPS) for i in range(3)]
    image = write_video(root / "still.png", torch.full((3, 1, 40, 40), 0.5))
    truncated = root / "truncated.mp4"
    data = good[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = root / "garbage.mp4"
    garbage.write_bytes(bytes(range(256)) * 8)
    good_records = [record_of(path, text=f"clip {i}") for i, path in enumerate(good)]
    # The bad files were fine when the manifest was made: same metadata as a good clip.
    bad_records = [
        Record(**{**good_records[0].__dict__, "path": str(path), "extra": {}})
        for path in (root / "missing.mp4", truncated, garbage)
    ]
    return {"good": good_records, "image": record_of(image, text="a still"), "bad": bad_records}


def test_fps_resampling_takes_every_third_frame_from_a_random_start(media):
    dataset = VideoDataset(media["good"][:1], CONFIG, seed=0)
    assert dataset.buckets == [Bucket(5, 32, 32)]
    starts = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        frames = frame_numbers(sample["video"])
        start = frames[0]
        assert frames == [start + 3 * i for i in range(5)]
        assert 0 <= start <= SOURCE_FRAMES - 13
        starts.add(start)
        assert sample["video"].shape == (3, 5, 32, 32) and sample["failed"] == []
        assert -1.0 <= sample["video"].min() and sample["video"].max() <= 1.0
    assert len(starts) > 1  # the start is really drawn


def test_native_fps_takes_consecutive_frames_and_the_same_seed_replays(media):
    dataset = VideoDataset(media["good"][:1], BucketConfig(**{**CONFIG.__dict__, "fps": None}), seed=4)
    dataset.set_epoch(3)
    first = dataset[0]["video"]
    frames = frame_numbers(first)
    assert frames == list(range(frames[0], frames[0] + 5))
    again = VideoDataset(media["good"][:1], dataset.config, seed=4)
    again.set_epoch(3)
    assert torch.equal(again[0]["video"], first)


def test_resize_keeps_the_aspect_and_centre_crops():
    # A horizontal ramp, value = column index: after a 2x antialiased shrink column j of the result is
    # the mean of source columns 2j and 2j + 1, and the 32-wide centre crop starts at resized column 16.
    ramp = torch.arange(128.0).view(1, 1, 1, 128).expand(3, 2, 64, 128) / 128  # (3, T, 64, 128)
    out = resize_and_crop(ramp, 32, 32)
    assert out.shape == (3, 2, 32, 32)
    expected = (2 * torch.arange(16, 48) + 0.5) / 128
    torch.testing.assert_close(out[0, 0, 5], expected, atol=1e-5, rtol=0)
    # No resize needed: an exact centre slice.
    video = torch.rand(3, 1, 32, 48) * 2 - 1
    assert torch.equal(resize_and_crop(video, 32, 32), video[:, :, :, 8:40])


def test_images_and_videos_train_in_the_same_run(media):
    dataset = VideoDataset([*media["good"], media["image"]], CONFIG)
    assert dataset.buckets == [Bucket(5, 32, 32)] * 3 + [Bucket(1, 32, 32)]
    loader = make_loader(dataset, dataset.sampler(seed=1))
    batches = list(loader)
    by_bucket = {batch["bucket"]: batch for batch in batches}
    assert set(by_bucket) == {"5x32x32", "1x32x32"}
    still = by_bucket["1x32x32"]
    assert still["video"].shape == (1, 3, 1, 32, 32) and still["text"] == ["a still"]
    torch.testing.assert_close(still["video"], torch.full_like(still["video"], 0.5), atol=1 / 127.5, rtol=0)
    assert sorted(p for batch in batches for p in batch["path"]) == sorted(
        r.path for r in [*media["good"], media["image"]]
    )


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_files_are_replaced_within_their_bucket_and_counted(media, num_workers, caplog):
    good, bad = media["good"], media["bad"]
    dataset = VideoDataset([*good, *bad], CONFIG, seed=2)
    monitor = BadDataMonitor(max_failed_fraction=0.9, min_attempts=1)
    served = []
    for batch in make_loader(dataset, dataset.sampler(), num_workers=num_workers, timeout_s=60):
        monitor.update(batch)
        assert batch["video"].shape[0] == len(batch["path"])
        served += batch["path"]
    assert len(served) == len(dataset)  # every slot filled, bad ones by replacements
    assert set(served) <= {r.path for r in good}
    failed_paths = {line.split(": ")[0] for line in monitor.failed}
    assert failed_paths == {r.path for r in bad}  # each bad file was tried (and replacements can fail too)
    assert monitor.served == len(dataset) and len(monitor.failed) >= 3
    assert "missing.mp4: no such file" in "\n".join(monitor.failed)
    summary = f"{len(monitor.failed)} of {len(dataset) + len(monitor.failed)} decode attempts failed"
    assert summary in monitor.summary() and summary in caplog.text  # the running summary is logged


def test_too_many_failures_stop_the_run_with_the_list_of_files(media):
    dataset = VideoDataset([media["good"][0], *media["bad"]], CONFIG, seed=2)
    monitor = BadDataMonitor(max_failed_fraction=0.2, min_attempts=4)
    with pytest.raises(BadDataError, match=r"limit is 20.0%[\s\S]*missing.mp4") as caught:
        for batch in make_loader(dataset, dataset.sampler()):
            monitor.update(batch)
    assert {line.split(": ")[0] for line in caught.value.failed} <= {r.path for r in media["bad"]}


def test_a_bucket_of_only_bad_files_raises_the_same_error_through_a_worker(media):
    dataset = VideoDataset(media["bad"], CONFIG, max_attempts=3)
    with pytest.raises(BadDataError, match="3 files in a row failed"):
        dataset[0]
    with pytest.raises(BadDataError, match="3 files in a row failed"):  # the type survives the worker
        list(make_loader(dataset, dataset.sampler(), num_workers=1, timeout_s=60))


def test_a_batch_of_mixed_buckets_is_refused():
    sample = {"video": torch.zeros(3, 1, 32, 32), "text": "", "path": "a", "failed": []}
    with pytest.raises(ValueError, match="mixes buckets"):
        collate_samples([{**sample, "bucket": "1x32x32"}, {**sample, "bucket": "5x32x32"}])


def test_from_manifest_reads_the_paths_it_stored_relative(media):
    folder = pathlib.Path(media["good"][0].path).parent
    manifest = write_manifest(folder / "m.csv", media["good"])
    assert "clip0.mp4" in manifest.read_text() and str(folder) not in manifest.read_text()
    dataset = VideoDataset.from_manifest(manifest, CONFIG)
    assert [r.path for r in dataset.records] == [r.path for r in media["good"]]
    frames = frame_numbers(dataset[1]["video"])
    assert frames == [frames[0] + 3 * i for i in range(5)]


@pytest.mark.parametrize("preset", ["debug", "demo"])
def test_the_synthetic_world_fills_the_debug_and_demo_buckets(tmp_path, preset):
    from data.synthetic import write_dataset

    manifest = write_dataset(tmp_path, clips=3, images=2, heldout=0, frames=17, size=64, seed=0)
    dataset = VideoDataset.from_manifest(manifest, BucketConfig.from_preset(preset))
    assert sorted(b.name for b in dataset.buckets) == ["17x64x64"] * 3 + ["1x64x64"] * 2
    batches = list(make_loader(dataset, dataset.sampler()))
    assert sorted(len(batch["path"]) for batch in batches) == [2, 3]  # one batch per bucket
    assert all(batch["failed"] == [] for batch in batches)


def test_the_documented_resume_loop_survives_a_prefetching_worker(media):
    # Batches of one: the worker fetches ahead of the loop, so the sampler's own count runs ahead too.
    config = BucketConfig(**{**CONFIG.__dict__, "max_batch_size": 1})
    records = [*media["good"], media["image"]]

    def run(state, stop_after):
        dataset = VideoDataset(records, config, seed=1)
        sampler = dataset.sampler(seed=1)
        if state is not None:
            sampler.load_state_dict(state)
        dataset.set_epoch(sampler.epoch)
        sampler.set_epoch(sampler.epoch)
        done, paths = sampler.position, []
        for batch in make_loader(dataset, sampler, num_workers=1, timeout_s=60):
            paths += batch["path"]
            done += 1
            state = sampler.state_dict(steps_done=done)
            if len(paths) == stop_after:
                break
        return state, paths

    _, whole = run(None, stop_after=None)
    state, first = run(None, stop_after=2)
    _, rest = run(state, stop_after=None)
    assert first + rest == whole and len(whole) == len(records)


def test_decoded_cache_serves_the_same_samples_and_keeps_within_its_budget(media, monkeypatch):
    """With decoded_cache_mb every sample is bit for bit the uncached one, each file is decoded once however
    often it is read, the budget drops the least recently used file, a file over the budget is never kept,
    and a file that does not decode whole still gives the frames asked for."""
    import data.dataset as dataset_module

    records = [*media["good"], media["image"]]
    config = BucketConfig(**{**CONFIG.__dict__, "frame_counts": [1]})  # stills from clips: many reads per file
    plain = VideoDataset(records, config, seed=3)
    decodes = []
    real = dataset_module.read_frames_uint8
    monkeypatch.setattr(dataset_module, "read_frames_uint8",
                        lambda path, indices, **kw: decodes.append(path) or real(path, indices, **kw))
    cached = VideoDataset(records, config, seed=3, decoded_cache_mb=64)
    for epoch in range(3):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in range(len(records)):
            assert torch.equal(cached[index]["video"], plain[index]["video"])
    assert sorted(decodes) == sorted(r.path for r in records)  # 3 epochs, one decode per file
    clip_bytes = SOURCE_FRAMES * 48 * 48 * 3

    small = dataset_module.DecodedFiles(budget_mb=2.5 * clip_bytes / 2**20)  # room for two clips
    for record in media["good"]:
        small.frames(record.path, record.num_frames, [0])
    assert list(small.files) == [media["good"][1].path, media["good"][2].path] and small.size == 2 * clip_bytes
    small.frames(media["good"][1].path, SOURCE_FRAMES, [0])  # a hit makes it the most recent
    small.frames(media["good"][0].path, SOURCE_FRAMES, [0])
    assert list(small.files) == [media["good"][1].path, media["good"][0].path]
    tiny = dataset_module.DecodedFiles(budget_mb=0.5 * clip_bytes / 2**20)
    assert tiny.frames(media["good"][0].path, SOURCE_FRAMES, [4, 2]).shape == (2, 48, 48, 3) and not tiny.files

    decodes.clear()  # a manifest that promises more frames than the file has: the frames asked for still come
    early = tiny.frames(media["good"][0].path, SOURCE_FRAMES + 10, [3])
    assert torch.equal(torch.from_numpy(early), torch.from_numpy(real(media["good"][0].path, [3])))
    assert not tiny.files and len(decodes) == 2  # the whole file failed, then frame 3 alone
    tiny.frames(media["good"][0].path, SOURCE_FRAMES + 10, [5])
    assert len(decodes) == 3  # not tried whole again
    with pytest.raises(ValueError, match="decoded_cache_mb=-1: must be >= 0"):
        VideoDataset(records, config, decoded_cache_mb=-1)
