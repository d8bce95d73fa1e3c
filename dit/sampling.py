"""Samplers: DDPM ancestral, DDIM, flow Euler, flow Heun and flow ancestral (euler_a), with classifier-free,
temporal and classifier guidance.

One entry point, `sample`, runs a short loop over a time grid; each iteration asks `predict` for the
(guided) model output and hands it to a pure one-step function. Conditioned positions (a
`dit.conditioning.Condition`) are written back after every step, so they come out bit-identical.
Sampler state is float32 whatever the model's dtype.

Temporal guidance (`temporal_guidance` s > 0) adds s * (cond - cond_frame_local): the conditional prediction
less the one the model makes when its self-attention stays inside each latent frame (the frame-local
perturbation of spatiotemporal skip guidance, Hyung et al. 2024). The weak prediction has every frame
drawn on its own, so the difference is what the frames' attention to each other adds; steering along it
keeps the frames of one sample agreeing with each other. One more model call per step; none for images.
`temporal_guidance_start` f limits it to the steps from round(f * steps) on, the less noisy part of the
run, after the layout is drawn: the demo model gains nothing from the noisier half of its steps, and f = 0.5
draws within the noise of every step in 5/6 of the time (docs/demo.md, session 29).

CFG-Zero* (Fan et al. 2025), for flow models and any guided model: `cfg_zero_star` scales the unconditional
prediction by s* = <cond, uncond> / |uncond|^2 per sample (over the generated positions) before guidance:
s* uncond + w (cond - s* uncond) = cond + (w - 1) (cond - s* uncond), so guidance amplifies only the part of
the conditional prediction that the unconditional one does not explain (s* = 1 gives plain CFG).
`zero_init_steps` n leaves x as the noise for the first n steps of the grid, whose velocity is the least
accurate (a flow sampler's step with zero velocity). On the demo model both together read within the noise
of plain CFG (docs/demo.md, session 32).

Time grids (model timesteps, descending, ending at a terminal value that is never evaluated):
  ddpm / ddim: DDPM step indices, 'leading' (0, k, 2k, ... reversed, k = T // steps) or 'trailing'
               (round(T - i T / steps) - 1, starting at T - 1), then -1 (the clean data).
  euler / heun / euler_a: 1000 sigma with sigma uniform from 1 to 0 in `steps` intervals, then shifted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dit.conditioning import model_timesteps, position_mask, sdedit_start_step
from dit.diffusion import (
    DDPM,
    FlowMatching,
    Model,
    Process,
    draw_noise,
    num_tokens,
    self_cond_estimate,
    self_cond_input,
)
from dit.text_encoder import pad_text

SAMPLERS = {"ddpm": DDPM, "ddim": DDPM, "euler": FlowMatching, "heun": FlowMatching, "euler_a": FlowMatching}
FLOW_SAMPLERS = tuple(name for name, process in SAMPLERS.items() if process is FlowMatching)
SPACINGS = ("leading", "trailing")
DDPM_VARIANCES = ("beta", "beta_tilde")

ClassifierLogProb = Callable[[Tensor, Tensor], Tensor]
"""log p(y | x_t, t): x_t (B, C, T', H', W') and the model timesteps -> (B,); differentiable in x_t."""
Callback = Callable[[int, float, Tensor], None]
"""callback(step index, model timestep of that step, x after the step (B, C, T', H', W'))."""


# ---------------------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------------------


def ddpm_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """`steps` DDPM step indices, descending, followed by the terminal -1."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps}: must be in [1, num_timesteps={num_timesteps}]")
    if spacing == "leading":
        ratio = num_timesteps // steps
        grid = [i * ratio for i in reversed(range(steps))]
    elif spacing == "trailing":
        grid = [round(num_timesteps - i * num_timesteps / steps) - 1 for i in range(steps)]
    else:
        raise ValueError(f"spacing={spacing!r}: must be one of {SPACINGS}")
    return [*grid, -1]


def time_grid(process: Process, steps: int, *, spacing: str = "leading", tokens: int = 0) -> list[float]:
    """steps + 1 model timesteps, descending; the last is the terminal level (-1 for DDPM, 0 for flow)."""
    if isinstance(process, DDPM):
        return [float(t) for t in ddpm_timesteps(process.num_timesteps, steps, spacing)]
    sigmas = process.sampling_sigmas(steps, tokens=tokens)
    return [process.num_timesteps * float(sigma) for sigma in sigmas]


# ---------------------------------------------------------------------------------------------------------
# One step each (pure)
# ---------------------------------------------------------------------------------------------------------


def _abar(process: DDPM, t: float) -> float:
    """abar at one step index, from the float64 table (1 at the terminal t = -1)."""
    return float(process.alphabar(torch.tensor([t]))[0])


def ddpm_step(
    x: Tensor,
    pred: Tensor,
    *,
    process: DDPM,
    t: float,
    t_prev: float,
    noise: Tensor | None,
    variance: str = "beta_tilde",
) -> Tensor:
    """Ancestral step x_t -> x_{t_prev} of the (respaced) chain with sigma^2 = beta or beta~.

    With respacing, beta = 1 - abar_t / abar_prev is the beta of the jump t -> t_prev. `noise` is ignored
    (and may be None) at the final step, t_prev < 0.
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"variance={variance!r}: must be one of {DDPM_VARIANCES}")
    x0, _ = process.to_x0_eps(pred, x, torch.full((x.shape[0],), t, device=x.device))
    abar, abar_prev = _abar(process, t), _abar(process, t_prev)
    beta = 1 - abar / abar_prev
    mean = (abar_prev**0.5 * beta / (1 - abar)) * x0 + ((1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)) * x
    if t_prev < 0:
        return mean
    sigma_sq = beta if variance == "beta" else beta * (1 - abar_prev) / (1 - abar)
    return mean + sigma_sq**0.5 * noise


