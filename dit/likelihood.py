"""The DDPM variational bound in bits per dimension, for evaluation (Ho et al. 2020, Nichol & Dhariwal 2021).

Data lives in [-1, 1] on 256 levels; L_0 is the discretised Gaussian decoder, L_T the prior term,
L_{t-1} the KL between the true posterior and the model's step with a fixed variance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dit.diffusion import DDPM, Model, broadcast_to, draw_noise


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp() - 1)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element for x on the 256 levels of [-1, 1], bins of width 2/255, open-ended edges."""
    half_bin = 1.0 / 255
    inv_std = torch.exp(-log_scale)
    cdf_upper = torch.special.ndtr(inv_std * (x - mean + half_bin))
    cdf_lower = torch.special.ndtr(inv_std * (x - mean - half_bin))
    upper = torch.where(x > 0.999, torch.ones_like(cdf_upper), cdf_upper)
    lower = torch.where(x < -0.999, torch.zeros_like(cdf_lower), cdf_lower)
    return torch.log((upper - lower).clamp(min=1e-12))


def _per_dim_bits(nats: Tensor) -> Tensor:
    return nats.flatten(1).mean(dim=1) / math.log(2)  # (B,)


def prior_bpd(process: DDPM, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits per dimension (B,)."""
    t_last = torch.full((x0.shape[0],), process.num_timesteps - 1, device=x0.device)
    abar = broadcast_to(process.alphabar(t_last), x0).double()
    kl = normal_kl(abar.sqrt() * x0.double(), (1 - abar).log(), torch.zeros(()), torch.zeros(()))
    return _per_dim_bits(kl)


def _model_log_variance(process: DDPM, t: Tensor, variance: str) -> Tensor:
    """log of the fixed reverse variance (B,): beta_t ('beta') or the posterior's beta~_t ('beta_tilde').

    beta~ is 0 at t = 0, so both take beta~ of the next step there (DDPM's clipped log variance).
    """
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance={variance!r}: must be 'beta' or 'beta_tilde'")
    abar, abar_prev = process.alphabar(t), process.alphabar(t - 1)
    beta = 1 - abar / abar_prev
    posterior = beta * (1 - abar_prev) / (1 - abar)
    abar_1, abar_0 = process.alphas_cumprod[1], process.alphas_cumprod[0]
    posterior_1 = (1 - abar_1 / abar_0) * (1 - abar_0) / (1 - abar_1)
    chosen = beta if variance == "beta" else posterior
    return torch.where(t == 0, posterior_1.to(t.device), chosen).log()


def vlb_term_bpd(
    process: DDPM, pred: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, *, variance: str = "beta_tilde"
) -> Tensor:
    """L_t in bits per dimension (B,): the decoder NLL L_0 at t = 0, else KL(q(x_{t-1} | x_t, x0) || p).

    p(x_{t-1} | x_t) has the mean implied by the model's prediction and a fixed variance; t is (B,).
    """
    x0, pred, x_t = x0.double(), pred.double(), x_t.double()
    true_mean, true_var = process.q_posterior(x0, x_t, t)
    model_mean, _ = process.q_posterior(process.to_x0_eps(pred, x_t, t)[0], x_t, t)
    log_var = broadcast_to(_model_log_variance(process, t, variance), x0)
    # The clamp only avoids log(0) at t = 0, where the KL is replaced by the decoder NLL.
    kl = normal_kl(true_mean, true_var.clamp(min=1e-30).log(), model_mean, log_var)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var)
    return torch.where(t == 0, _per_dim_bits(nll), _per_dim_bits(kl))


@torch.no_grad()
def bits_per_dim(
    model: Model,
    x0: Tensor,
    *,
    process: DDPM,
    text: Tensor,
    text_mask: Tensor,
    variance: str = "beta_tilde",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The full variational bound in bits per dimension, one model call per timestep (evaluation only).

    x0 (B, C, T', H', W') must be data in [-1, 1] quantised to 256 levels. Returns 'total' (B,),
    'prior' (B,) and 'terms' (B, T) with terms[:, t] = L_t.
    """
    terms = []
    for step in range(process.num_timesteps):
        t = torch.full((x0.shape[0],), float(step), device=x0.device)  # (B,)
        x_t = process.add_noise(x0, draw_noise(x0, generator), t)
        pred = model(x_t, t, text, text_mask)
        terms.append(vlb_term_bpd(process, pred, x0, x_t, t, variance=variance))
    terms_bpd = torch.stack(terms, dim=1)  # (B, T)
    prior = prior_bpd(process, x0)  # (B,)
    return {"total": prior + terms_bpd.sum(dim=1), "prior": prior, "terms": terms_bpd}
