"""How long does a training config's own data stream take to load, and do the loader's caches change it?

Loads the first N batches of the stream `train.py --config CONFIG` would train on (the same dataset, seed,
buckets and batch sizes), twice: without and with the loader's cache, and checks that both give the same
batches (a SHA-1 of every batch's tensor). For pixel data the cache is `data.decoded_cache_mb` (decoded
files kept in memory); for a latent cache it is the open shard readers (`CachedLatentDataset.open_shards`,
against 0: open the shard for every sample). No model runs: this is the loader's share of a step.

    python -m bench.stream --config configs/demo/recipe-vae.yaml --batches 2000 --decoded-cache-mb 512
    python -m bench.stream --config configs/demo/recipe-dit.yaml --batches 3000

The numbers of docs/demo.md (session 9) come from these two commands.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

from tqdm import tqdm


def timed_stream(make_dataset: Callable[[], object], collate: Callable, *, seed: int, batches: int,
                 label: str) -> tuple[float, list[str]]:
    """Seconds to load `batches` batches of a fresh dataset's stream, and each batch's tensor digest."""
    from data.stream import BucketStream

    stream = BucketStream(make_dataset(), seed=seed, collate=collate, num_workers=0).batches(dp_rank=0, dp_size=1)
    digests, started = [], time.perf_counter()
    for _ in tqdm(range(batches), desc=label, leave=False):
        batch = next(stream)
        tensor = batch["latents"] if "latents" in batch else batch["video"]
        digests.append(hashlib.sha1(tensor.numpy().tobytes()).hexdigest())
    return time.perf_counter() - started, digests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="a train.py YAML config (its data section is used)")
    parser.add_argument("--batches", type=int, default=500, help="batches loaded per pass")
    parser.add_argument("--decoded-cache-mb", type=float, default=512.0,
                        help="pixel data: the decoded-file cache of the second pass, in MiB")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches {args.batches}: must be >= 1")
    if args.decoded_cache_mb <= 0:
        parser.error(f"--decoded-cache-mb {args.decoded_cache_mb}: must be > 0 (the pass it is compared with has 0)")

    from config import load_config
    from train import TrainConfig

    cfg = load_config(TrainConfig, args.config)
    if cfg.data.latent_cache:
        from data.cache import CachedLatentDataset, collate_latents

        def latents(**options: int) -> Callable[[], object]:
            return lambda: CachedLatentDataset(cfg.data.latent_cache, token_budget=cfg.data.cache_token_budget,
                                               **options)

        passes = [("reopen every sample", latents(open_shards=0)), ("shard readers kept open", latents())]
        collate = collate_latents
    else:
        if not cfg.data.manifest:
            parser.error(f"--config {args.config}: its data section names neither a latent_cache nor a manifest")
        from data.dataset import VideoDataset, collate_samples

        def pixels(megabytes: float) -> Callable[[], object]:
            return lambda: VideoDataset.from_manifest(cfg.data.manifest, cfg.data.buckets, seed=cfg.seed,
                                                      decoded_cache_mb=megabytes)

        passes = [("decode every read", pixels(0)), (f"decoded cache {args.decoded_cache_mb:g} MiB",
                                                     pixels(args.decoded_cache_mb))]
        collate = collate_samples
    results = [(label, *timed_stream(make, collate, seed=cfg.seed, batches=args.batches, label=label))
               for label, make in passes]
    print(f"{args.config}: {args.batches} batches")
    for label, seconds, _ in results:
        print(f"  {label:<28} {seconds:7.1f} s  {seconds / args.batches * 1e3:7.2f} ms per batch")
    same = results[0][2] == results[1][2]
    print(f"  same batches in both passes: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
