"""Diffusion processes: DDPM (eps, v or x0 prediction) and flow matching, their training loss and the VLB.

Both processes speak the DiT's time convention (ARCHITECTURE.md): a float timestep t in [0, 1000], the
DDPM step index (0 = least noise) or 1000 * sigma for flow matching. Every method takes t either per
sample (B,) or per position (B, T', H', W') and broadcasts it over the channels.

  DDPM:  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   abar_t = prod_{s <= t} (1 - beta_s)
  flow:  x_s = (1 - sigma) x0 + sigma eps,                velocity target v = eps - x0

A flow model may also output x0 itself (`FlowMatching(prediction="x0")`); `FlowMatching.as_target` turns
that into v = (x_s - x0) / sigma, so the loss and every sampler still work on velocities. Both processes
have `as_target` (the network output in the space of `training_target`; DDPM's is the output itself), so
the loss and the samplers call it without asking which process they hold.

Schedules and all DDPM coefficients are computed in float64 and applied in float32; the training loss is
computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from dit.conditioning import model_timesteps, position_mask

Model = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""model(x (B, C, T', H', W'), t (B,) | (B, T') | (B, L), text (B, S, Dt), text_mask (B, S)) -> prediction."""

SCHEDULES = ("linear", "cosine", "cos2")
PREDICTIONS = ("eps", "v", "x0")
SIGMA_SAMPLINGS = ("uniform", "logit_normal")
FLOW_PREDICTIONS = ("velocity", "x0")
# x0 prediction divides by sigma to get a velocity; below this sigma the division uses this floor, so the
# weight of an x0 error in the velocity loss (1 / sigma^2) stays <= 400 (Li & He 2025, "JiT", clip 0.05).
X0_MIN_SIGMA = 0.05
MAX_BETA = 0.999  # clip of the alphabar-derived schedules (Nichol & Dhariwal): keeps abar_T > 0


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def broadcast_to(values: Tensor, x: Tensor) -> Tensor:
    """Per-sample (B,) or per-position (B, T', H', W') values -> broadcastable against x (B, C, ...)."""
    if values.ndim == 1:
        return values.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)  # (B, 1, ..., 1)
    if values.shape == (x.shape[0], *x.shape[2:]):
        return values[:, None].to(x.dtype)  # (B, 1, T', H', W')
    raise ValueError(f"timesteps of shape {tuple(values.shape)} do not fit x of shape {tuple(x.shape)}")


