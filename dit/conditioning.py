"""Conditioning: one mechanism for every generation mode.

A condition is a set of clean latent positions, whole latent frames or regions inside frames, that stay
fixed (timestep 0) while the sampler generates the rest. Text-to-video has no condition; image-to-video,
extension both ways, looping, keyframes and transitions condition whole frames; inpainting and
outpainting condition regions. The same boolean mask (True = clean condition, no loss) drives training
(`sample_cond_mask`) and sampling (`Condition`), and `model_timesteps` turns it into the timestep tensor
the DiT reads: (B,) without a condition, (B, T') for whole frames, (B, L) for regions.

Causal VAE note: latent frame 0 encodes pixel frame 0 alone and latent k > 0 encodes pixel frames
4k-3..4k (see `pixel_frames_of_latent`). A clip's last latent frames, re-used at the head of a new clip,
were encoded as 4-frame groups while the new clip's latent 0 stands for a single frame; for the closest
match encode the pixel frames that should appear at the new head as their own clip and pass those latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from einops import reduce, repeat
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Pixel frames <-> latent frames for the causal VAE
# ---------------------------------------------------------------------------------------------------------


def num_latent_frames(pixel_frames: int, temporal_factor: int = 4) -> int:
    """T' for a clip of T = temporal_factor * k + 1 pixel frames (first frame alone, then groups)."""
    if pixel_frames < 1 or (pixel_frames - 1) % temporal_factor != 0:
        below = max(1, pixel_frames - (pixel_frames - 1) % temporal_factor)
        raise ValueError(
            f"pixel_frames={pixel_frames}: must be {temporal_factor}k+1 for the causal VAE; "
            f"nearest valid are {below} and {below + temporal_factor}"
        )
    return (pixel_frames - 1) // temporal_factor + 1


def latent_index_of_pixel_frame(pixel_index: int, temporal_factor: int = 4) -> int:
    """The latent frame that encodes pixel frame `pixel_index` (0 -> 0, 1..4 -> 1, 5..8 -> 2, ...)."""
    if pixel_index < 0:
        raise ValueError(f"pixel_index={pixel_index}: must be >= 0")
    return 0 if pixel_index == 0 else (pixel_index - 1) // temporal_factor + 1


def pixel_frames_of_latent(latent_index: int, temporal_factor: int = 4) -> range:
    """The pixel frames that latent frame `latent_index` encodes: 0 -> [0], k -> [4k-3, 4k]."""
    if latent_index < 0:
        raise ValueError(f"latent_index={latent_index}: must be >= 0")
    if latent_index == 0:
        return range(0, 1)
    last = temporal_factor * latent_index
    return range(last - temporal_factor + 1, last + 1)


# ---------------------------------------------------------------------------------------------------------
# The condition and the timesteps it implies
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """Clean latents and the boolean mask of positions that are kept (True = condition)."""

    latents: Tensor
    """(B, C, T', H', W') clean latents; values where `mask` is False are ignored."""
    mask: Tensor
    """(B, T', H', W') or (B, 1, T', H', W') bool; stored as (B, T', H', W')."""

    def __post_init__(self) -> None:
        mask = self.mask
        if mask.ndim == 5 and mask.shape[1] == 1:
            mask = mask[:, 0]  # (B, T', H', W')
        if mask.dtype != torch.bool:
            raise ValueError(f"mask.dtype={mask.dtype}: must be torch.bool")
        if self.latents.ndim != 5 or mask.shape != (self.latents.shape[0], *self.latents.shape[2:]):
            raise ValueError(
                f"mask.shape={tuple(self.mask.shape)}: must be (B, T', H', W') or (B, 1, T', H', W') "
                f"matching latents.shape={tuple(self.latents.shape)} (B, C, T', H', W')"
            )
        if bool(mask.flatten(1).all(dim=1).any()):
            raise ValueError(
                "mask: every position of some sample is conditioned; nothing is left to generate"
            )
        object.__setattr__(self, "mask", mask)


def position_mask(mask: Tensor) -> Tensor:
    """(B, T', H', W') condition mask -> (B, 1, T', H', W') for `torch.where` against latents."""
    return mask[:, None]  # (B, 1, T', H', W')


