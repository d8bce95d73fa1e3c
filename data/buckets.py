"""Buckets: which (frames, height, width) each sample trains at, and how many share a batch.

A bucket is one pixel shape (T, H, W). The grid of buckets is the product of resolutions (by area:
"256px" means H·W ≈ 256², rounded to a multiple of ``size_multiple``), aspect ratios (height / width,
as in Open-Sora's manifests) and frame counts (4k + 1; 1 is an image, so images and videos train in
the same run).

A sample goes to the largest bucket it fills: at the aspect ratio nearest its own, among the
buckets whose frames it holds at the target fps and whose size it covers without being upscaled by
more than ``upscale_tolerance``. "Largest" is counted in latent tokens,
(T'/pt)·(H'/ph)·(W'/pw) with T' = (T - 1)/st + 1, H' = H/sh, W' = W/sw for VAE strides (st, sh, sw)
and patch (pt, ph, pw); the batch size of a bucket is ``token_budget // tokens``, so small clips
batch wide and long clips batch narrow at a similar memory cost.

``BucketBatchSampler`` turns the assignments into batches: deterministic from (seed, epoch),
split over ranks, resumable mid-epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import Sampler

from data.video_io import VideoInfo, clip_indices

logger = logging.getLogger(__name__)

_PX = re.compile(r"^(\d+)px$")


@dataclass(frozen=True, order=True)
class Bucket:
    """One training shape in pixels; every sample of a batch shares it."""

    num_frames: int
    """T: frames per clip (1 for images)."""
    height: int
    """H in pixels."""
    width: int
    """W in pixels."""

    @property
    def name(self) -> str:
        """``"TxHxW"``, e.g. ``"17x64x64"``: the bucket's key in logs, samples and state dicts."""
        return f"{self.num_frames}x{self.height}x{self.width}"


