"""The causal video VAE: (B, 3, T, H, W) pixels in [-1, 1] <-> (B, C, T', H', W') latents.

Compression is x8 in space and x4 in time for the default presets, with the first frame encoded
alone: T = 4k + 1 frames give T' = k + 1 latent frames, so an image is exactly a one-frame video.
The structure and parameter names are those of the Wan 2.1 VAE (`encoder.conv1`,
`encoder.downsamples.N`, `encoder.middle`, `encoder.head`, `conv1`, `conv2`, `decoder.*`), so the
public Wan 2.1 weights load as they are (`vae/convert.py`).

`encode` and `decode` run chunk by chunk along time with a `TimeCache` (1 frame, then
4 * `chunk_latent_frames` frames per chunk when encoding; `chunk_latent_frames` latent frames per
chunk when decoding), so peak memory does not grow with the clip's length. `forward` (training)
runs the whole clip at once; both paths compute the same function.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vae.layers import (
    AttentionBlock,
    CausalConv3d,
    Downsample,
    ResidualBlock,
    RMSNorm,
    TimeCache,
    Upsample,
    run_layers,
)

# Per-channel mean and std of Wan 2.1's raw latents, published with its VAE code.
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


@dataclass
class VAEConfig:
    base_dim: int = 96
    """Channels of the first encoder level; level i has base_dim * dim_mult[i]."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per level; every level but the last halves H and W (4 levels: x8)."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder has one more per level, as in Wan)."""
    decoder_blocks: tuple[int, ...] | None = None
    """Residual blocks per decoder level, lowest resolution first (len(dim_mult) entries); None: num_res_blocks + 1
    at every level. `python -m vae.resize` grows a trained decoder this way without changing its latent space."""
    latent_channels: int = 16
    """Channels C of the latent (B, C, T', H', W')."""
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    """For each downsampling level (len(dim_mult) - 1 entries), whether it also halves time."""
    dropout: float = 0.0
    """Dropout inside the residual blocks."""
    per_frame_init: bool = False
    """Start as a per-frame image VAE (earlier time taps zero, time resamplers keep/repeat frames), for
    training from scratch: images then train exactly the path clips start from (docs/demo.md)."""
    logvar_init: float = 0.0
    """Initial bias of the posterior's log-variance; below 0 the decoder first sees a less noisy latent."""
    latents_mean: list[float] | None = None
    """Per-channel mean of raw latents over a dataset (`python -m vae.stats`); None: not measured (0)."""
    latents_std: list[float] | None = None
    """Per-channel std of raw latents over a dataset; None: not measured (1)."""
    chunk_latent_frames: int = 1
    """Latent frames per time chunk in encode/decode. Memory grows with it, not with clip length; 1 is Wan's."""
    tile_size: int = 256
    """Spatial tile edge in pixels for encode/decode(tiling=True); a multiple of the spatial factor."""
    tile_overlap: int = 64
    """Overlap between neighbouring tiles in pixels (cross-faded over its middle half); a multiple of the spatial factor."""

    def __post_init__(self) -> None:
        self.dim_mult = tuple(self.dim_mult)
        self.temporal_downsample = tuple(self.temporal_downsample)
        if self.decoder_blocks is not None:
            self.decoder_blocks = tuple(self.decoder_blocks)
            if len(self.decoder_blocks) != len(self.dim_mult) or min(self.decoder_blocks) < 1:
                raise ValueError(
                    f"decoder_blocks={self.decoder_blocks}: needs len(dim_mult) = {len(self.dim_mult)} "
                    "entries, each >= 1 (residual blocks per decoder level, lowest resolution first)"
                )
        for name in ("base_dim", "num_res_blocks", "latent_channels", "chunk_latent_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"dim_mult={self.dim_mult}: must be a non-empty tuple of positive ints")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample={self.temporal_downsample}: needs len(dim_mult) - 1 = "
                f"{len(self.dim_mult) - 1} entries, one per downsampling level"
            )
        for mult in self.dim_mult[1:]:
            # the decoder's upsamplers halve the channels of every level but the first
            if self.base_dim * mult % 2:
                raise ValueError(
                    f"base_dim={self.base_dim}, dim_mult={self.dim_mult}: level widths must be even"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: must be in [0, 1)")
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self, name)
            if stats is not None and len(stats) != self.latent_channels:
                raise ValueError(
                    f"{name} has {len(stats)} values: needs latent_channels={self.latent_channels}"
                )
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std: set both or neither")
        if self.latents_std is not None and min(self.latents_std) <= 0:
            raise ValueError(f"latents_std={self.latents_std}: every value must be > 0")
        if self.tile_size % self.spatial_factor or self.tile_overlap % self.spatial_factor:
            raise ValueError(
                f"tile_size={self.tile_size}, tile_overlap={self.tile_overlap}: "
                f"must be multiples of the spatial factor {self.spatial_factor}"
            )
        if not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(f"tile_overlap={self.tile_overlap}: must be in [0, tile_size={self.tile_size})")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def level_decoder_blocks(self) -> tuple[int, ...]:
        """Residual blocks at each decoder level, lowest resolution first."""
        return self.decoder_blocks or (self.num_res_blocks + 1,) * len(self.dim_mult)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VAEConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}: valid presets are {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        return cls(**json.loads(Path(path).read_text()))


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))) from the encoder's 2C output channels."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # each (B, C, T', H', W')
        # the clamp keeps exp() finite early in training; it never binds for a trained model
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, averaged over latent elements: (B,)."""
        per_element = 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar)
        return per_element.flatten(1).mean(dim=1)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * mult for mult in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout=cfg.dropout))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                blocks.append(Downsample(out_dim, time=cfg.temporal_downsample[level]))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(
            ResidualBlock(out_dim, out_dim, dropout=cfg.dropout),
            AttentionBlock(out_dim),
            ResidualBlock(out_dim, out_dim, dropout=cfg.dropout),
        )
        self.head = nn.Sequential(
            RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 2 * cfg.latent_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)  # (B, D, T, H, W)
        x = run_layers(self.downsamples, x, cache)  # (B, D', T', H', W')
        x = run_layers(self.middle, x, cache)
        return run_layers(self.head, x, cache)  # (B, 2C, T', H', W')


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * mult for mult in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.latent_channels, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout=cfg.dropout),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], dropout=cfg.dropout),
        )
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if level > 0:
                in_dim //= 2  # the previous level's Upsample halved the channels
            for _ in range(cfg.level_decoder_blocks[level]):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout=cfg.dropout))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                blocks.append(Upsample(out_dim, time=temporal_upsample[level]))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, z: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        x = self.conv1(z, cache)  # (B, D, T', H', W')
        x = run_layers(self.middle, x, cache)
        x = run_layers(self.upsamples, x, cache)  # (B, D', T, H, W)
        return run_layers(self.head, x, cache)  # (B, 3, T, H, W)


class CausalVAE(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)  # moments projection
        self.conv2 = CausalConv3d(cfg.latent_channels, cfg.latent_channels, 1)  # latent projection
        self.decoder = Decoder(cfg)
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                module.reset_parameters()  # PyTorch's fan-in uniform init, as Wan trains from
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.gamma)
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                # attention starts as the identity (its residual branch is zero), as in Wan
                nn.init.zeros_(module.proj.weight)
        with torch.no_grad():
            # the moments projection's second half of outputs is the log-variance
            self.conv1.bias[self.cfg.latent_channels :].fill_(self.cfg.logvar_init)
            if self.cfg.per_frame_init:
                self._init_per_frame()

    @torch.no_grad()
    def _init_per_frame(self) -> None:
        """Zero every causal conv's earlier time taps; time resamplers pass frame 2j down and repeat frames up.

        The fresh model is then an image VAE applied to frames 0, 4, 8, ... with each decoded frame
        repeated, and an image (whose earlier taps only ever see zero padding) trains every weight it starts from.
        """
        for module in self.modules():  # a resampler comes before its time_conv, whose earlier taps are then zero already
            if isinstance(module, CausalConv3d) and module.kernel_size[0] > 1:
                module.weight[:, :, :-1].zero_()
            elif isinstance(module, (Downsample, Upsample)) and module.time_conv is not None:
                conv = module.time_conv  # weight (C * copies, C, 3, 1, 1)
                dim = conv.in_channels
                identity = torch.eye(dim, dtype=conv.weight.dtype).repeat(conv.out_channels // dim, 1)
                conv.weight.zero_()
                conv.weight[:, :, -1, 0, 0] = identity  # Upsample: both output frames copy the input
                conv.bias.zero_()

    # ---- shapes ---------------------------------------------------------------------------

    def validate_input(self, T: int, H: int, W: int) -> None:
        """Raise ValueError naming the nearest valid size unless T = f*k + 1 and H, W are multiples of s."""
        f, s = self.cfg.temporal_factor, self.cfg.spatial_factor
        if T < 1 or (T - 1) % f:
            nearest = max(1, f * round((T - 1) / f) + 1)
            raise ValueError(
                f"T={T} frames: must be {f}k + 1 (1, {f + 1}, {2 * f + 1}, ...); nearest is {nearest}"
            )
        for name, size in (("H", H), ("W", W)):
            if size < 1 or size % s:
                nearest = max(s, s * round(size / s))
                raise ValueError(f"{name}={size}: must be a multiple of {s}; nearest is {nearest}")

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        self.validate_input(T, H, W)
        s = self.cfg.spatial_factor
        return (T - 1) // self.cfg.temporal_factor + 1, H // s, W // s

    # ---- latent statistics ----------------------------------------------------------------

    def set_latent_stats(self, mean: list[float], std: list[float]) -> None:
        self.cfg = dataclasses.replace(self.cfg, latents_mean=list(mean), latents_std=list(std))

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels = self.cfg.latent_channels
        mean = self.cfg.latents_mean or [0.0] * channels
        std = self.cfg.latents_std or [1.0] * channels
        shape = (1, channels, 1, 1, 1)
        return z.new_tensor(mean).view(shape), z.new_tensor(std).view(shape)

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z * std + mean

    # ---- encode / decode ------------------------------------------------------------------

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Chunked encoder: frames [0, 1), then `chunk_latent_frames` latent frames' worth at a time."""
        cache = TimeCache()
        step = self.cfg.temporal_factor * self.cfg.chunk_latent_frames
        starts = [0, *range(1, x.shape[2], step)]
        ends = [*starts[1:], x.shape[2]]
        chunks = [
            self.encoder(x[:, :, a:b], cache) for a, b in zip(starts, ends, strict=True)
        ]  # each (B, 2C, t', H', W')
        return self.conv1(torch.cat(chunks, dim=2))  # (B, 2C, T', H', W')

    def _decode_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Chunked decoder over raw latents: `chunk_latent_frames` latent frames at a time."""
        cache = TimeCache()
        z = self.conv2(z)  # (B, C, T', H', W')
        step = self.cfg.chunk_latent_frames
        chunks = [self.decoder(z[:, :, a : a + step], cache) for a in range(0, z.shape[2], step)]
        return torch.cat(chunks, dim=2)  # (B, 3, T, H, W)

    def encode_posterior(self, x: torch.Tensor, *, tiling: bool = False) -> DiagonalGaussian:
        self.validate_input(*x.shape[2:])
        if tiling:
            from vae.tiling import tiled

            moments = tiled(self._encode_moments, x, tile=self.cfg.tile_size, overlap=self.cfg.tile_overlap)
        else:
            moments = self._encode_moments(x)
        return DiagonalGaussian(moments)  # (B, 2C, T', H', W') split into mean and logvar

    def encode(
        self,
        x: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        normalize: bool = True,
        tiling: bool = False,
    ) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, C, T', H', W'): the posterior mode, or a sample."""
        posterior = self.encode_posterior(x, tiling=tiling)
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, C, T', H', W')
        return self.normalize_latents(z) if normalize else z

    def decode(self, z: torch.Tensor, *, normalize: bool = True, tiling: bool = False) -> torch.Tensor:
        """(B, C, T', H', W') -> (B, 3, T, H, W) in [-1, 1]. `normalize`: z is normalised, as encode returns."""
        if normalize:
            z = self.denormalize_latents(z)
        if tiling:
            from vae.tiling import tiled

            s = self.cfg.spatial_factor
            x = tiled(
                self._decode_pixels, z, tile=self.cfg.tile_size // s, overlap=self.cfg.tile_overlap // s
            )
        else:
            x = self._decode_pixels(z)
        return x.clamp(-1.0, 1.0)

    def forward(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass over whole clips: (reconstruction, unclamped; posterior). Raw latents."""
        self.validate_input(*x.shape[2:])
        posterior = DiagonalGaussian(self.conv1(self.encoder(x)))
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, C, T', H', W')
        return self.decoder(self.conv2(z)), posterior  # (B, 3, T, H, W)

    # ---- weights on disk ------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().contiguous() for key, value in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        save_config(self.cfg, folder)
        return folder

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> CausalVAE:
        from safetensors.torch import load_file

        folder = Path(folder)
        model = cls(VAEConfig.from_json(folder / "config.json"))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.to(device=device, dtype=dtype).eval()


def save_config(cfg: VAEConfig, folder: Path) -> None:
    """Write config.json atomically (the stats command rewrites it in a folder that may be in use)."""
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    tmp.replace(folder / "config.json")


PRESETS: dict[str, VAEConfig] = {
    # seconds on CPU: the tests use it
    "debug": VAEConfig(
        base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latent_channels=4, tile_size=32, tile_overlap=16
    ),
    # trains on 2 CPU cores at 64x64: a 17-frame clip costs 16.8 GFLOP forward, a 5-frame clip about
    # a third of that; the full-resolution levels dominate (base_dim=8 with dim_mult=(1, 2, 4, 8)
    # would cost 5.2 GFLOP per 17-frame clip, if a cheaper demo is needed)
    "demo": VAEConfig(base_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, latent_channels=8),
    # the public Wan 2.1 VAE
    "wan2.1": VAEConfig(latents_mean=list(WAN21_LATENTS_MEAN), latents_std=list(WAN21_LATENTS_STD)),
}