def model_timesteps(t: Tensor, cond_mask: Tensor | None, patch_size: Sequence[int] = (1, 2, 2)) -> Tensor:
    """The timestep tensor the DiT reads, with conditioned positions at timestep 0.

    t: (B,) float timestep of the generated positions. Returns t unchanged (B,) without a condition,
    (B, T') when the condition covers whole latent frames, else (B, L) per token with L in t-major, h, w
    order. The mask must be constant inside each (pt, ph, pw) patch: a token is either clean or not.
    """
    if cond_mask is None or not bool(cond_mask.any()):
        return t
    cond_mask = cond_mask.to(t.device)
    pt, ph, pw = patch_size
    _, frames, height, width = cond_mask.shape
    if frames % pt or height % ph or width % pw:
        raise ValueError(
            f"cond_mask grid (T'={frames}, H'={height}, W'={width}) is not divisible by patch_size={tuple(patch_size)}"
        )
    pattern = "b (t pt) (h ph) (w pw) -> b (t h w)"
    any_in_patch = reduce(cond_mask.to(torch.uint8), pattern, "max", pt=pt, ph=ph, pw=pw)  # (B, L)
    all_in_patch = reduce(cond_mask.to(torch.uint8), pattern, "min", pt=pt, ph=ph, pw=pw)  # (B, L)
    if not torch.equal(any_in_patch, all_in_patch):
        raise ValueError(f"cond_mask is not constant within patches of size {tuple(patch_size)}")
    frame_any = cond_mask.flatten(2).any(dim=2)  # (B, T')
    frame_all = cond_mask.flatten(2).all(dim=2)  # (B, T')
    if torch.equal(frame_any, frame_all):
        return torch.where(frame_all, torch.zeros_like(t)[:, None], t[:, None])  # (B, T')
    return torch.where(any_in_patch.bool(), torch.zeros_like(t)[:, None], t[:, None])  # (B, L)


# ---------------------------------------------------------------------------------------------------------
# Builders, one per generation mode (text-to-image / text-to-video: no condition, pass None)
# ---------------------------------------------------------------------------------------------------------


def frames_condition(frames: Tensor, indices: Sequence[int], *, latent_frames: int) -> Condition:
    """Place clean latent frames (B, C, K, H', W') at latent indices (negative counts from the end)."""
    batch, channels, count, height, width = frames.shape
    if len(indices) != count:
        raise ValueError(f"indices={list(indices)}: need one index per given frame ({count})")
    resolved = [i + latent_frames if i < 0 else i for i in indices]
    if any(not 0 <= i < latent_frames for i in resolved):
        raise ValueError(f"indices={list(indices)}: must lie in [-{latent_frames}, {latent_frames})")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"indices={list(indices)}: two frames land on the same latent index")
    latents = frames.new_zeros(batch, channels, latent_frames, height, width)  # (B, C, T', H', W')
    mask = torch.zeros(batch, latent_frames, height, width, dtype=torch.bool, device=frames.device)
    latents[:, :, resolved] = frames
    mask[:, resolved] = True
    return Condition(latents, mask)


def image_to_video(image: Tensor, *, latent_frames: int) -> Condition:
    """The image's latent (B, C, 1, H', W') as the first latent frame."""
    return frames_condition(image, [0], latent_frames=latent_frames)


def extend_forward(clip: Tensor, num_frames: int, *, latent_frames: int) -> Condition:
    """Continue a clip: its last `num_frames` latent frames at the head of the new clip."""
    return frames_condition(clip[:, :, -num_frames:], range(num_frames), latent_frames=latent_frames)


def extend_backward(clip: Tensor, num_frames: int, *, latent_frames: int) -> Condition:
    """Lead into a clip: its first `num_frames` latent frames at the tail of the new clip."""
    tail = range(latent_frames - num_frames, latent_frames)
    return frames_condition(clip[:, :, :num_frames], tail, latent_frames=latent_frames)


def loop(frames: Tensor, *, latent_frames: int) -> Condition:
    """A seamless loop: the same K latent frames at the head and at the tail."""
    count = frames.shape[2]
    indices = [*range(count), *range(latent_frames - count, latent_frames)]
    return frames_condition(torch.cat([frames, frames], dim=2), indices, latent_frames=latent_frames)


def keyframes(frames: Tensor, indices: Sequence[int], *, latent_frames: int) -> Condition:
    """Keyframes (B, C, K, H', W') at arbitrary latent indices; the sampler fills the frames between."""
    return frames_condition(frames, indices, latent_frames=latent_frames)


def transition(clip_a: Tensor, clip_b: Tensor, num_frames: int, *, latent_frames: int) -> Condition:
    """Bridge two clips: the tail of `clip_a` at the head, the head of `clip_b` at the tail."""
    frames = torch.cat([clip_a[:, :, -num_frames:], clip_b[:, :, :num_frames]], dim=2)  # (B, C, 2k, H', W')
    indices = [*range(num_frames), *range(latent_frames - num_frames, latent_frames)]
    return frames_condition(frames, indices, latent_frames=latent_frames)