@dataclass
class BucketConfig:
    """The bucket grid, the frame rate clips are sampled at and the per-batch token budget."""

    resolutions: list[str] = field(default_factory=lambda: ["64px"])
    """Target areas as ``"Npx"`` (H·W ≈ N²), e.g. ``["256px", "512px"]``."""
    aspect_ratios: list[float] = field(default_factory=lambda: [1.0])
    """Bucket aspect ratios as height / width (0.5625 is landscape 16:9, 1.0 square)."""
    frame_counts: list[int] = field(default_factory=lambda: [1, 17])
    """Frames per clip; each must be k·st + 1 for the VAE time stride st (1 = images)."""
    fps: float | None = None
    """Frame rate clips are sampled at (the stride follows from each file's fps); None = native rate.
    A source slower than this repeats frames, so set it at or below the data's usual rate."""
    upscale_tolerance: float = 0.0
    """How much a sample may be enlarged to fill a bucket: 0.1 allows a 10% upscale, 0 none."""
    token_budget: int = 1024
    """Latent tokens per batch; a bucket's batch size is token_budget // its tokens per sample."""
    max_batch_size: int | None = None
    """Upper bound on any bucket's batch size (None = only the token budget limits it)."""
    vae_stride: tuple[int, ...] = (4, 8, 8)
    """VAE compression (st, sh, sw): T' = (T - 1)/st + 1, H' = H/sh, W' = W/sw."""
    patch_size: tuple[int, ...] = (1, 2, 2)
    """DiT patch (pt, ph, pw) over the latent grid."""
    size_multiple: int = 16
    """Bucket heights and widths are rounded to multiples of this (VAE × patch = 16 by default)."""

    def __post_init__(self) -> None:
        if not self.resolutions:
            raise ValueError("resolutions=[]: give at least one area such as '256px'")
        for resolution in self.resolutions:
            if not _PX.match(resolution) or int(resolution[:-2]) < 1:
                raise ValueError(
                    f"resolutions entry {resolution!r}: must read 'Npx' with N >= 1, e.g. '256px'"
                )
        if not self.aspect_ratios or any(ratio <= 0 for ratio in self.aspect_ratios):
            raise ValueError(f"aspect_ratios={self.aspect_ratios}: must be a non-empty list of values > 0")
        if len(self.vae_stride) != 3 or any(s < 1 for s in self.vae_stride):
            raise ValueError(f"vae_stride={self.vae_stride}: must be three positive ints (st, sh, sw)")
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size={self.patch_size}: must be three positive ints (pt, ph, pw)")
        time_stride, patch_t = self.vae_stride[0], self.patch_size[0]
        if not self.frame_counts:
            raise ValueError("frame_counts=[]: give at least one frame count, e.g. [1, 17]")
        for frames in self.frame_counts:
            if frames < 1 or (frames - 1) % time_stride:
                nearest = max(1, round((frames - 1) / time_stride) * time_stride + 1)
                raise ValueError(
                    f"frame_counts entry {frames}: must be k*{time_stride} + 1 for vae_stride[0]={time_stride} "
                    f"(nearest valid: {nearest})"
                )
            if ((frames - 1) // time_stride + 1) % patch_t:
                raise ValueError(
                    f"frame_counts entry {frames}: its {(frames - 1) // time_stride + 1} latent frames "
                    f"must be divisible by patch_size[0]={patch_t}"
                )
        for axis in (1, 2):
            unit = self.vae_stride[axis] * self.patch_size[axis]
            if self.size_multiple % unit:
                raise ValueError(
                    f"size_multiple={self.size_multiple}: must be divisible by vae_stride[{axis}] * "
                    f"patch_size[{axis}] = {unit}"
                )
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps={self.fps}: must be > 0 or None for the native rate")
        if self.upscale_tolerance < 0:
            raise ValueError(f"upscale_tolerance={self.upscale_tolerance}: must be >= 0")
        if self.token_budget < 1:
            raise ValueError(f"token_budget={self.token_budget}: must be >= 1")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size}: must be >= 1 or None")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BucketConfig:
        """A named preset from ``PRESETS`` with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown bucket preset {name!r}; valid names: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def buckets(self) -> list[Bucket]:
        """Every distinct bucket of the grid, smallest first."""
        shapes = {
            Bucket(frames, *self._bucket_size(int(resolution[:-2]), ratio))
            for resolution in self.resolutions
            for ratio in self.aspect_ratios
            for frames in self.frame_counts
        }
        return sorted(shapes, key=self._size_key)

    def latent_shape(self, bucket: Bucket) -> tuple[int, int, int]:
        """(T', H', W') of the bucket's latents."""
        time_stride, height_stride, width_stride = self.vae_stride
        return (
            (bucket.num_frames - 1) // time_stride + 1,
            bucket.height // height_stride,
            bucket.width // width_stride,
        )

    def bucket_of_latent(self, latent_frames: int, latent_height: int, latent_width: int) -> Bucket:
        """The pixel bucket whose latents have this (T', H', W'); inverse of ``latent_shape``."""
        time_stride, height_stride, width_stride = self.vae_stride
        return Bucket(
            (latent_frames - 1) * time_stride + 1, latent_height * height_stride, latent_width * width_stride
        )

    def tokens(self, bucket: Bucket) -> int:
        """DiT tokens of one sample of the bucket."""
        latent_frames, latent_height, latent_width = self.latent_shape(bucket)
        patch_t, patch_h, patch_w = self.patch_size
        return (latent_frames // patch_t) * (latent_height // patch_h) * (latent_width // patch_w)

    def batch_size(self, bucket: Bucket) -> int:
        """Samples per batch: as many as the token budget holds, at least one."""
        size = max(1, self.token_budget // self.tokens(bucket))
        return size if self.max_batch_size is None else min(size, self.max_batch_size)

    def assign(self, *, num_frames: int, fps: float, height: int, width: int) -> Bucket | None:
        """The largest bucket a file with this metadata fills, or None when it fits none."""
        ratio = min(self.aspect_ratios, key=lambda r: abs(math.log(r * width / height)))
        info = VideoInfo(num_frames=num_frames, fps=fps, height=height, width=width, is_image=num_frames == 1)
        at_ratio = {
            Bucket(frames, *self._bucket_size(int(resolution[:-2]), ratio))
            for resolution in self.resolutions
            for frames in self.frame_counts
        }
        fitting = [
            bucket
            for bucket in at_ratio
            if upscale_factor(height, width, bucket) <= 1.0 + self.upscale_tolerance + 1e-9
            and self._holds_frames(info, bucket.num_frames)
        ]
        return max(fitting, key=self._size_key, default=None)

    def _bucket_size(self, resolution: int, ratio: float) -> tuple[int, int]:
        """(H, W) with H / W ≈ ratio and H·W ≈ resolution², each a multiple of size_multiple."""
        unit = self.size_multiple
        height = max(unit, round(resolution * math.sqrt(ratio) / unit) * unit)
        width = max(unit, round(resolution / math.sqrt(ratio) / unit) * unit)
        return height, width

    def _holds_frames(self, info: VideoInfo, frames: int) -> bool:
        if frames == 1:
            return True  # a single frame has no frame rate: every file holds one
        try:
            clip_indices(info, frames, fps=self.fps)
        except ValueError:
            return False
        return True

    def _size_key(self, bucket: Bucket) -> tuple[int, int, int]:
        return (self.tokens(bucket), bucket.num_frames, bucket.height * bucket.width)


def upscale_factor(height: int, width: int, bucket: Bucket) -> float:
    """How much a (height, width) frame is enlarged when its short side is resized to cover the bucket."""
    return max(bucket.height / height, bucket.width / width)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of sample indices, one bucket per batch, for a ``DataLoader(batch_sampler=...)``.

    Each epoch shuffles every bucket's members with a generator seeded from (seed, epoch), cuts them
    into batches of the bucket's batch size (a bucket's last batch may be smaller), then shuffles the
    batches so buckets interleave. Across ``world_size`` ranks, rank r takes batches r, r + W, ...;
    when the batch count is not a multiple of W the largest batches are halved until it is, so every
    sample appears exactly once per epoch and every rank takes the same number of steps. Only when
    there are fewer samples than that (almost every batch is a single sample) are the last
    ``count % W`` batches dropped; ``dropped_samples`` says how many samples that costs.

    Resuming: ``state_dict(steps_done)`` records the epoch and how many steps of it are done;
    ``load_state_dict`` continues with exactly the remaining batches. If the data, the bucket config,
    the seed or the world size changed since the checkpoint, the saved position means nothing, so the
    epoch restarts from its first batch with a warning (never an IndexError).
    """

    def __init__(
        self,
        buckets: Sequence[Bucket | None],
        config: BucketConfig,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size"
            )
        self.config, self.seed, self.rank, self.world_size = config, seed, rank, world_size
        self.members: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(buckets):
            if bucket is not None:
                self.members.setdefault(bucket, []).append(index)
        self.members = dict(sorted(self.members.items()))  # a fixed bucket order makes epochs reproducible
        self.unassigned = sum(bucket is None for bucket in buckets)
        """Samples that fit no bucket: never yielded, reported in the occupancy table."""
        self.batch_sizes = {bucket: config.batch_size(bucket) for bucket in self.members}
        if not self.members:
            raise ValueError(f"none of the {len(buckets)} samples fits a bucket of this config: {config}")
        self.epoch, self.position = 0, 0
        batches = self._epoch_batches(0)
        self.steps_per_epoch = len(batches) // world_size
        self.dropped_samples = sum(len(members) for members in self.members.values()) - sum(
            len(batch) for batch in batches[: self.steps_per_epoch * world_size]
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{sum(map(len, self.members.values()))} samples cannot give one batch to each of {world_size} ranks"
            )
        self._fingerprint = _fingerprint(
            [bucket.name if bucket else None for bucket in buckets],
            {bucket.name: size for bucket, size in self.batch_sizes.items()},
            seed,
            world_size,
        )
        logger.info("bucket occupancy:\n%s", self.occupancy_table())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; re-selecting the current epoch keeps a resumed position."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        """Steps left in the current epoch on this rank."""
        return self.steps_per_epoch - self.position

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self.epoch)
        mine = batches[self.rank : self.steps_per_epoch * self.world_size : self.world_size]
        for step in range(self.position, self.steps_per_epoch):
            self.position = step + 1
            yield mine[step]
        self.position = 0  # iterating again without set_epoch replays the whole epoch

    def state_dict(self, steps_done: int | None = None) -> dict:
        """Where this epoch stands. A DataLoader with workers fetches ahead of the training loop, so
        pass ``steps_done`` (the steps the loop has finished this epoch); without it the sampler's own
        count of handed-out batches is used, which is exact only for ``num_workers=0``."""
        return {
            "epoch": self.epoch,
            "position": self.position if steps_done is None else steps_done,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; restart its epoch cleanly when the saved position no longer applies."""
        self.epoch = int(state["epoch"])
        position = int(state["position"])
        if state.get("fingerprint") != self._fingerprint:
            logger.warning(
                "data, bucket config, seed or world size changed since this sampler state was saved; "
                "restarting epoch %d from its first batch",
                self.epoch,
            )
            position = 0
        elif not 0 <= position <= self.steps_per_epoch:
            logger.warning(
                "saved position %d is outside epoch %d's %d steps; restarting the epoch",
                position,
                self.epoch,
                self.steps_per_epoch,
            )
            position = 0
        self.position = position

    def occupancy_table(self) -> str:
        """Samples, batch size and batches per bucket, plus the samples that fit no bucket."""
        lines = [f"{'bucket':<16}{'tokens':>8}{'batch':>7}{'samples':>9}{'batches':>9}"]
        for bucket, members in self.members.items():
            size = self.batch_sizes[bucket]
            lines.append(
                f"{bucket.name:<16}{self.config.tokens(bucket):>8}{size:>7}{len(members):>9}{-(-len(members) // size):>9}"
            )
        lines.append(f"{'no bucket':<16}{'':>8}{'':>7}{self.unassigned:>9}{'':>9}")
        lines.append(
            f"{self.steps_per_epoch} steps per epoch on each of {self.world_size} ranks; "
            f"{self.dropped_samples} samples dropped to keep ranks equal"
        )
        return "\n".join(lines)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of an epoch, in order; identical on every rank."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        batches = []
        for bucket, members in self.members.items():
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            size = self.batch_sizes[bucket]
            batches += [shuffled[start : start + size] for start in range(0, len(shuffled), size)]
        batches = _balance(batches, self.world_size)
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]


def _balance(batches: list[list[int]], world_size: int) -> list[list[int]]:
    """Halve the largest batches until the count is a multiple of world_size (when enough samples)."""
    batches = list(batches)
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        batch = batches[largest]
        if len(batch) < 2:
            break  # every batch is one sample: the caller drops the remainder
        half = len(batch) // 2
        batches[largest : largest + 1] = [batch[:half], batch[half:]]
    return batches


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process (unlike ``hash`` of strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


PRESETS: dict[str, BucketConfig] = {
    # The synthetic world: 64×64 clips of 17 frames and stills, on a CPU.
    "debug": BucketConfig(
        resolutions=["64px"], aspect_ratios=[1.0], frame_counts=[1, 17], token_budget=640, max_batch_size=32
    ),
    # The demo run on the synthetic world (python -m data.synthetic, 8 fps): clips keep their native
    # rate, three shapes at two sizes; 64x64 clips and stills fill the 64px buckets.
    "demo": BucketConfig(
        resolutions=["64px", "128px"],
        aspect_ratios=[0.5625, 1.0, 1.7778],
        frame_counts=[1, 17, 33],
        upscale_tolerance=0.1,
        token_budget=8192,
        max_batch_size=64,
    ),
    # A real run at 256px and 512px (an Open-Sora-like grid). The token budget is a starting point:
    # raise or lower it after watching memory for your model and card.
    "base": BucketConfig(
        resolutions=["256px", "512px"],
        aspect_ratios=[0.5625, 0.75, 1.0, 1.3333, 1.7778],
        frame_counts=[1, 17, 33, 49, 65],
        fps=16.0,
        upscale_tolerance=0.1,
        token_budget=65536,
        max_batch_size=128,
    ),
}
