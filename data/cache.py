"""Latent and text-embedding caches: encode the data once, then train the DiT without pixels.

    python -m data.cache --manifest data/manifest.csv --vae runs/vae --text-encoder default --out cache/

``build_cache`` decodes each manifest record at its bucket's shape (one clip per record, from a
start drawn with the cache's seed), encodes it with the VAE and its caption with the text encoder,
and writes shards of ``shard_size`` samples as safetensors (``{j}.latents`` (C, T', H', W'),
``{j}.text_hidden`` (S, Dt), ``{j}.text_mask`` (S,), captions and paths in the header metadata).
Each shard is written to a temporary name and renamed into place, so a shard that exists is
complete: an interrupted build restarts where it stopped. ``cache.json`` pins what the cache was
built from; resuming into a folder built from something else is refused rather than mixed.

``CachedLatentDataset`` serves ``dict(latents, text_hidden, text_mask, text, path, bucket)`` and
exposes ``buckets`` (from each latent's shape) so the same ``BucketBatchSampler`` batches it.
The VAE and the text encoder are duck-typed: anything with ``encode(x (B, 3, T, H, W)) ->
(B, C, T', H', W')`` and ``encode(list[str]) -> (hidden (B, S, Dt), mask (B, S))`` plus ``.name``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from config import from_dict
from data.atomic import atomic_path
from data.buckets import Bucket, BucketBatchSampler, BucketConfig, derive_seed
from data.dataset import VideoDataset
from data.manifest import Record, read_manifest
from data.video_io import VideoReadError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped when the shard layout changes, so that an old cache is refused instead of misread."""