def draw_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gaussian noise shaped like x, drawn on the generator's device so a seed means the same everywhere."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def num_tokens(latent_shape: Sequence[int], patch_size: Sequence[int]) -> int:
    """L = (T'/pt)(H'/ph)(W'/pw) for latents of shape (B, C, T', H', W')."""
    return math.prod(size // patch for size, patch in zip(latent_shape[2:], patch_size, strict=True))


# ---------------------------------------------------------------------------------------------------------
# DDPM schedules
# ---------------------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02, scaled so that other T keep the same abar_T."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def betas_from_alphabar(alphabar: Callable[[Tensor], Tensor], num_timesteps: int) -> Tensor:
    """beta_t = 1 - abar(t/T) / abar((t-1)/T) for t = 1..T, clipped at MAX_BETA."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T + 1,)
    values = alphabar(steps)
    return (1 - values[1:] / values[:-1]).clamp(max=MAX_BETA)


def cosine_betas(num_timesteps: int, offset: float = 0.008) -> Tensor:
    """Nichol & Dhariwal 2021: abar(u) = cos^2(pi/2 (u + s)/(1 + s)); the offset s keeps beta_1 from 0."""
    return betas_from_alphabar(
        lambda u: torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2, num_timesteps
    )


def cos2_betas(num_timesteps: int) -> Tensor:
    """The simple form abar_t = cos^2(pi t / 2T) (no offset); the clip makes abar_T small, not 0."""
    return betas_from_alphabar(lambda u: torch.cos(u * math.pi / 2) ** 2, num_timesteps)


BETA_SCHEDULES: dict[str, Callable[[int], Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "cos2": cos2_betas,
}


# ---------------------------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDPM:
    """Discrete-time Gaussian diffusion. Timestep t in {0, ..., T-1} is the paper's step t + 1."""

    schedule: str = "linear"
    prediction: str = "eps"
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: must be one of {SCHEDULES}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction={self.prediction!r}: must be one of {PREDICTIONS}")
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps={self.num_timesteps}: must be >= 2")
        if float(self.betas.max()) >= 1:
            # The linear schedule scales beta_end = 0.02 * 1000 / T, which passes 1 below T = 20.
            raise ValueError(
                f"num_timesteps={self.num_timesteps}: too few for schedule={self.schedule!r} (a beta >= 1)"
            )

    @cached_property
    def betas(self) -> Tensor:
        return BETA_SCHEDULES[self.schedule](self.num_timesteps)  # (T,) float64

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(1 - self.betas, dim=0)  # (T,) float64

    @cached_property
    def _alphabar_from_minus_one(self) -> Tensor:
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])  # (T + 1,)

    def alphabar(self, t: Tensor) -> Tensor:
        """abar at integer-valued timesteps; t = -1 (before the first step) gives 1, the clean data."""
        return self._alphabar_from_minus_one.to(t.device)[t.round().long() + 1]

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x0) in closed form."""
        abar = broadcast_to(self.alphabar(t), x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7)."""
        abar, abar_prev = self.alphabar(t), self.alphabar(t - 1)
        beta = 1 - abar / abar_prev
        coef_x0 = broadcast_to(abar_prev.sqrt() * beta / (1 - abar), x0)
        coef_xt = broadcast_to((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar), x0)
        variance = broadcast_to(beta * (1 - abar_prev) / (1 - abar), x0)
        return coef_x0 * x0 + coef_xt * x_t, variance

    def convert(self, pred: Tensor, x_t: Tensor, t: Tensor, *, source: str, target: str) -> Tensor:
        """Re-express a prediction of `source` type (eps, v or x0) as `target`, given x_t."""
        abar = broadcast_to(self.alphabar(t), x_t)
        a, b = abar.sqrt(), (1 - abar).sqrt()  # x_t = a x0 + b eps, v = a eps - b x0, a^2 + b^2 = 1
        if source == "eps":
            x0, eps = (x_t - b * pred) / a, pred
        elif source == "x0":
            x0, eps = pred, (x_t - a * pred) / b
        elif source == "v":
            x0, eps = a * x_t - b * pred, b * x_t + a * pred
        else:
            raise ValueError(f"source={source!r}: must be one of {PREDICTIONS}")
        outputs = {"eps": eps, "x0": x0, "v": a * eps - b * x0}
        if target not in outputs:
            raise ValueError(f"target={target!r}: must be one of {PREDICTIONS}")
        return outputs[target]

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The model's prediction as (x0, eps)."""
        x0 = self.convert(pred, x_t, t, source=self.prediction, target="x0")
        eps = self.convert(pred, x_t, t, source=self.prediction, target="eps")
        return x0, eps

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        abar = broadcast_to(self.alphabar(t), x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def as_target(self, pred: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The network output in the space of `training_target`: DDPM models predict that space directly."""
        return pred

    def add_score(self, pred: Tensor, x_t: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """The prediction after adding `score` to grad log p(x_t): eps = -sqrt(1 - abar) * score."""
        eps = self.convert(pred, x_t, t, source=self.prediction, target="eps")
        eps = eps - broadcast_to((1 - self.alphabar(t)).sqrt(), x_t) * score
        return self.convert(eps, x_t, t, source="eps", target=self.prediction)

    def sample_timesteps(
        self, batch: int, *, tokens: int, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """Training timesteps, uniform over {0, ..., T-1}, as floats (B,). `tokens` is unused here."""
        t = torch.randint(
            0, self.num_timesteps, (batch,), generator=generator, device=_device(generator, device)
        )
        return t.to(device=device, dtype=torch.float32)


def _device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


# ---------------------------------------------------------------------------------------------------------
# Flow matching (rectified flow)
# ---------------------------------------------------------------------------------------------------------


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """sigma' = s sigma / (1 + (s - 1) sigma): s > 1 spends more time at high noise, endpoints fixed."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class FlowMatching:
    """x_sigma = (1 - sigma) x0 + sigma eps with velocity target eps - x0; t = 1000 sigma for the model.

    The timestep shift is `shift` or, with `dynamic_shift`, set from the token count L of the latents:
        log s = min_log_shift + (max_log_shift - min_log_shift) * clamp((L - min_tokens) / (max_tokens - min_tokens), 0, 1)
    i.e. log s linear in L between two anchors (SD3/Flux use (256, 0.5) and (4096, 1.15)), held constant
    outside them so that very long videos do not get an unbounded shift.

    `prediction` is what the network outputs: "velocity" (eps - x0, the usual choice) or "x0" (the clean
    latents). An x0 network models only the data, which matters when a token carries many values compared
    with the model's width (large patches, small models: Li & He 2025); `as_target` converts its output, so
    training (the loss is on the velocity: x0 error weighted by 1 / sigma^2) and sampling stay the same.
    """

    shift: float = 1.0
    dynamic_shift: bool = False
    min_tokens: int = 256
    max_tokens: int = 4096
    min_log_shift: float = 0.5
    max_log_shift: float = 1.15
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_timesteps: int = 1000
    prediction: str = "velocity"

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift}: must be > 0")
        if not 0 < self.min_tokens < self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens}, max_tokens={self.max_tokens}: need 0 < min_tokens < max_tokens"
            )
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"sigma_sampling={self.sigma_sampling!r}: must be one of {SIGMA_SAMPLINGS}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std={self.logit_std}: must be > 0")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps={self.num_timesteps}: must be >= 1")
        if self.prediction not in FLOW_PREDICTIONS:
            raise ValueError(f"flow prediction={self.prediction!r}: must be one of {FLOW_PREDICTIONS}")

    def shift_for(self, tokens: int) -> float:
        """The timestep shift for latents of `tokens` tokens (fixed unless dynamic_shift)."""
        if not self.dynamic_shift:
            return self.shift
        frac = min(max((tokens - self.min_tokens) / (self.max_tokens - self.min_tokens), 0.0), 1.0)
        return math.exp(self.min_log_shift + (self.max_log_shift - self.min_log_shift) * frac)

    def sigma(self, t: Tensor | float) -> Tensor | float:
        return t / self.num_timesteps

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        sigma = broadcast_to(self.sigma(t), x0)
        return (1 - sigma) * x0 + sigma * noise

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def as_target(self, pred: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The velocity that a network output `pred` at (x, t) stands for: `pred` itself, or for x0
        prediction (x - x0) / sigma with sigma floored at X0_MIN_SIGMA (x = x0 + sigma v)."""
        if self.prediction == "velocity":
            return pred
        sigma = broadcast_to(self.sigma(t), x).clamp(min=X0_MIN_SIGMA)
        return (x - pred) / sigma

    def to_x0_eps(self, velocity: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x = x0 + sigma v, so x0 = x - sigma v and eps = x0 + v."""
        sigma = broadcast_to(self.sigma(t), x)
        x0 = x - sigma * velocity
        return x0, x0 + velocity

    def add_score(self, velocity: Tensor, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """The velocity after adding `score` to grad log p(x).

        eps = -sigma * score and v = (eps - x) / (1 - sigma), so v moves by -sigma / (1 - sigma) * score.
        At sigma = 1 the sample holds no information about x0 and the term is left out.
        """
        sigma = broadcast_to(self.sigma(t), x)
        factor = torch.where(sigma < 1, sigma / (1 - sigma).clamp(min=1e-12), torch.zeros_like(sigma))
        return velocity - factor * score

    def sample_timesteps(
        self, batch: int, *, tokens: int, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """Training timesteps 1000 sigma (B,), sigma uniform or logit-normal, then shifted."""
        where = _device(generator, device)
        if self.sigma_sampling == "uniform":
            sigma = torch.rand(batch, generator=generator, device=where)
        else:
            normal = torch.randn(batch, generator=generator, device=where)
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        sigma = shift_sigma(sigma.double(), self.shift_for(tokens))
        return (self.num_timesteps * sigma).to(device=device, dtype=torch.float32)

    def sampling_sigmas(self, steps: int, *, tokens: int) -> Tensor:
        """steps + 1 noise levels from 1 down to 0: uniform in sigma, then shifted. float64."""
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)  # (steps + 1,)
        return shift_sigma(sigmas, self.shift_for(tokens))


Process = DDPM | FlowMatching


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DiffusionConfig:
    """Which diffusion process the DiT is trained and sampled with."""

    process: str = "flow"
    """'flow' (rectified flow, velocity target) or 'ddpm' (Gaussian diffusion)."""
    num_timesteps: int = 1000
    """DDPM steps T; for flow, the scale of the model timestep 1000 sigma."""
    schedule: str = "linear"
    """DDPM beta schedule: 'linear', 'cosine' or 'cos2'."""
    prediction: str = "eps"
    """DDPM model output: 'eps', 'v' or 'x0' (flow: see flow_prediction)."""
    flow_prediction: str = "velocity"
    """Flow model output: 'velocity' (eps - x0) or 'x0' (the clean latents; loss and samplers convert it
    to a velocity, see FlowMatching)."""
    shift: float = 1.0
    """Flow timestep shift s in sigma' = s sigma / (1 + (s - 1) sigma), used when dynamic_shift is off."""
    dynamic_shift: bool = False
    """Flow: set the shift from the token count between the two anchors below."""
    min_tokens: int = 256
    """Flow dynamic shift: token count of the first anchor."""
    max_tokens: int = 4096
    """Flow dynamic shift: token count of the second anchor."""
    min_log_shift: float = 0.5
    """Flow dynamic shift: log shift at min_tokens (and below)."""
    max_log_shift: float = 1.15
    """Flow dynamic shift: log shift at max_tokens (and above)."""
    sigma_sampling: str = "logit_normal"
    """Flow training noise levels: 'uniform' or 'logit_normal' (SD3)."""
    logit_mean: float = 0.0
    """Flow logit-normal location."""
    logit_std: float = 1.0
    """Flow logit-normal scale."""
    detail_weight: float = 0.0
    """Training: how much more a latent position counts in the loss the further its clean latent lies from
    its frame's typical (median) one. 0 weights every position alike. A small object covers a few of a
    frame's latent positions, so a plain mean gives its shape a few percent of the loss however wrong it
    is drawn; with weight a, a position counts 1 + a * (its distance / the sample's mean distance), the
    weights rescaled to mean 1 per sample (see `detail_weights`; docs/demo.md)."""
    input_perturbation: float = 0.0
    """Training: the model's input gets gamma times more fresh noise than its target names (Ning et al.
    2023, "Input Perturbation Reduces Exposure Bias"): x_t is made from noise + gamma * xi, the target from
    noise alone, so the model also learns to pull back a sample that has drifted from its noise level, as
    a sampler's own errors make it drift. 0 trains on the exact noise; the paper uses 0.1."""
    blur_path: float = 0.0
    """Training, flow only: the fraction of samples noised along a blurring path instead of the straight one.
    Their clean part is blurred in proportion to the noise level, x_sigma = (1 - sigma) (x0 + sigma (b - x0))
    + sigma eps with b each latent frame blurred (`blur_frames`), and the target is that path's velocity, so
    sampling is unchanged. On the straight path a half-noised sample already shows its shape and the model
    can read it off the pixels; on this one it shows a blob, so the model has to take the outline from the
    text, which is what it must do at sampling time (docs/demo.md). 0 keeps every sample on the straight path."""
    blur_sigma: float = 1.0
    """Training, `blur_path` > 0: the standard deviation of the blurring path's Gaussian, in latent positions."""
    temporal_weight: float = 0.0
    """Training: weight of a second error term on the difference between neighbouring latent frames' errors,
    mean over positions free in both frames of ((pred - target)[t + 1] - (pred - target)[t])^2. With weight w an
    error that flips sign from one frame to the next (an outline drawn one way, then another) costs 1 + 4w times
    its plain loss, one kept the same in every frame no more, so the model is pushed to keep what it draws from
    frame to frame (docs/demo.md, the demo's small standing shapes). 0: the plain loss; stills add nothing."""
    self_cond: float = 0.0
    """Training a self-conditioned DiT (`dit.self_cond`): the share of batches whose `x0_prev` is the model's
    own estimate from a first forward pass without gradients (the rest read zeros, as a sampler's first
    step does). Chen et al. 2022 use 0.5; such a batch costs about a third of a step more. 0 for other DiTs."""

    def __post_init__(self) -> None:
        if self.process not in ("flow", "ddpm"):
            raise ValueError(f"process={self.process!r}: must be 'flow' or 'ddpm'")
        if self.detail_weight < 0:
            raise ValueError(f"detail_weight={self.detail_weight}: must be >= 0 (0 weights positions alike)")
        if self.temporal_weight < 0:
            raise ValueError(f"temporal_weight={self.temporal_weight}: must be >= 0 (0 trains on the plain loss)")
        if self.input_perturbation < 0:
            raise ValueError(f"input_perturbation={self.input_perturbation}: must be >= 0 (0 trains on the exact noise)")
        if not 0 <= self.blur_path <= 1:
            raise ValueError(f"blur_path={self.blur_path}: must be a fraction in [0, 1] (0 keeps the straight path)")
        if self.blur_path > 0 and self.process != "flow":
            raise ValueError(f"blur_path={self.blur_path} needs process='flow' (got {self.process!r})")
        if self.blur_sigma <= 0:
            raise ValueError(f"blur_sigma={self.blur_sigma}: must be > 0 (latent positions)")
        if not 0 <= self.self_cond <= 1:
            raise ValueError(f"self_cond={self.self_cond}: must be a fraction in [0, 1] (0 for a DiT without dit.self_cond)")
        build_process(self)  # the process validates its own fields, named as here

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> DiffusionConfig:
        if name not in PRESETS:
            raise ValueError(f"preset {name!r}: unknown; valid presets are {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


def build_process(cfg: DiffusionConfig) -> Process:
    if cfg.process == "ddpm":
        return DDPM(schedule=cfg.schedule, prediction=cfg.prediction, num_timesteps=cfg.num_timesteps)
    # The config's flow fields carry the process's own names, so they pass through by name; only the
    # prediction has its own name here, since `prediction` is the DDPM one.
    names = [f.name for f in fields(FlowMatching) if f.name != "prediction"]
    return FlowMatching(**{name: getattr(cfg, name) for name in names}, prediction=cfg.flow_prediction)


PRESETS: dict[str, DiffusionConfig] = {
    "debug": DiffusionConfig(process="flow", sigma_sampling="uniform"),
    "flow": DiffusionConfig(process="flow", dynamic_shift=True),
    "wan": DiffusionConfig(process="flow", shift=5.0),  # Wan 2.1's fixed sampling shift
    "ddpm": DiffusionConfig(process="ddpm", schedule="linear", prediction="eps"),
    "ddpm_cosine_v": DiffusionConfig(process="ddpm", schedule="cosine", prediction="v"),
}


# ---------------------------------------------------------------------------------------------------------
# Training loss
# ---------------------------------------------------------------------------------------------------------


def detail_weights(x0: Tensor, strength: float) -> Tensor:
    """Per-position loss weights (B, T', H', W'): 1 + strength * distance / mean distance, where distance is
    how far a position's clean latent (over channels) lies from the median latent of its frame.

    On a flat background the median is the background, so the weight grows with how much of an object a
    position holds, whatever the object's colour; its mean over a sample is 1 + strength.
    """
    x0 = x0.float()
    typical = x0.flatten(3).median(dim=3).values[..., None, None]  # (B, C, T', 1, 1)
    distance = (x0 - typical).square().sum(dim=1).sqrt()  # (B, T', H', W')
    scale = distance.flatten(1).mean(dim=1).clamp(min=1e-6)  # (B,): a uniform frame gets weight 1 everywhere
    return 1.0 + strength * distance / scale[:, None, None, None]


def blur_frames(x: Tensor, sigma: float) -> Tensor:
    """Each latent frame of x (B, C, T', H', W') blurred by a Gaussian of std `sigma` latent positions,
    separably, with edge values repeated past the border so that a uniform frame stays exactly uniform."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)  # (K,)
    batch, channels, frames, height, width = x.shape
    planes = x.reshape(batch * channels * frames, 1, height, width)  # (N, 1, H', W')
    planes = F.pad(planes, (radius, radius, radius, radius), mode="replicate")
    planes = F.conv2d(planes, kernel.view(1, 1, -1, 1))  # down the rows
    planes = F.conv2d(planes, kernel.view(1, 1, 1, -1))  # along the columns
    return planes.reshape(batch, channels, frames, height, width)


def masked_mse(pred: Tensor, target: Tensor, cond_mask: Tensor | None, weight: Tensor | None = None) -> Tensor:
    """Mean squared error per sample (B,) over the positions that are not conditioned, each position
    weighted by `weight` (B, T', H', W') if given (a weighted mean: constant weights change nothing)."""
    error = (pred.float() - target.float()).pow(2).mean(dim=1)  # (B, T', H', W')
    if cond_mask is not None:
        free = (~cond_mask).float()  # (B, T', H', W')
        weight = free if weight is None else weight.float() * free
    if weight is None:  # the common case: a plain mean, no weight tensor built every step
        return error.flatten(1).mean(dim=1)
    return (error * weight).flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1).clamp(min=1e-6)


def temporal_error(pred: Tensor, target: Tensor, cond_mask: Tensor | None) -> Tensor:
    """Per sample (B,): the mean square of the change in error from each latent frame to the next, over the
    positions free (not conditioned) in both; 0 for one-frame samples and samples with no such position."""
    error = pred.float() - target.float()  # (B, C, T', H', W')
    if error.shape[2] < 2:
        return error.new_zeros(error.shape[0])
    # a pair of neighbouring frames counts where neither is conditioned: masked_mse of frame t + 1 against t
    pairs = None if cond_mask is None else cond_mask[:, 1:] | cond_mask[:, :-1]  # (B, T'-1, H', W')
    return masked_mse(error[:, :, 1:], error[:, :, :-1], pairs)


def self_cond_estimate(process: Process, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """A raw model output at (x_t, t) -> the clean-latent estimate a self-conditioned model reads next."""
    return process.to_x0_eps(process.as_target(output.float(), x_t, t), x_t, t)[0].detach()


def self_cond_input(x0_prev: Tensor, x_t: Tensor, cond_mask: Tensor | None) -> Tensor:
    """`x0_prev` with conditioned positions holding their clean latents (x_t there), in training and sampling alike."""
    return x0_prev if cond_mask is None else torch.where(position_mask(cond_mask), x_t, x0_prev)


def training_loss(
    model: Model,
    x0: Tensor,
    *,
    process: Process,
    text: Tensor,
    text_mask: Tensor,
    cond_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    detail_weight: float = 0.0,
    input_perturbation: float = 0.0,
    blur_path: float = 0.0,
    blur_sigma: float = 1.0,
    self_cond: float = 0.0,
    temporal_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One training loss: noise x0 (B, C, T', H', W'), predict, compare on the non-conditioned positions.

    Conditioned positions (cond_mask True) keep their clean latents, get timestep 0 and add nothing to the
    loss. `detail_weight` > 0 weights positions by `detail_weights`; `input_perturbation` (gamma) noises the
    input with noise + gamma * xi but keeps the target of the noise alone; `blur_path` puts that fraction of
    the samples on DiffusionConfig.blur_path's blurring path. `self_cond` > 0 trains a self-conditioned
    model (`x0_prev`, see `self_cond_estimate`): with that probability per batch its own estimate, from a
    first pass without gradients, else zeros. `temporal_weight` adds `temporal_error` at that weight. Returns the
    scalar loss and detached logs.
    """
    if blur_path > 0 and not isinstance(process, FlowMatching):
        raise ValueError(f"blur_path={blur_path} needs flow matching (got {type(process).__name__})")
    t = process.sample_timesteps(
        x0.shape[0], tokens=num_tokens(x0.shape, patch_size), generator=generator, device=x0.device
    )  # (B,)
    noise = draw_noise(x0, generator)  # (B, C, T', H', W')
    target = process.training_target(x0, noise, t)
    if input_perturbation > 0:
        noise = noise + input_perturbation * draw_noise(x0, generator)
    x_t = process.add_noise(x0, noise, t)
    if blur_path > 0:
        # x = (1 - s) (x0 + s d) + s eps, d = blur(x0) - x0: dx/ds = eps - x0 + (1 - 2 s) d, the target.
        where = _device(generator, x0.device)
        on_path = (torch.rand(x0.shape[0], generator=generator, device=where) < blur_path).to(x0.device)  # (B,)
        sigma = broadcast_to(process.sigma(t), x0)  # (B, 1, 1, 1, 1)
        detour = blur_frames(x0, blur_sigma) - x0  # (B, C, T', H', W')
        detour = detour * broadcast_to(on_path, detour)  # off the path: 0
        x_t = x_t + (1 - sigma) * sigma * detour
        target = target + (1 - 2 * sigma) * detour
    if cond_mask is not None:
        cond_mask = cond_mask.to(x0.device)  # mask samplers build it on the CPU
        x_t = torch.where(position_mask(cond_mask), x0, x_t)
    t_model = model_timesteps(t, cond_mask, patch_size)
    if self_cond > 0:
        x0_prev = self_cond_input(torch.zeros_like(x_t), x_t, cond_mask)
        if float(torch.rand((), generator=generator, device=_device(generator, x0.device))) < self_cond:
            with torch.no_grad():
                first = model(x_t, t_model, text, text_mask, x0_prev=x0_prev)
            x0_prev = self_cond_input(self_cond_estimate(process, first, x_t, t), x_t, cond_mask)
        pred = model(x_t, t_model, text, text_mask, x0_prev=x0_prev)
    else:
        pred = model(x_t, t_model, text, text_mask)
    pred = process.as_target(pred.float(), x_t, t)  # e.g. a flow x0 output becomes a velocity
    weight = detail_weights(x0, detail_weight) if detail_weight > 0 else None  # (B, T', H', W')
    per_sample = masked_mse(pred, target, cond_mask, weight)  # (B,)
    cond_fraction = cond_mask.float().mean() if cond_mask is not None else torch.zeros((), device=x0.device)
    logs = {"loss": per_sample.mean().detach(), "timestep_mean": t.mean(), "cond_fraction": cond_fraction}
    if temporal_weight > 0:
        temporal = temporal_error(pred, target, cond_mask)  # (B,)
        per_sample = per_sample + temporal_weight * temporal
        logs["temporal"] = temporal.mean().detach()
    return per_sample.mean(), logs
