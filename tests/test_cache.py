"""Latent caches: parity with on-the-fly encoding, resuming, refusing mixed builds, bucketing."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open

from data.buckets import BucketConfig
from data.cache import CachedLatentDataset, build_cache, collate_latents, shard_path
from data.dataset import VideoDataset, make_loader, resize_and_crop
from data.manifest import Record
from data.video_io import probe, read_frames, write_video

CONFIG = BucketConfig(resolutions=["32px"], frame_counts=[1, 5], fps=10.0, token_budget=64)
SOURCE_FRAMES = 30


class PoolVAE:
    """A fixed causal x4x8x8 "encoder": frame 0 alone, then means of 4 frames, then 8x8 means."""

    def __init__(self, fail_after=None):
        self.calls, self.clips, self.fail_after = 0, 0, fail_after

    def encode(self, x):  # (B, 3, T, H, W)
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.clips += x.shape[0]
        rest = rearrange(x[:, :, 1:], "b c (t k) h w -> b c t k h w", k=4).mean(dim=3)  # (B, 3, T'-1, H, W)
        z = torch.cat([x[:, :, :1], rest], dim=2)  # (B, 3, T', H, W)
        return F.avg_pool3d(z, kernel_size=(1, 8, 8))  # (B, 3, T', H/8, W/8)


class CharTextEncoder:
    """Hidden state s of a caption is its s-th character code; padded to the longest in the call."""

    name = "chars"

    def encode(self, texts):
        length = max(1, max(len(t) for t in texts))
        hidden = torch.zeros(len(texts), length, 2)  # (B, S, 2)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)  # (B, S)
        for b, text in enumerate(texts):
            hidden[b, : len(text), 0] = torch.tensor([float(ord(c)) for c in text])
            hidden[b, : len(text), 1] = 1.0
            mask[b, : len(text)] = True
        return hidden, mask


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_media")
    levels = torch.linspace(-1, 1, SOURCE_FRAMES).view(1, -1, 1, 1)
    out = []
    for i in range(5):
        path = write_video(root / f"clip{i}.mp4", levels.expand(3, -1, 40, 40).contiguous(), fps=30.0)
        out.append(
            Record(
                path=str(path), text="x" * (i + 1), num_frames=SOURCE_FRAMES, height=40, width=40, fps=30.0
            )
        )
    image = write_video(root / "still.png", torch.full((3, 1, 32, 48), -0.5))
    out.append(Record(path=str(image), text="a still", num_frames=1, height=32, width=48, fps=1.0))
    garbage = root / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 512)
    out.append(Record(**{**out[0].__dict__, "path": str(garbage), "text": "bad"}))
    out.append(
        Record(path=str(root / "tiny.mp4"), text="too small", num_frames=30, height=8, width=8, fps=30.0)
    )
    info = probe(out[0].path)
    assert (info.num_frames, info.fps) == (SOURCE_FRAMES, 30.0)
    return out


def build(records, out_dir, vae=None, **kwargs):
    kwargs = {"shard_size": 2, "encode_batch": 2, "progress": False, **kwargs}
    return build_cache(
        records,
        vae=vae or PoolVAE(),
        text_encoder=CharTextEncoder(),
        config=CONFIG,
        out_dir=out_dir,
        **kwargs,
    )


def test_cached_latents_equal_encoding_the_clip_on_the_fly(records, tmp_path):
    cache = CachedLatentDataset(build(records, tmp_path / "cache"))
    assert [s[2]["path"] for s in cache.entries] == [r.path for r in records[:6]]  # garbage and tiny left out
    assert len(cache.failed) == 1 and cache.failed[0].startswith(records[6].path)
    for index, record in enumerate(records[:6]):
        sample = cache[index]
        latents = sample["latents"]  # (3, T', 4, 4)
        if record.num_frames == 1:
            clip = read_frames(record.path, [0])  # (3, 1, 32, 48)
        else:
            # Latent frame 0 is source frame `start` alone; the clip then steps 3 frames (30 -> 10 fps).
            start = round((latents[:, 0].mean().item() + 1) / 2 * (SOURCE_FRAMES - 1))
            clip = read_frames(record.path, [start + 3 * i for i in range(5)])  # (3, 5, 40, 40)
        expected = PoolVAE().encode(resize_and_crop(clip, 32, 32)[None])[0]  # (3, T', 4, 4)
        torch.testing.assert_close(latents, expected)
        assert sample["text"] == record.text and sample["path"] == record.path
        assert int(sample["text_mask"].sum()) == len(record.text)
        codes = sample["text_hidden"][sample["text_mask"], 0].tolist()
        assert codes == [float(ord(c)) for c in record.text]


def test_buckets_come_back_from_latent_shapes_and_batches_pad_captions(records, tmp_path):
    cache = CachedLatentDataset(build(records, tmp_path / "cache"))
    pixels = VideoDataset(records, CONFIG)
    assert cache.buckets == [b for b in pixels.buckets if b is not None][:6]
    seen = []
    for batch in make_loader(cache, cache.sampler(seed=3), collate_fn=collate_latents):
        bucket = {b.name: b for b in cache.buckets}[batch["bucket"]]
        assert batch["latents"].shape[2:] == CONFIG.latent_shape(bucket)
        assert batch["text_hidden"].shape[:2] == batch["text_mask"].shape
        assert batch["text_mask"].sum(dim=1).tolist() == [len(t) for t in batch["text"]]
        seen += batch["path"]
    assert sorted(seen) == sorted(r.path for r in records[:6])


def test_a_token_budget_override_changes_batch_sizes_not_buckets(records, tmp_path):
    folder = build(records, tmp_path / "cache")
    stored, halved = CachedLatentDataset(folder), CachedLatentDataset(folder, token_budget=CONFIG.token_budget // 2)
    assert halved.buckets == stored.buckets
    for bucket in set(stored.buckets):
        tokens = CONFIG.tokens(bucket)
        assert stored.sampler().batch_sizes[bucket] == CONFIG.token_budget // tokens  # no max_batch_size
        assert halved.sampler().batch_sizes[bucket] == CONFIG.token_budget // 2 // tokens


def test_an_interrupted_build_resumes_with_only_the_missing_shards(records, tmp_path):
    reference = build(records, tmp_path / "reference")
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(records, out, vae=PoolVAE(fail_after=1))  # dies while encoding the second shard
    assert shard_path(out, 0).exists() and not shard_path(out, 1).exists()
    assert not list(out.glob(".*.tmp"))  # no half-written shard lies around
    with pytest.raises(ValueError, match=r"cache incomplete, 3 of 4 shards missing.*shard_00001"):
        CachedLatentDataset(out)
    vae = PoolVAE()
    build(records, out, vae=vae)
    assert vae.clips == 4  # shard 0 (two clips) was not encoded again
    for i in range(4):
        assert read_shard(shard_path(out, i)) == read_shard(shard_path(reference, i))


def read_shard(path):
    with safe_open(str(path), framework="pt") as shard:
        return shard.metadata(), {key: shard.get_tensor(key).tolist() for key in shard.keys()}


def test_resuming_with_other_settings_is_refused(records, tmp_path):
    build(records[:2], tmp_path / "cache")
    with pytest.raises(ValueError, match=r"different \['num_shards', 'shard_size'\]"):
        build(records[:2], tmp_path / "cache", shard_size=1)
    with pytest.raises(ValueError, match=r"different \['records'\]"):
        build(records[:3][::-1][:2], tmp_path / "cache")


@pytest.mark.slow
def test_the_command_line_caches_with_the_real_vae_and_text_encoder(tmp_path):
    from data.cache import main
    from data.manifest import write_manifest
    from dit.text_encoder import TextEncoder
    from vae.model import CausalVAE, VAEConfig

    clip = write_video(tmp_path / "clip.mp4", torch.rand(3, 17, 64, 64) * 2 - 1, fps=8.0)
    still = write_video(tmp_path / "still.png", torch.rand(3, 1, 64, 64) * 2 - 1)
    records = [
        Record(path=str(clip), text="a red circle moving left", num_frames=17, height=64, width=64, fps=8.0),
        Record(path=str(still), text="a blue square", num_frames=1, height=64, width=64, fps=1.0),
    ]
    manifest = write_manifest(tmp_path / "m.csv", records)
    torch.manual_seed(0)
    vae = CausalVAE(VAEConfig.from_preset("debug"))
    vae.save_pretrained(tmp_path / "vae")
    argv = ["--manifest", str(manifest), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "cache")]
    main([*argv, "--device", "cpu", "--buckets", "debug"])

    cache = CachedLatentDataset(tmp_path / "cache")
    assert [b.name for b in cache.buckets] == ["17x64x64", "1x64x64"]
    text_encoder = TextEncoder.from_pretrained("default")
    for index, record in enumerate(records):
        sample = cache[index]
        pixels = read_frames(record.path, list(range(record.num_frames)))[None]  # (1, 3, T, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(sample["latents"], vae.encode(pixels)[0], atol=1e-5, rtol=1e-5)
        hidden, mask = text_encoder.encode([record.text])
        assert torch.equal(sample["text_mask"], mask[0])
        torch.testing.assert_close(sample["text_hidden"], hidden[0])

    # a VAE retrained into the same folder is another VAE: resuming into this cache is refused
    main([*argv, "--device", "cpu", "--buckets", "debug"])  # same weights: resumes, nothing to do
    torch.manual_seed(1)
    CausalVAE(VAEConfig.from_preset("debug")).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"different \['vae'\]"):
        main([*argv, "--device", "cpu", "--buckets", "debug"])


def test_open_shard_readers_are_bounded_and_do_not_travel_to_workers(records, tmp_path):
    """The dataset keeps shard readers open between samples (at most `open_shards`, least recently used
    closed first; 0 opens the shard for every sample) and serves the same samples as a fresh reader; a pickled copy (a spawned DataLoader
    worker) starts with none and opens its own."""
    import pickle

    folder = build(records, tmp_path / "cache")  # 6 samples in 3 shards of 2
    cache, reopening = CachedLatentDataset(folder, open_shards=2), CachedLatentDataset(folder, open_shards=0)
    for index in (0, 2, 4, 1):
        path, position, _ = cache.entries[index]
        with safe_open(str(path), framework="pt") as shard:
            assert torch.equal(cache[index]["latents"], shard.get_tensor(f"{position}.latents"))
        assert torch.equal(reopening[index]["latents"], cache[index]["latents"]) and not reopening._shards
    assert list(cache._shards) == [cache.entries[4][0], cache.entries[0][0]]
    copy = pickle.loads(pickle.dumps(cache))
    assert not copy._shards and torch.equal(copy[5]["text_hidden"], cache[5]["text_hidden"])
