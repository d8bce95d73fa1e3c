"""The pixel dataset: clips of T frames at a target fps, resized and cropped to their bucket.

``VideoDataset`` reads a manifest, assigns every record to a bucket (``BucketConfig.assign``) and
serves ``dict(video=(3, T, H, W) in [-1, 1], text, path, bucket, failed)``. A clip starts at a
random source frame (a generator seeded from (seed, epoch, index), so a run replays exactly),
takes T frames at the configured fps, has its short side resized to cover the bucket and is
centre-cropped to it. Images are T = 1 and train in the same run.

Bad data does not stop training: a missing, truncated or undecodable file is replaced by another
sample of the same bucket, and the paths that failed travel with the batch (``failed``). Counting
happens in the main process (``BadDataMonitor``), because DataLoader workers are separate processes
whose counters the trainer never sees; past ``max_failed_fraction`` the monitor raises
``BadDataError`` with the list of files. ``make_loader`` builds a DataLoader that cannot hang on a
stuck worker (a timeout) or on pinned memory (off by default).

A training loop, resumable mid-epoch:

    dataset = VideoDataset.from_manifest("data/manifest.csv", BucketConfig.from_preset("demo"), seed=seed)
    sampler = dataset.sampler(seed=seed, rank=rank, world_size=world_size)
    sampler.load_state_dict(checkpoint["sampler"])  # when resuming
    monitor = BadDataMonitor(max_failed_fraction=0.05)
    for epoch in range(sampler.epoch, epochs):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)  # keeps the resumed position when epoch is the resumed one
        done = sampler.position  # steps of this epoch already trained
        for batch in make_loader(dataset, sampler, num_workers=4):
            monitor.update(batch)  # raises BadDataError past the threshold
            ...  # batch["video"] (B, 3, T, H, W), batch["text"]
            done += 1
            checkpoint["sampler"] = sampler.state_dict(steps_done=done)
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, Dataset

from data.buckets import Bucket, BucketBatchSampler, BucketConfig, derive_seed
from data.manifest import Record, read_manifest
from data.video_io import (
    VideoInfo,
    VideoReadError,
    clip_indices,
    frames_to_tensor,
    read_frames,
    read_frames_uint8,
)

logger = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """Too much of the data failed to decode; ``failed`` lists the files and why."""

    # `failed` has a default because DataLoader re-raises a worker's exception as type(err)(message).
    def __init__(self, message: str, failed: Sequence[str] = ()):
        self.failed = list(failed)
        listing = "".join(f"\n  {line}" for line in self.failed)
        super().__init__(f"{message}{listing}")


class DecodedFiles:
    """Whole decoded files kept in memory as uint8, the least recently used dropped past `budget_mb`.

    For datasets read many times over (many epochs of a small set, or one frame of a clip per sample):
    each file is decoded once instead of once per read. The frames served are the ones `read_frames`
    decodes, bit for bit. The budget holds per process: DataLoader workers each keep their own.
    """

    def __init__(self, budget_mb: float):
        if budget_mb <= 0:
            raise ValueError(f"budget_mb={budget_mb}: must be > 0")
        self.budget = int(budget_mb * 2**20)
        self.size = 0
        self.files: OrderedDict[str, np.ndarray] = OrderedDict()
        self.partial: set[str] = set()
        """Files that did not decode whole: read frame by frame from then on, not tried whole again."""

    def frames(self, path: str | os.PathLike, num_frames: int, indices: Sequence[int], *,
               backend: str = "auto") -> np.ndarray:
        """Frames `indices` of the `num_frames`-frame file at `path`: uint8 (T, H, W, 3)."""
        key = os.fspath(path)
        if key in self.files:
            self.files.move_to_end(key)
            return self.files[key][list(indices)]
        if key in self.partial:
            return read_frames_uint8(path, indices, backend=backend)
        try:
            whole = read_frames_uint8(path, range(num_frames), backend=backend)  # (N, H, W, 3)
        except VideoReadError:
            # A file whose tail does not decode may still give the frames asked for: read those alone.
            self.partial.add(key)
            return read_frames_uint8(path, indices, backend=backend)
        if whole.nbytes <= self.budget:
            self.files[key] = whole
            self.size += whole.nbytes
            while self.size > self.budget:
                self.size -= self.files.popitem(last=False)[1].nbytes
        return whole[list(indices)]


class VideoDataset(Dataset):
    """Bucketed pixel clips from manifest records; pair it with ``sampler()`` in a DataLoader.

    `decoded_cache_mb` > 0 keeps decoded files in memory up to that size (``DecodedFiles``), for data
    read over and over: the demo VAE's stills stage reads one frame of a clip per sample, 8 times per file.
    """

    def __init__(
        self,
        records: Sequence[Record],
        config: BucketConfig,
        *,
        seed: int = 0,
        max_attempts: int = 8,
        backend: str = "auto",
        decoded_cache_mb: float = 0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts}: must be >= 1")
        if decoded_cache_mb < 0:
            raise ValueError(f"decoded_cache_mb={decoded_cache_mb}: must be >= 0 (0 = decode on every read)")
        self.records, self.config = list(records), config
        self.seed, self.max_attempts, self.backend = seed, max_attempts, backend
        self.decoded = DecodedFiles(decoded_cache_mb) if decoded_cache_mb else None
        self.epoch = 0
        # Files share metadata (a few sizes and rates, many repeated lengths), so assign each
        # distinct (frames, fps, height, width) once: a million-record manifest loads in seconds.
        assigned: dict[tuple, Bucket | None] = {}
        self.buckets: list[Bucket | None] = []
        """The bucket of each record; None for records that fit no bucket (the sampler skips them)."""
        for r in self.records:
            key = (r.num_frames, r.fps, r.height, r.width)
            if key not in assigned:
                assigned[key] = config.assign(
                    num_frames=r.num_frames, fps=r.fps, height=r.height, width=r.width
                )
            self.buckets.append(assigned[key])
        self.members: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            if bucket is not None:
                self.members.setdefault(bucket, []).append(index)

    @classmethod
    def from_manifest(cls, path: str | os.PathLike, config: BucketConfig, **kwargs) -> VideoDataset:
        """A dataset over every record of a ``.csv`` or ``.jsonl`` manifest."""
        return cls(read_manifest(path), config, **kwargs)

    def sampler(self, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> BucketBatchSampler:
        """The batch sampler over this dataset's bucket assignments."""
        return BucketBatchSampler(self.buckets, self.config, seed=seed, rank=rank, world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        """Re-draw clip starts for a new epoch (call it with the sampler's ``set_epoch``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        bucket = self.buckets[index]
        if bucket is None:
            raise IndexError(
                f"sample {index} ({self.records[index].path}) fits no bucket; use the bucket sampler"
            )
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))
        failed, attempts = [], 0
        for candidate in self._candidates(index, bucket, generator):
            attempts += 1
            try:
                video = self.load_clip(candidate, bucket, generator=generator)  # (3, T, H, W)
            except VideoReadError as err:
                failed.append(f"{err.path}: {err.cause}")
                logger.warning("replacing a bad sample: %s", err)
                continue
            record = self.records[candidate]
            return {
                "video": video,
                "text": record.text,
                "path": record.path,
                "bucket": bucket.name,
                "failed": failed,
            }
        raise BadDataError(f"bucket {bucket.name}: {attempts} files in a row failed to decode", failed)

    def _candidates(self, index: int, bucket: Bucket, generator: torch.Generator) -> Iterator[int]:
        """``index``, then distinct random members of its bucket (same shape, so the batch still
        stacks), drawn only as needed: never the same bad file twice, and no per-sample cost that
        grows with the bucket."""
        members = self.members[bucket]
        tried = {index}
        yield index
        while len(tried) < min(self.max_attempts, len(members)):
            candidate = members[int(torch.randint(len(members), (1,), generator=generator))]
            if candidate not in tried:
                tried.add(candidate)
                yield candidate

    def load_clip(self, index: int, bucket: Bucket, *, generator: torch.Generator) -> torch.Tensor:
        """Record ``index`` as a (3, T, H, W) clip of ``bucket``'s shape, from a random start."""
        record = self.records[index]
        info = VideoInfo(
            num_frames=record.num_frames,
            fps=record.fps,
            height=record.height,
            width=record.width,
            is_image=record.num_frames == 1,
        )
        fps = self.config.fps if bucket.num_frames > 1 else None  # one frame has no rate to resample
        span = clip_indices(info, bucket.num_frames, fps=fps)[-1] + 1  # source frames the clip covers
        start = int(torch.randint(record.num_frames - span + 1, (1,), generator=generator))
        indices = clip_indices(info, bucket.num_frames, fps=fps, start=start)
        if self.decoded is None:
            video = read_frames(record.path, indices, backend=self.backend)  # (3, T, h, w)
        else:
            video = frames_to_tensor(self.decoded.frames(record.path, record.num_frames, indices,
                                                         backend=self.backend))  # (3, T, h, w)
        return resize_and_crop(video, bucket.height, bucket.width)  # (3, T, H, W)


def resize_and_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (3, T, h, w) so it covers (height, width) with its aspect kept, then centre-crop."""
    _, _, source_height, source_width = video.shape
    scale = max(height / source_height, width / source_width)
    resized_height = max(height, round(source_height * scale))
    resized_width = max(width, round(source_width * scale))
    if (resized_height, resized_width) != (source_height, source_width):
        frames = rearrange(video, "c t h w -> t c h w")  # (T, 3, h, w)
        # Antialiasing matters when shrinking large frames: without it fine texture aliases.
        frames = F.interpolate(frames, size=(resized_height, resized_width), mode="bilinear", antialias=True)
        video = rearrange(frames, "t c h w -> c t h w").clamp(-1, 1)  # (3, T, h', w')
    top = (resized_height - height) // 2
    left = (resized_width - width) // 2
    return video[:, :, top : top + height, left : left + width]  # (3, T, H, W)


def collate_samples(samples: list[dict]) -> dict:
    """One batch: video (B, 3, T, H, W), text/path lists, the shared bucket, every failed file."""
    buckets = {sample["bucket"] for sample in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}; batch with BucketBatchSampler")
    return {
        "video": torch.stack([sample["video"] for sample in samples]),  # (B, 3, T, H, W)
        "text": [sample["text"] for sample in samples],
        "path": [sample["path"] for sample in samples],
        "bucket": buckets.pop(),
        "failed": [line for sample in samples for line in sample["failed"]],
    }


class BadDataMonitor:
    """Counts failed files across batches (and workers) and stops the run when too many fail.

    ``update(batch)`` after each batch; the failed fraction is failed / (served + failed) decode
    attempts. It is checked only after ``min_attempts`` so that one early bad file cannot stop a run.
    """

    def __init__(self, *, max_failed_fraction: float = 0.05, min_attempts: int = 100) -> None:
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction={max_failed_fraction}: must be in [0, 1]")
        if min_attempts < 1:
            raise ValueError(f"min_attempts={min_attempts}: must be >= 1")
        self.max_failed_fraction, self.min_attempts = max_failed_fraction, min_attempts
        self.served = 0
        self.failed: list[str] = []

    @property
    def failed_fraction(self) -> float:
        attempts = self.served + len(self.failed)
        return len(self.failed) / attempts if attempts else 0.0

    def update(self, batch: dict) -> None:
        """Count a batch from ``collate_samples``; raise ``BadDataError`` past the threshold."""
        self.served += len(batch["path"])
        self.failed += batch["failed"]
        if batch["failed"]:
            logger.warning("bad data: %s", self.summary())
        attempts = self.served + len(self.failed)
        if attempts >= self.min_attempts and self.failed_fraction > self.max_failed_fraction:
            raise BadDataError(f"{self.summary()}; the limit is {self.max_failed_fraction:.1%}", self.failed)

    def summary(self) -> str:
        """One line for the training log."""
        return (
            f"{len(self.failed)} of {self.served + len(self.failed)} decode attempts failed "
            f"({self.failed_fraction:.2%}) and were replaced by other samples of their bucket"
        )


def make_loader(
    dataset: Dataset,
    batch_sampler: BucketBatchSampler,
    *,
    num_workers: int = 0,
    timeout_s: float = 300.0,
    pin_memory: bool = False,
    collate_fn=collate_samples,
) -> DataLoader:
    """A DataLoader over bucketed batches that fails loudly instead of hanging.

    Workers get ``timeout_s`` per batch (a decoder stuck on a broken file raises instead of
    stalling every rank); pinned memory is off by default because pinned-memory threads are a known
    source of hangs at shutdown; workers are not persistent so each epoch's workers see the epoch
    set on the dataset.
    """
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        timeout=timeout_s if num_workers > 0 else 0.0,
        persistent_workers=False,
    )