def build_cache(
    records: Sequence[Record],
    *,
    vae,
    text_encoder,
    config: BucketConfig,
    out_dir: str | os.PathLike,
    shard_size: int = 64,
    encode_batch: int = 8,
    decode_workers: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    vae_id: str | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Encode every record that fits a bucket into ``out_dir``; finished shards are skipped.

    ``dtype`` casts the stored latents and text states (None keeps the encoders' dtype); ``vae_id``
    names the VAE weights in cache.json (the CLI passes the folder) so a resume with other weights
    is refused.
    """
    from tqdm import tqdm

    for name, value in (
        ("shard_size", shard_size),
        ("encode_batch", encode_batch),
        ("decode_workers", decode_workers),
    ):
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = VideoDataset(records, config, seed=seed)
    planned = [index for index, bucket in enumerate(dataset.buckets) if bucket is not None]
    shards = [planned[start : start + shard_size] for start in range(0, len(planned), shard_size)]
    _pin_identity(
        out_dir,
        {
            "format": CACHE_FORMAT,
            "records": _digest([(r.path, r.text, r.num_frames, r.height, r.width, r.fps) for r in records]),
            "buckets": dataclasses.asdict(config),
            "shard_size": shard_size,
            "seed": seed,
            "num_shards": len(shards),
            "vae": vae_id or type(vae).__name__,
            "text_encoder": text_encoder.name,
            "dtype": str(dtype) if dtype is not None else None,
        },
    )
    logger.info(
        "caching %d samples in %d shards (%d fit no bucket)",
        len(planned),
        len(shards),
        len(records) - len(planned),
    )

    def decode(index: int) -> tuple[int, torch.Tensor | None, str | None]:
        generator = torch.Generator().manual_seed(derive_seed(seed, index))
        try:
            return index, dataset.load_clip(index, dataset.buckets[index], generator=generator), None
        except VideoReadError as err:
            return index, None, f"{err.path}: {err.cause}"  # a cache keeps no stand-ins: the file is left out

    # FFmpeg decoding and torch resizing release the GIL, so threads overlap them with the encoders.
    with ThreadPoolExecutor(max_workers=decode_workers) as pool:
        for shard_index, members in enumerate(tqdm(shards, desc="caching", disable=not progress)):
            target = shard_path(out_dir, shard_index)
            if target.exists():
                continue  # renamed into place only once complete
            decoded = list(pool.map(decode, members))
            clips = [(index, clip) for index, clip, _ in decoded if clip is not None]  # (3, T, H, W) each
            failed = [error for _, _, error in decoded if error is not None]
            _write_shard(
                target,
                clips,
                failed,
                records=records,
                buckets=dataset.buckets,
                vae=vae,
                text_encoder=text_encoder,
                encode_batch=encode_batch,
                device=device,
                dtype=dtype,
            )
    return out_dir


def _write_shard(
    target: pathlib.Path,
    clips: list[tuple[int, torch.Tensor]],
    failed: list[str],
    *,
    records: Sequence[Record],
    buckets: list[Bucket | None],
    vae,
    text_encoder,
    encode_batch: int,
    device,
    dtype: torch.dtype | None,
) -> None:
    """Encode one shard's clips and captions and write them atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    latents = _encode_clips(vae, clips, buckets, batch=encode_batch, device=device)
    hidden, mask = _encode_texts(
        text_encoder, [records[index].text for index, _ in clips], batch=encode_batch
    )
    tensors, samples = {}, []
    for j, (index, _) in enumerate(clips):
        tensors[f"{j}.latents"] = _stored(latents[j], dtype)  # (C, T', H', W')
        tensors[f"{j}.text_hidden"] = _stored(hidden[j], dtype)  # (S, Dt)
        tensors[f"{j}.text_mask"] = mask[j].bool().cpu().contiguous()  # (S,)
        samples.append({"path": records[index].path, "text": records[index].text})
    metadata = {"samples": json.dumps(samples, ensure_ascii=False), "failed": json.dumps(failed)}
    with atomic_path(target) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def shard_path(out_dir: pathlib.Path, shard_index: int) -> pathlib.Path:
    return out_dir / f"shard_{shard_index:05d}.safetensors"


def _pin_identity(out_dir: pathlib.Path, identity: dict) -> None:
    """Write cache.json, or check that an existing one describes the same build."""
    path = out_dir / "cache.json"
    identity = json.loads(json.dumps(identity))  # compare as stored: tuples become lists
    if path.exists():
        existing = json.loads(path.read_text())
        changed = sorted(
            key for key in identity.keys() | existing.keys() if identity.get(key) != existing.get(key)
        )
        if changed:
            raise ValueError(
                f"{out_dir} holds a cache built with different {changed}; "
                "resume with the same settings or write to a fresh --out folder"
            )
        return
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(identity, indent=2) + "\n")


@torch.no_grad()
def _encode_clips(
    vae, clips: list[tuple[int, torch.Tensor]], buckets: list[Bucket | None], *, batch: int, device
) -> list[torch.Tensor]:
    """Latents (C, T', H', W') for each clip, encoded in same-bucket batches, in input order."""
    latents: dict[int, torch.Tensor] = {}
    by_bucket: dict[Bucket, list[int]] = {}
    for position, (index, _) in enumerate(clips):
        by_bucket.setdefault(buckets[index], []).append(position)
    for positions in by_bucket.values():
        for start in range(0, len(positions), batch):
            chunk = positions[start : start + batch]
            pixels = torch.stack([clips[p][1] for p in chunk]).to(device)  # (B, 3, T, H, W)
            encoded = vae.encode(pixels)  # (B, C, T', H', W')
            latents.update(zip(chunk, encoded.cpu(), strict=True))
    return [latents[p] for p in range(len(clips))]


@torch.no_grad()
def _encode_texts(
    text_encoder, texts: list[str], *, batch: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hidden states (S, Dt) and masks (S,) per caption; S may differ between calls (padding)."""
    hidden, mask = [], []
    for start in range(0, len(texts), batch):
        chunk_hidden, chunk_mask = text_encoder.encode(texts[start : start + batch])  # (B, S, Dt), (B, S)
        hidden += list(chunk_hidden.cpu())
        mask += list(chunk_mask.cpu())
    return hidden, mask


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor if dtype is None else tensor.to(dtype)
    return tensor.cpu().contiguous()


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def _files_digest(folder: pathlib.Path) -> str:
    """Of a model folder's weights and config: a VAE retrained into the same folder is another VAE."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(folder / name, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class CachedLatentDataset(Dataset):
    """Samples of a finished cache, bucketed by latent shape; batch it with ``sampler()``."""

    def __init__(
        self, folder: str | os.PathLike, config: BucketConfig | None = None, *, token_budget: int | None = None,
        open_shards: int = 64,
    ) -> None:
        """`config` replaces the stored bucket grid; `token_budget` replaces only its batch token budget;
        `open_shards` shard readers stay open per process between samples (0: open the shard every sample)."""
        if open_shards < 0:
            raise ValueError(f"open_shards={open_shards}: must be >= 0")
        self.open_shards = open_shards
        from safetensors import safe_open

        self.folder = pathlib.Path(folder)
        identity = json.loads((self.folder / "cache.json").read_text())
        if identity["format"] != CACHE_FORMAT:
            raise ValueError(
                f"{self.folder}: cache format {identity['format']}, this code reads {CACHE_FORMAT}"
            )
        self.config = config or from_dict(BucketConfig, identity["buckets"])
        if token_budget is not None:
            self.config = dataclasses.replace(self.config, token_budget=token_budget)
        missing = [i for i in range(identity["num_shards"]) if not shard_path(self.folder, i).exists()]
        if missing:
            raise ValueError(
                f"{self.folder}: cache incomplete, {len(missing)} of {identity['num_shards']} shards missing "
                f"(first: {shard_path(self.folder, missing[0]).name}); rerun `python -m data.cache` to finish it"
            )
        self.entries: list[tuple[pathlib.Path, int, dict]] = []
        """(shard file, position in the shard, {"path", "text"}) per sample."""
        self.buckets: list[Bucket | None] = []
        """The bucket of each sample, recovered from its latent shape (T', H', W')."""
        self.failed: list[str] = []
        """Files that could not be decoded while the cache was built."""
        for i in range(identity["num_shards"]):
            path = shard_path(self.folder, i)
            with safe_open(str(path), framework="pt") as shard:
                metadata = shard.metadata()
                for j, sample in enumerate(json.loads(metadata["samples"])):
                    _, *latent_shape = shard.get_slice(f"{j}.latents").get_shape()  # (T', H', W')
                    self.entries.append((path, j, sample))
                    self.buckets.append(self.config.bucket_of_latent(*latent_shape))
            self.failed += json.loads(metadata["failed"])
        self._shards: OrderedDict[pathlib.Path, object] = OrderedDict()
        """Open shard readers, most recently used last, made on first use in each process (a reader does not
        pickle); at most `open_shards`, so a cache of thousands of shards stays within the open-file limit."""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": OrderedDict()}  # DataLoader workers open their own readers

    def sampler(self, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> BucketBatchSampler:
        """The batch sampler over this cache's latent-shape buckets."""
        return BucketBatchSampler(self.buckets, self.config, seed=seed, rank=rank, world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        """Cached clips are fixed; kept so a training loop treats both datasets alike."""

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        from safetensors import safe_open

        path, j, sample = self.entries[index]
        # One reader per shard for the dataset's life: opening one parses the shard's header, which cost
        # the demo DiT's 6-clip steps a few percent when done for every sample.
        shard = self._shards.get(path)
        if shard is None:
            shard = self._shards[path] = safe_open(str(path), framework="pt")
        self._shards.move_to_end(path)
        while len(self._shards) > self.open_shards:
            self._shards.popitem(last=False)
        return {
            "latents": shard.get_tensor(f"{j}.latents"),  # (C, T', H', W')
            "text_hidden": shard.get_tensor(f"{j}.text_hidden"),  # (S, Dt)
            "text_mask": shard.get_tensor(f"{j}.text_mask"),  # (S,)
            "text": sample["text"],
            "path": sample["path"],
            "bucket": self.buckets[index].name,
        }


def collate_latents(samples: list[dict]) -> dict:
    """Stack latents (B, C, T', H', W'); pad captions to the longest S with masked zeros."""
    buckets = {sample["bucket"] for sample in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}; batch with BucketBatchSampler")
    length = max(sample["text_mask"].shape[0] for sample in samples)
    hidden = [F.pad(s["text_hidden"], (0, 0, 0, length - s["text_hidden"].shape[0])) for s in samples]
    mask = [F.pad(s["text_mask"], (0, length - s["text_mask"].shape[0]), value=False) for s in samples]
    return {
        "latents": torch.stack([sample["latents"] for sample in samples]),  # (B, C, T', H', W')
        "text_hidden": torch.stack(hidden),  # (B, S, Dt)
        "text_mask": torch.stack(mask),  # (B, S)
        "text": [sample["text"] for sample in samples],
        "path": [sample["path"] for sample in samples],
        "bucket": buckets.pop(),
        "failed": [],  # bad files were left out when the cache was built (see CachedLatentDataset.failed)
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--manifest", required=True, help="a .csv or .jsonl manifest (python -m data.prepare)"
    )
    parser.add_argument(
        "--vae", required=True, help="folder of a saved CausalVAE (model.safetensors + config.json)"
    )
    parser.add_argument("--text-encoder", default="default", help="TextEncoder name, folder or hub id")
    parser.add_argument("--out", required=True, help="cache folder; rerunning with the same settings resumes")
    parser.add_argument("--buckets", default="debug", help="BucketConfig preset name")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per VAE call")
    parser.add_argument("--decode-workers", type=int, default=4, help="threads decoding clips")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from dit.text_encoder import TextEncoder
    from vae.model import CausalVAE

    vae = CausalVAE.from_pretrained(args.vae, device=args.device)
    text_encoder = TextEncoder.from_pretrained(args.text_encoder, device=args.device)
    build_cache(
        read_manifest(args.manifest),
        vae=vae,
        text_encoder=text_encoder,
        config=BucketConfig.from_preset(args.buckets),
        out_dir=args.out,
        shard_size=args.shard_size,
        encode_batch=args.batch_size,
        decode_workers=args.decode_workers,
        seed=args.seed,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        vae_id=f"{pathlib.Path(args.vae).resolve()} sha256:{_files_digest(pathlib.Path(args.vae))}",
    )
    dataset = CachedLatentDataset(args.out)
    print(f"cached {len(dataset)} samples in {args.out}; {len(dataset.failed)} files could not be decoded")


if __name__ == "__main__":
    main()