def inpaint(latents: Tensor, region: Tensor) -> Condition:
    """Regenerate `region` (B, T', H', W') bool, True = generate; everything else stays as given."""
    return Condition(latents, ~region)


def outpaint(source: Tensor, *, latent_size: tuple[int, int], offset: tuple[int, int]) -> Condition:
    """Grow the canvas: `source` (B, C, T', h, w) kept at (top, left) inside a (H', W') canvas."""
    batch, channels, frames, height, width = source.shape
    top, left = offset
    if top < 0 or left < 0 or top + height > latent_size[0] or left + width > latent_size[1]:
        raise ValueError(
            f"offset={offset}: a ({height}, {width}) source does not fit a canvas of {latent_size}"
        )
    latents = source.new_zeros(batch, channels, frames, *latent_size)  # (B, C, T', H', W')
    mask = torch.zeros(batch, frames, *latent_size, dtype=torch.bool, device=source.device)
    latents[..., top : top + height, left : left + width] = source
    mask[..., top : top + height, left : left + width] = True
    return Condition(latents, mask)


def sdedit_start_step(steps: int, strength: float) -> int:
    """Video-to-video (SDEdit): the source is noised to the level of this step and sampled from there.

    strength 1 re-generates from pure noise (step 0); strength 0 returns the source (no step runs).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength}: must be in [0, 1]")
    return steps - round(strength * steps)


def slerp(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation per sample, so that interpolated Gaussian noise keeps its norm."""
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()  # (B, N)
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))  # (B,)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]  # (B, 1)
    # Nearly parallel vectors: sin(theta) -> 0, where slerp tends to the linear interpolation.
    parallel = theta < 1e-4
    sin = torch.where(parallel, torch.ones_like(theta), torch.sin(theta))
    weight_a = torch.where(parallel, 1 - alpha, torch.sin((1 - alpha) * theta) / sin)
    weight_b = torch.where(parallel, torch.full_like(theta, alpha), torch.sin(alpha * theta) / sin)
    return (weight_a * flat_a + weight_b * flat_b).to(a.dtype).view_as(a)


def interpolation_noises(shape: Sequence[int], seed_a: int, seed_b: int, num: int) -> Tensor:
    """`num` noise tensors of `shape` walking from seed_a's noise to seed_b's along the great circle."""
    noise_a = torch.randn(*shape, generator=torch.Generator().manual_seed(seed_a))
    noise_b = torch.randn(*shape, generator=torch.Generator().manual_seed(seed_b))
    alphas = [i / (num - 1) for i in range(num)] if num > 1 else [0.0]
    return torch.stack([slerp(noise_a, noise_b, alpha) for alpha in alphas])  # (N, *shape)


# ---------------------------------------------------------------------------------------------------------
# Training: random condition masks
# ---------------------------------------------------------------------------------------------------------

MODES = ("none", "i2v", "extend_head", "extend_tail", "loop", "keyframes", "inpaint")