def ddim_step(
    x: Tensor,
    pred: Tensor,
    *,
    process: DDPM,
    t: float,
    t_prev: float,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """DDIM step (Song et al. 2021): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z.

    s = eta * sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)); eta = 0 is deterministic,
    eta = 1 is the ancestral sampler. `noise` is needed only when s > 0.
    """
    x0, eps = process.to_x0_eps(pred, x, torch.full((x.shape[0],), t, device=x.device))
    abar, abar_prev = _abar(process, t), _abar(process, t_prev)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
    x_prev = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
    return x_prev + sigma * noise if sigma > 0 else x_prev


def euler_step(x: Tensor, velocity: Tensor, *, sigma: float, sigma_next: float) -> Tensor:
    """Flow ODE dx/dsigma = v, one Euler step."""
    return x + (sigma_next - sigma) * velocity


def flow_ancestral_step(
    x: Tensor,
    velocity: Tensor,
    *,
    process: FlowMatching,
    t: float,
    t_next: float,
    eta: float = 1.0,
    noise: Tensor | None = None,
) -> Tensor:
    """DDIM with noise on the flow path x = (1 - sigma) x0 + sigma eps, one step from t to t_next.

    x_next = (1 - sigma_next) x0 + sqrt(sigma_next^2 - s^2) eps + s z, with x0 and eps read from the
    velocity and s = eta times the std of the exact posterior q(x_next | x, x0) of this path: for a ratio
    r = (1 - sigma) / (1 - sigma_next) of signal scales, s = eta * sigma_next * sqrt(sigma^2 - r^2 sigma_next^2) / sigma.
    eta = 0 is the Euler step exactly; eta = 1 redraws as much noise as the posterior allows, so errors of
    earlier steps are partly forgotten. `noise` is needed only when s > 0.
    """
    x0, eps = process.to_x0_eps(velocity, x, torch.full((x.shape[0],), t, device=x.device))
    sigma, sigma_next = process.sigma(t), process.sigma(t_next)
    ratio = (1 - sigma) / (1 - sigma_next)
    s = eta * sigma_next * max(sigma**2 - ratio**2 * sigma_next**2, 0.0) ** 0.5 / sigma
    x_next = (1 - sigma_next) * x0 + max(sigma_next**2 - s**2, 0.0) ** 0.5 * eps
    return x_next + s * noise if s > 0 else x_next


def heun_step(
    x: Tensor,
    velocity: Tensor,
    *,
    sigma: float,
    sigma_next: float,
    predict: Callable[[Tensor, float], Tensor],
) -> Tensor:
    """Heun's second-order step: Euler, then average the slopes at both ends (Karras et al. 2022).

    `predict(x, sigma)` gives the velocity. The last step to sigma = 0 stays Euler (no model call at 0).
    """
    x_euler = euler_step(x, velocity, sigma=sigma, sigma_next=sigma_next)
    if sigma_next == 0:
        return x_euler
    velocity_next = predict(x_euler, sigma_next)
    return x + (sigma_next - sigma) * 0.5 * (velocity + velocity_next)


# ---------------------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------------------


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Lin et al. 2023: scale the guided prediction to the conditional one's std per sample, then blend."""
    dims = list(range(1, guided.ndim))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided


def optimized_scale(cond: Tensor, uncond: Tensor, where: Tensor | None = None) -> Tensor:
    """CFG-Zero*'s s* (B, 1, ..., 1): per sample, the scale of `uncond` nearest `cond`, <cond, uncond> / |uncond|^2,
    over the positions `where` (bool, broadcast to cond's shape) is true; None: all of them."""
    if where is not None:
        keep = where.expand_as(cond)
        cond, uncond = cond * keep, uncond * keep
    c, u = cond.flatten(1), uncond.flatten(1)  # (B, N)
    scale = (c * u).sum(1) / u.square().sum(1).clamp_min(torch.finfo(u.dtype).tiny)  # (B,)
    return scale.view(-1, *[1] * (cond.ndim - 1))


def classifier_score(log_prob: ClassifierLogProb, x: Tensor, t_model: Tensor) -> Tensor:
    """grad_x log p(y | x_t, t) (B, C, T', H', W'), computed even when sampling runs under no_grad."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_prob(x_in, t_model).sum(), x_in)
    return grad


@dataclass
class _Denoiser:
    """The model plus everything that turns its raw output into the prediction a step uses."""

    model: Model
    process: Process
    text: Tensor
    text_mask: Tensor
    neg_text: Tensor | None
    neg_mask: Tensor | None
    guidance_scale: float
    guidance_rescale: float
    cond_mask: Tensor | None
    classifier_log_prob: ClassifierLogProb | None
    classifier_scale: float
    patch_size: tuple[int, int, int]
    self_cond: bool = False
    temporal_guidance: float = 0.0
    cfg_zero_star: bool = False
    x0_prev: Tensor | None = None
    """A self-conditioned model's last clean-latent estimate, per stacked copy; None before the first call."""
    both_mask: Tensor | None = field(init=False, default=None)
    """cond_mask for the [cond; uncond] batch of a guided call: both copies condition the same positions."""
    generated: Tensor | None = field(init=False, default=None)
    """(B, 1, T', H', W') true where the sample is generated (not conditioned); None: everywhere."""

    def __post_init__(self) -> None:
        if self.cond_mask is not None:
            self.both_mask = torch.cat([self.cond_mask, self.cond_mask])
            self.generated = ~position_mask(self.cond_mask)

    def __call__(self, x: Tensor, t_value: float, temporal: bool = True) -> Tensor:
        """The guided prediction at x; `temporal` False skips temporal guidance for this call."""
        t = torch.full((x.shape[0],), t_value, dtype=torch.float32, device=x.device)  # (B,)
        t_model = model_timesteps(t, self.cond_mask, self.patch_size)  # (B,) | (B, T') | (B, L)
        previous = self.x0_prev  # every call of this step reads it, the frame-local one after it is replaced
        if self.guidance_scale == 1.0:
            raw = self.model(x, t_model, self.text, self.text_mask, **self._self_cond_input(x, self.cond_mask, previous)).float()
            self._keep_estimate(raw, x, t)
            pred = cond = self.process.as_target(raw, x, t)
        else:
            # Conditional and unconditional in one batched forward: [cond; uncond].
            length = max(self.text.shape[1], self.neg_text.shape[1])
            text, text_mask = pad_text(self.text, self.text_mask, length)
            neg_text, neg_mask = pad_text(self.neg_text, self.neg_mask, length)
            x_both = torch.cat([x, x])  # (2B, C, T', H', W')
            both = self.model(
                x_both,
                torch.cat([t_model, t_model]),
                torch.cat([text, neg_text]),  # (2B, S, Dt)
                torch.cat([text_mask, neg_mask]),  # (2B, S)
                **self._self_cond_input(x_both, self.both_mask, previous),
            ).float()
            self._keep_estimate(both, x_both, torch.cat([t, t]))
            # Converted before they mix: guidance combines velocities (for rescale, which compares stds, it matters).
            cond, uncond = (self.process.as_target(part, x, t) for part in both.chunk(2))  # (B, C, T', H', W') each
            if self.cfg_zero_star:
                # Fitted where the sample is generated: conditioned positions are written back after the step.
                uncond = optimized_scale(cond, uncond, self.generated) * uncond
            pred = uncond + self.guidance_scale * (cond - uncond)
        if temporal and self.temporal_guidance != 0 and x.shape[2] > self.patch_size[0]:  # one token frame: nothing to keep apart
            weak = self._frame_local(x, t, t_model, previous)  # (B, C, T', H', W')
            pred = pred + self.temporal_guidance * (cond - weak)
        if self.guidance_rescale > 0 and self.guidance_scale != 1.0:
            pred = rescale_guidance(pred, cond, self.guidance_rescale)
        if self.classifier_log_prob is not None and self.classifier_scale != 0:
            score = self.classifier_scale * classifier_score(self.classifier_log_prob, x, t_model)
            pred = self.process.add_score(pred, x, t, score)
        return pred

    def _frame_local(self, x: Tensor, t: Tensor, t_model: Tensor, previous: Tensor | None) -> Tensor:
        """The conditional prediction with self-attention kept inside each token frame (temporal guidance's
        weak model); a self-conditioned model reads the conditional copy's previous estimate."""
        conditional = None if previous is None else previous[: x.shape[0]]  # rows [:B] of a [cond; uncond] batch
        extra = self._self_cond_input(x, self.cond_mask, conditional)
        raw = self.model(x, t_model, self.text, self.text_mask, frame_local=True, **extra).float()
        return self.process.as_target(raw, x, t)  # (B, C, T', H', W')

    def _self_cond_input(self, x: Tensor, cond_mask: Tensor | None, previous: Tensor | None) -> dict[str, Tensor]:
        """The `x0_prev` keyword of a self-conditioned model's call on x, the batch or [cond; uncond] copies of it
        with their cond_mask (none for other models), from `previous`, the estimate each copy made last (None:
        none yet, read as zeros). Each copy reads its own previous estimate, as it was trained to."""
        if not self.self_cond:
            return {}
        estimate = previous if previous is not None else torch.zeros_like(x)
        return {"x0_prev": self_cond_input(estimate, x, cond_mask)}

    def _keep_estimate(self, raw: Tensor, x: Tensor, t: Tensor) -> None:
        if self.self_cond:
            self.x0_prev = self_cond_estimate(self.process, raw, x, t)  # (B or 2B, C, T', H', W')


# ---------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(
    model: Model,
    noise: Tensor,
    *,
    process: Process,
    sampler: str,
    steps: int,
    text: Tensor,
    text_mask: Tensor,
    neg_text: Tensor | None = None,
    neg_mask: Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    cond_latents: Tensor | None = None,
    cond_mask: Tensor | None = None,
    classifier_log_prob: ClassifierLogProb | None = None,
    classifier_scale: float = 0.0,
    init_latents: Tensor | None = None,
    strength: float = 1.0,
    eta: float = 0.0,
    spacing: str = "leading",
    ddpm_variance: str = "beta_tilde",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = True,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    self_cond: bool = False,
    temporal_guidance: float = 0.0,
    temporal_guidance_start: float = 0.0,
    cfg_zero_star: bool = False,
    zero_init_steps: int = 0,
) -> Tensor:
    """Generate clean latents (B, C, T', H', W') from `noise` of that shape.

    sampler: 'ddpm' or 'ddim' with a DDPM process, 'euler', 'heun' or 'euler_a' with flow matching.
    Classifier-free guidance (guidance_scale != 1) needs the negative prompt's embedding (the empty
    prompt for plain CFG) as neg_text / neg_mask. cond_latents / cond_mask (B, T', H', W') hold the clean
    condition (see dit.conditioning). Video-to-video (SDEdit): init_latents noised to the level of step
    `sdedit_start_step(steps, strength)` and sampled from there. `generator` draws the stochastic
    samplers' noise (ddpm, ddim with eta > 0, euler_a). `self_cond`: the model is self-conditioned
    (DiTConfig.self_cond) and each call gets its previous clean-latent estimate as `x0_prev`.
    `temporal_guidance` s adds s * (cond - cond_frame_local) (module doc); the model must take
    `frame_local=True` (dit.model.DiT does); `temporal_guidance_start` f applies it only from step
    round(f * steps) of the full grid on (0: every step), v2v's skipped steps counted. `cfg_zero_star` scales
    the unconditional prediction by s* before guidance; `zero_init_steps` n (flow samplers) leaves x unchanged
    for steps 0..n-1 of the full grid, a self-conditioned model still making the estimate the next step reads
    (module doc).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: must be one of {sorted(SAMPLERS)}")
    if not isinstance(process, SAMPLERS[sampler]):
        raise ValueError(
            f"sampler={sampler!r} needs a {SAMPLERS[sampler].__name__} process, got {type(process).__name__}"
        )
    if guidance_scale != 1.0 and (neg_text is None or neg_mask is None):
        raise ValueError(
            f"guidance_scale={guidance_scale}: classifier-free guidance needs neg_text and neg_mask "
            "(pass the empty prompt's embedding for plain CFG)"
        )
    if temporal_guidance < 0:
        raise ValueError(f"temporal_guidance={temporal_guidance}: must be >= 0 (0 turns it off)")
    if not 0.0 <= temporal_guidance_start <= 1.0:
        raise ValueError(f"temporal_guidance_start={temporal_guidance_start}: must be in [0, 1] (a share of the steps)")
    if (cond_latents is None) != (cond_mask is None):
        raise ValueError("cond_latents and cond_mask: give both or neither")
    check_zero_init_steps(zero_init_steps, sampler=sampler, steps=steps)
    if cond_mask is not None:
        cond_mask = cond_mask.to(noise.device)
    denoise = _Denoiser(
        model, process, text, text_mask, neg_text, neg_mask, guidance_scale, guidance_rescale,
        cond_mask, classifier_log_prob, classifier_scale, patch_size, self_cond, temporal_guidance, cfg_zero_star,
    )  # fmt: skip
    grid = time_grid(process, steps, spacing=spacing, tokens=num_tokens(noise.shape, patch_size))
    start = 0 if init_latents is None else sdedit_start_step(steps, strength)
    x = noise.float()
    if init_latents is not None:
        x = _noised(process, init_latents.float(), x, grid[start])
    keep = None if cond_mask is None else position_mask(cond_mask)  # (B, 1, T', H', W')

    def restore(x: Tensor) -> Tensor:
        return x if keep is None else torch.where(keep, cond_latents.to(x.dtype), x)

    x = restore(x)
    temporal_from = round(temporal_guidance_start * steps)
    for index in tqdm(range(start, steps), disable=not progress, desc=sampler):
        t, t_next = grid[index], grid[index + 1]
        if index < zero_init_steps:
            # Zero velocity: x stays as it is; a self-conditioned model still makes the estimate the next step reads.
            if self_cond:
                denoise(x, t, False)
            if callback is not None:
                callback(index, t, x)
            continue
        temporal = index >= temporal_from
        pred = denoise(x, t, temporal)
        if sampler == "ddpm":
            noise_step = draw_noise(x, generator) if t_next >= 0 else None
            x = ddpm_step(
                x, pred, process=process, t=t, t_prev=t_next, noise=noise_step, variance=ddpm_variance
            )
        elif sampler == "ddim":
            noise_step = draw_noise(x, generator) if eta > 0 and t_next >= 0 else None
            x = ddim_step(x, pred, process=process, t=t, t_prev=t_next, eta=eta, noise=noise_step)
        elif sampler == "euler":
            x = euler_step(x, pred, sigma=process.sigma(t), sigma_next=process.sigma(t_next))
        elif sampler == "euler_a":
            noise_step = draw_noise(x, generator) if t_next > 0 else None
            x = flow_ancestral_step(x, pred, process=process, t=t, t_next=t_next, noise=noise_step)
        else:
            x = heun_step(
                x, pred, sigma=process.sigma(t), sigma_next=process.sigma(t_next),
                predict=lambda x_next, sigma, temporal=temporal: denoise(
                    restore(x_next), process.num_timesteps * sigma, temporal),
            )  # fmt: skip
        x = restore(x)
        if callback is not None:
            callback(index, t, x)
    return x


def check_zero_init_steps(zero_init_steps: int, *, sampler: str | None, steps: int | None) -> None:
    """ValueError unless `zero_init_steps` suits the sampler and leaves steps to run (None: not known yet)."""
    if zero_init_steps < 0:
        raise ValueError(f"zero_init_steps={zero_init_steps}: must be >= 0 (0 turns it off)")
    if zero_init_steps == 0:
        return
    if sampler is not None and sampler not in FLOW_SAMPLERS:
        raise ValueError(f"zero_init_steps={zero_init_steps}: a zero-velocity step needs a flow sampler "
                         f"({', '.join(FLOW_SAMPLERS)}), not {sampler!r}; use 0")
    if steps is not None and zero_init_steps >= steps:
        raise ValueError(f"zero_init_steps={zero_init_steps}: must be below steps={steps} (the output would be "
                         "the noise itself)")


def _noised(process: Process, x0: Tensor, noise: Tensor, t_value: float) -> Tensor:
    """x0 noised to model timestep t_value (the terminal -1 of DDPM is the clean data itself)."""
    t = torch.full((x0.shape[0],), t_value, device=x0.device)  # (B,)
    return process.add_noise(x0, noise, t)


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SamplerConfig:
    """How `generate.py` samples; maps onto the keyword arguments of `sample`."""

    sampler: str = "euler"
    """'ddpm' or 'ddim' (DDPM process), 'euler', 'heun' or 'euler_a' (flow matching)."""
    steps: int = 50
    """Sampler steps; heun calls the model 2 * steps - 1 times."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale; 1 disables guidance (and the unconditional pass)."""
    guidance_rescale: float = 0.0
    """Guidance rescale phi of Lin et al. 2023 in [0, 1]; 0 disables it."""
    temporal_guidance: float = 0.0
    """Temporal guidance scale (module doc); 0 disables it (and its extra model call per step)."""
    temporal_guidance_start: float = 0.0
    """Temporal guidance only from step round(this * steps) on; 0: every step."""
    cfg_zero_star: bool = False
    """CFG-Zero*: the unconditional prediction scaled by s* per sample before guidance (module doc)."""
    zero_init_steps: int = 0
    """Flow samplers: x left as the noise for this many first steps (CFG-Zero*'s zero-init); 0: none."""
    eta: float = 0.0
    """DDIM stochasticity: 0 deterministic, 1 ancestral."""
    spacing: str = "leading"
    """DDPM/DDIM grid: 'leading' or 'trailing' (trailing starts at the last step; better for few steps)."""
    ddpm_variance: str = "beta_tilde"
    """DDPM ancestral variance: 'beta' or 'beta_tilde'."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}: must be one of {sorted(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be >= 1")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={self.guidance_rescale}: must be in [0, 1]")
        if self.temporal_guidance < 0:
            raise ValueError(f"temporal_guidance={self.temporal_guidance}: must be >= 0 (0 turns it off)")
        if not 0.0 <= self.temporal_guidance_start <= 1.0:
            raise ValueError(f"temporal_guidance_start={self.temporal_guidance_start}: must be in [0, 1]")
        check_zero_init_steps(self.zero_init_steps, sampler=self.sampler, steps=self.steps)
        if self.eta < 0:
            raise ValueError(f"eta={self.eta}: must be >= 0")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing={self.spacing!r}: must be one of {SPACINGS}")
        if self.ddpm_variance not in DDPM_VARIANCES:
            raise ValueError(f"ddpm_variance={self.ddpm_variance!r}: must be one of {DDPM_VARIANCES}")

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> SamplerConfig:
        if name not in PRESETS:
            raise ValueError(f"preset {name!r}: unknown; valid presets are {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, SamplerConfig] = {
    "debug": SamplerConfig(sampler="euler", steps=4, guidance_scale=1.0),
    "flow": SamplerConfig(sampler="euler", steps=50, guidance_scale=5.0),
    "ddim": SamplerConfig(sampler="ddim", steps=50, guidance_scale=5.0, spacing="trailing"),
    "ddpm": SamplerConfig(sampler="ddpm", steps=1000, guidance_scale=4.0),
}