@dataclass
class MaskSamplerConfig:
    """How often each conditioning mode is drawn while training (per sample)."""

    none: float = 0.75
    """Probability of no condition (plain text-to-video); Open-Sora conditions about 25% of samples."""
    i2v: float = 0.06
    """Probability of conditioning on the first latent frame (image-to-video)."""
    extend_head: float = 0.05
    """Probability of conditioning on the first k latent frames (forward extension)."""
    extend_tail: float = 0.04
    """Probability of conditioning on the last k latent frames (backward extension)."""
    loop: float = 0.03
    """Probability of conditioning on the first k and the last k latent frames (looping, transitions)."""
    keyframes: float = 0.04
    """Probability of conditioning on random latent frames (keyframes)."""
    inpaint: float = 0.03
    """Probability of conditioning on everything outside (inpaint) or inside (outpaint) a random box."""
    max_cond_fraction: float = 0.5
    """Largest fraction of latent frames conditioned at one end for extension and loop masks."""
    keyframe_prob: float = 0.25
    """Chance that each latent frame is a keyframe in a keyframe mask."""
    region_min_size: float = 0.25
    """Smallest box side as a fraction of the patch grid's height and width."""
    region_max_size: float = 0.75
    """Largest box side as a fraction of the patch grid's height and width (< 1)."""
    patch_size: tuple[int, ...] = (1, 2, 2)
    """DiT patch (pt, ph, pw): boxes are aligned to it so every token is wholly clean or not."""

    def __post_init__(self) -> None:
        probabilities = [getattr(self, mode) for mode in MODES]
        for mode, value in zip(MODES, probabilities, strict=True):
            if value < 0:
                raise ValueError(f"{mode}={value}: must be >= 0")
        if abs(sum(probabilities) - 1.0) > 1e-6:
            raise ValueError(f"{'+'.join(MODES)}={sum(probabilities)}: the mode probabilities must sum to 1")
        for name in ("max_cond_fraction", "keyframe_prob", "region_min_size"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be in (0, 1]")
        if not self.region_min_size <= self.region_max_size < 1:
            raise ValueError(
                f"region_max_size={self.region_max_size}: must be in [region_min_size={self.region_min_size}, 1)"
            )
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size={self.patch_size}: must be three positive ints (pt, ph, pw)")

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> MaskSamplerConfig:
        if name not in PRESETS:
            raise ValueError(f"preset {name!r}: unknown; valid presets are {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


_NO_CONDITION = {mode: 0.0 for mode in MODES} | {"none": 1.0}
PRESETS: dict[str, MaskSamplerConfig] = {
    "none": MaskSamplerConfig(**_NO_CONDITION),
    "default": MaskSamplerConfig(),
    # Every mode often, so that a short debug run exercises all of them.
    "debug": MaskSamplerConfig(
        none=0.3, i2v=0.1, extend_head=0.1, extend_tail=0.1, loop=0.1, keyframes=0.1, inpaint=0.2
    ),
}


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _box_side(fraction: float, grid: int) -> int:
    """A box side in patches: at least 1, at most grid - 1 so a box never covers the whole frame."""
    return min(grid - 1, max(1, round(fraction * grid)))


def _sample_one(cfg: MaskSamplerConfig, mode: str, mask: Tensor, generator: torch.Generator | None) -> None:
    """Fill one sample's (T', H', W') mask in place; modes that do not fit the clip leave it empty."""
    frames, height, width = mask.shape
    pt, ph, pw = cfg.patch_size
    # Frame modes work in whole temporal patches and always leave at least one patch to generate.
    groups = frames // pt
    max_k = max(1, int(cfg.max_cond_fraction * groups))
    if mode == "i2v" and groups >= 2:
        mask[:pt] = True
    elif mode in ("extend_head", "extend_tail") and groups >= 2:
        k = _randint(1, min(max_k, groups - 1), generator) * pt
        if mode == "extend_head":
            mask[:k] = True
        else:
            mask[frames - k :] = True
    elif mode == "loop" and groups >= 3:
        k = _randint(1, min(max_k, (groups - 1) // 2), generator) * pt
        mask[:k] = True
        mask[frames - k :] = True
    elif mode == "keyframes" and groups >= 2:
        chosen = torch.rand(groups, generator=generator) < cfg.keyframe_prob  # (T'/pt,)
        if not chosen.any():
            chosen[_randint(0, groups - 1, generator)] = True
        if chosen.all():
            chosen[_randint(0, groups - 1, generator)] = False
        mask[:] = repeat(chosen, "t -> (t pt) 1 1", pt=pt)
    elif mode == "inpaint" and height // ph >= 2 and width // pw >= 2:
        grid_h, grid_w = height // ph, width // pw
        box_h = _randint(
            _box_side(cfg.region_min_size, grid_h), _box_side(cfg.region_max_size, grid_h), generator
        )
        box_w = _randint(
            _box_side(cfg.region_min_size, grid_w), _box_side(cfg.region_max_size, grid_w), generator
        )
        top, left = _randint(0, grid_h - box_h, generator) * ph, _randint(0, grid_w - box_w, generator) * pw
        inside = torch.zeros(height, width, dtype=torch.bool)
        inside[top : top + box_h * ph, left : left + box_w * pw] = True
        # Half inpainting (the box is generated), half outpainting (the box is the kept context).
        keep = ~inside if bool(torch.rand((), generator=generator) < 0.5) else inside
        mask[:] = keep


def sample_cond_mask(
    cfg: MaskSamplerConfig,
    batch: int,
    latent_frames: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random training condition masks (B, T', H', W') bool, True = clean condition (no loss).

    Each sample draws a mode with the configured probabilities; a mode that the clip is too short for
    (an image, T' = 1, has no frame to condition on) falls back to no condition.
    """
    for name, size, patch in zip(
        ("latent_frames", "height", "width"), (latent_frames, height, width), cfg.patch_size, strict=True
    ):
        if size % patch:
            raise ValueError(f"{name}={size}: must be divisible by patch_size={cfg.patch_size}")
    probabilities = torch.tensor([getattr(cfg, mode) for mode in MODES])
    mask = torch.zeros(batch, latent_frames, height, width, dtype=torch.bool)
    for index in range(batch):
        mode = MODES[int(torch.multinomial(probabilities, 1, generator=generator))]
        _sample_one(cfg, mode, mask[index], generator)
    return mask
