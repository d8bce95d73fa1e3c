"""Diffusion processes: schedules, forward kernel, posterior, conversions, VLB, training loss."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from dit.conditioning import image_to_video
from dit.diffusion import (
    DDPM,
    X0_MIN_SIGMA,
    DiffusionConfig,
    FlowMatching,
    blur_frames,
    build_process,
    detail_weights,
    draw_noise,
    masked_mse,
    num_tokens,
    shift_sigma,
    temporal_error,
    training_loss,
)
from dit.likelihood import bits_per_dim, discretized_gaussian_log_likelihood, prior_bpd


def _quantised_uniform(shape, seed=0):
    """Data on the 256 levels of [-1, 1], like 8-bit images."""
    levels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    return levels.double() / 127.5 - 1


# ---------------------------------------------------------------------------------------------------------
# Schedules and the forward process
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine", "cos2"])
@pytest.mark.parametrize("t", [0, 25, 50])
def test_closed_form_forward_kernel_matches_markov_chain(schedule, t):
    process = DDPM(schedule=schedule, num_timesteps=100)
    count = 60_000
    generator = torch.Generator().manual_seed(t)
    x0 = torch.tensor([-1.0, 0.5, 1.0], dtype=torch.float64).repeat(count // 3)  # (N,)
    x = x0.clone()
    for beta in process.betas[: t + 1]:  # step t is the paper's step t + 1: t + 1 transitions
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(
            x.shape, generator=generator, dtype=torch.float64
        )
    abar = float(process.alphabar(torch.tensor([t]))[0])
    for value in (-1.0, 0.5, 1.0):
        chain = x[x0 == value]
        stderr = math.sqrt((1 - abar) / chain.numel())
        assert abs(float(chain.mean()) - math.sqrt(abar) * value) < 5 * stderr
        assert abs(float(chain.var()) / (1 - abar) - 1) < 5 * math.sqrt(2 / chain.numel())
    # The closed-form sampler draws from the same distribution.
    closed = process.add_noise(
        x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64), torch.full_like(x0, t)
    )
    assert abs(float(closed.mean()) - float(x.mean())) < 5 * math.sqrt(2 * (1 - abar) / count)


def test_linear_schedule_matches_ddpm_paper():
    process = DDPM(schedule="linear")
    assert 3.9e-5 < float(process.alphas_cumprod[-1]) < 4.1e-5
    x0 = _quantised_uniform((64, 3, 1, 8, 8))
    bpd = prior_bpd(process, x0)  # (B,)
    # KL(N(sqrt(a) x, 1 - a) || N(0, 1)) = (a x^2 - a - log(1 - a)) / 2 nats; about 1e-5 bits per dim.
    abar = float(process.alphas_cumprod[-1])
    expected = (abar * x0.pow(2) - abar - math.log(1 - abar)).flatten(1).mean(1) / 2 / math.log(2)
    torch.testing.assert_close(bpd, expected, rtol=1e-9, atol=0)
    assert 5e-6 < float(bpd.mean()) < 2e-5


@pytest.mark.parametrize("schedule", ["cosine", "cos2"])
def test_alphabar_schedules_follow_their_formula(schedule):
    steps = 1000
    offset = 0.008 if schedule == "cosine" else 0.0

    def f(u):
        return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    abar = DDPM(schedule=schedule, num_timesteps=steps).alphas_cumprod
    for t in (0, 10, 500, 900, 980):  # before the clip at beta = 0.999 bites near the end
        assert abar[t].item() == pytest.approx(f((t + 1) / steps) / f(0), rel=1e-9)
    assert DDPM(schedule=schedule).betas.max() <= 0.999


@pytest.mark.parametrize("schedule, diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedules_match_diffusers(schedule, diffusers_name):
    from diffusers import DDPMScheduler

    ours = DDPM(schedule=schedule).alphas_cumprod
    theirs = DDPMScheduler(beta_schedule=diffusers_name).alphas_cumprod.double()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_posterior_is_gaussian_conditioning_of_the_chain():
    process = DDPM(schedule="cosine", num_timesteps=50)
    x0, x_t = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([1, 5, 20, 40, 49])
    mean, var = process.q_posterior(x0, x_t, t)
    # (x_{t-1}, x_t) | x0 is jointly Gaussian: condition x_{t-1} on x_t directly.
    abar, abar_prev = process.alphabar(t)[:, None], process.alphabar(t - 1)[:, None]
    alpha = abar / abar_prev
    cov = alpha.sqrt() * (1 - abar_prev)  # Cov(x_{t-1}, x_t | x0)
    expected_mean = abar_prev.sqrt() * x0 + cov / (1 - abar) * (x_t - abar.sqrt() * x0)
    expected_var = (1 - abar_prev) - cov**2 / (1 - abar)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)


@pytest.mark.parametrize("source", ["eps", "v", "x0"])
@pytest.mark.parametrize("target", ["eps", "v", "x0"])
@pytest.mark.parametrize("per_position", [False, True])
def test_prediction_conversions_agree_and_round_trip(source, target, per_position):
    process = DDPM(schedule="cosine")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 3, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    shape = (3, 2, 3, 3) if per_position else (3,)
    t = torch.randint(0, 1000, shape, generator=generator).double()
    x_t = process.add_noise(x0, eps, t)
    abar = (
        process.alphabar(t).reshape(3, 1, *shape[1:])
        if per_position
        else process.alphabar(t).reshape(3, 1, 1, 1, 1)
    )
    truth = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}
    converted = process.convert(truth[source], x_t, t, source=source, target=target)
    torch.testing.assert_close(converted, truth[target])
    back = process.convert(converted, x_t, t, source=target, target=source)
    torch.testing.assert_close(back, truth[source])


# ---------------------------------------------------------------------------------------------------------
# Variational bound
# ---------------------------------------------------------------------------------------------------------


def test_discretised_gaussian_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None]  # (256, 1)
    mean = torch.tensor([[-1.2, -0.3, 0.0, 0.77, 1.5]], dtype=torch.float64)
    log_scale = torch.tensor([[-6.0, -3.0, -1.0, 0.0, 1.0]], dtype=torch.float64)
    total = discretized_gaussian_log_likelihood(levels, mean, log_scale).exp().sum(dim=0)  # (5,)
    torch.testing.assert_close(total, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-6)


def test_vlb_of_the_exact_model_is_the_prior_plus_decoder_term():
    """For one known data point the exact model has zero KL terms with the posterior variance."""
    process = DDPM(schedule="linear", num_timesteps=100)
    x0 = _quantised_uniform((2, 1, 1, 2, 2), seed=1).float()  # interior levels almost surely
    x0 = x0.clamp(-0.9, 0.9)
    text, text_mask = torch.zeros(2, 1, 1), torch.ones(2, 1, dtype=torch.bool)

    def exact_eps(x, t, text, text_mask):
        abar = process.alphabar(t).reshape(-1, 1, 1, 1, 1).float()
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    result = bits_per_dim(exact_eps, x0, process=process, text=text, text_mask=text_mask,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result["terms"][:, 1:].abs().max() < 1e-6
    # L_0: the decoder is N(x0, beta~_1) integrated over x0's bin of width 2/255.
    abar = process.alphas_cumprod.tolist()
    var = (1 - abar[1] / abar[0]) * (1 - abar[0]) / (1 - abar[1])
    mass = math.erf((1 / 255) / math.sqrt(2 * var))
    torch.testing.assert_close(
        result["terms"][:, 0], torch.full((2,), -math.log2(mass), dtype=torch.float64), rtol=1e-3, atol=0
    )
    torch.testing.assert_close(result["total"], result["prior"] + result["terms"].sum(1))
    # The larger reverse variance (beta) is not the posterior's, so its KL terms are positive.
    larger = bits_per_dim(exact_eps, x0, process=process, text=text, text_mask=text_mask, variance="beta")
    assert larger["terms"][:, 1:].min() > 0
    assert (larger["total"] > result["total"]).all()


# ---------------------------------------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_sampling", ["uniform", "logit_normal"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_sigmas_follow_their_shifted_distribution(sigma_sampling, shift):
    process = FlowMatching(shift=shift, sigma_sampling=sigma_sampling)
    t = process.sample_timesteps(20_000, tokens=100, generator=torch.Generator().manual_seed(0), device="cpu")
    sigma = (t.double() / 1000).sort().values
    # Invert the shift, then apply the CDF of the base distribution.
    base = sigma / (shift - (shift - 1) * sigma)
    if sigma_sampling == "uniform":
        cdf = base
    else:
        cdf = torch.special.ndtr(torch.logit(base))
    empirical = torch.arange(1, sigma.numel() + 1, dtype=torch.float64) / sigma.numel()
    assert float((empirical - cdf).abs().max()) < 0.015  # Kolmogorov-Smirnov, p << 0.01 at n = 20000


def test_dynamic_shift_is_log_linear_in_tokens_and_clamped():
    process = FlowMatching(
        dynamic_shift=True, min_tokens=256, max_tokens=4096, min_log_shift=0.5, max_log_shift=1.15
    )
    assert process.shift_for(256) == pytest.approx(math.exp(0.5))
    assert process.shift_for(4096) == pytest.approx(math.exp(1.15))
    assert process.shift_for((256 + 4096) // 2) == pytest.approx(math.exp((0.5 + 1.15) / 2))
    assert process.shift_for(10) == pytest.approx(math.exp(0.5))
    assert process.shift_for(100_000) == pytest.approx(math.exp(1.15))
    assert FlowMatching(shift=2.0).shift_for(100_000) == 2.0


def test_shift_keeps_endpoints_and_adds_noise():
    sigma = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = shift_sigma(sigma, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > sigma[1:-1]).all()
    torch.testing.assert_close(shift_sigma(shifted, 1 / 3.0), sigma)  # the shift's inverse is 1/s


# ---------------------------------------------------------------------------------------------------------
# Training loss
# ---------------------------------------------------------------------------------------------------------


def _oracle(process, x0):
    """A model that knows x0 and so predicts the exact target from (x_t, t)."""

    def model(x, t, text, text_mask):
        if t.ndim == 2:  # per latent frame (B, T')
            t = t[:, None, :, None, None]
        else:
            t = t.reshape(-1, 1, 1, 1, 1)
        if isinstance(process, FlowMatching) and process.prediction == "x0":
            return x0.expand_as(x)
        if isinstance(process, FlowMatching):
            sigma = t / 1000
            return (x - x0) / sigma.clamp(min=1e-6)  # x = x0 + sigma (eps - x0)
        abar = process.alphabar(t.expand(-1, 1, *x.shape[2:])[:, 0]).unsqueeze(1).float()
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return process.convert(
            eps, x, t.expand(-1, 1, *x.shape[2:])[:, 0], source="eps", target=process.prediction
        )

    return model


@pytest.mark.parametrize("process", [DDPM(prediction="eps"), DDPM(prediction="v", schedule="cosine"), FlowMatching(),
                                     FlowMatching(prediction="x0")],
                         ids=["ddpm-eps", "ddpm-v", "flow", "flow-x0"])  # fmt: skip
@pytest.mark.parametrize("conditioned", [False, True])
def test_training_loss_is_zero_for_the_exact_model(process, conditioned):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 3, 4, 4, generator=generator)
    cond_mask = image_to_video(x0[:, :, :1], latent_frames=3).mask if conditioned else None
    text, text_mask = torch.zeros(4, 2, 8), torch.ones(4, 2, dtype=torch.bool)
    loss, logs = training_loss(_oracle(process, x0), x0, process=process, text=text, text_mask=text_mask,
                               cond_mask=cond_mask, generator=generator)  # fmt: skip
    assert float(loss) < 1e-6
    wrong, _ = training_loss(lambda x, t, s, m: torch.zeros_like(x), x0, process=process, text=text,
                             text_mask=text_mask, cond_mask=cond_mask, generator=generator)  # fmt: skip
    assert float(wrong) > 0.1


@pytest.mark.parametrize("process", [FlowMatching(), DDPM(prediction="v", schedule="cosine")], ids=["flow", "ddpm-v"])
def test_self_conditioning_feeds_the_estimate_of_a_first_pass_without_gradients(process):
    x0 = torch.randn(3, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cond_mask = image_to_video(x0[:, :, :1], latent_frames=3).mask  # frame 0 clean
    text, text_mask = torch.zeros(3, 2, 8), torch.ones(3, 2, dtype=torch.bool)
    weight = torch.tensor(0.7, requires_grad=True)
    calls = []

    def model(x, t, text, text_mask, x0_prev):
        out = weight * x + 0.3 * x0_prev
        calls.append(dict(x=x.detach(), t=t, x0_prev=x0_prev.clone(), grad=torch.is_grad_enabled(), out=out.detach()))
        return out

    def run(share, seed=2):
        calls.clear()
        return training_loss(model, x0, process=process, text=text, text_mask=text_mask, cond_mask=cond_mask,
                             generator=torch.Generator().manual_seed(seed), self_cond=share)  # fmt: skip

    loss, _ = run(1.0)
    first, second = calls
    assert not first["grad"] and second["grad"]
    free = ~cond_mask[:, None].expand_as(x0)
    assert torch.equal(first["x0_prev"][free], torch.zeros_like(first["x0_prev"][free]))
    assert torch.equal(first["x0_prev"][~free], x0[~free]) and torch.equal(second["x0_prev"][~free], x0[~free])
    t = first["t"][:, 1]  # the free frames' timestep (B,)
    velocity = process.as_target(first["out"], first["x"], t)
    estimate = process.to_x0_eps(velocity, first["x"], t)[0]
    torch.testing.assert_close(second["x0_prev"][free], estimate[free])
    loss.backward()
    assert weight.grad is not None and weight.grad != 0
    # A share in (0, 1) is drawn per batch from the step's generator: some seeds take the first pass, some
    # do not, and a seed makes the same choice every time (so a resumed run replays it).
    passes = []
    for seed in range(12):
        run(0.5, seed)
        passes.append(len(calls))
        run(0.5, seed)
        assert len(calls) == passes[-1]
    assert set(passes) == {1, 2}


def test_conditioned_positions_are_clean_at_timestep_zero_and_add_no_loss():
    process = FlowMatching(sigma_sampling="uniform")
    x0 = torch.randn(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cond_mask = image_to_video(x0[:, :, :1], latent_frames=3).mask  # (B, T', H', W'), frame 0
    text, text_mask = torch.zeros(2, 2, 8), torch.ones(2, 2, dtype=torch.bool)
    seen = {}

    def model(x, t, text, text_mask):
        seen["x"], seen["t"] = x, t
        return 0.1 * x

    def loud(x, t, text, text_mask):  # wildly wrong, but only on the conditioned frame
        return 0.1 * x + 1000.0 * cond_mask[:, None].float()

    loss, _ = training_loss(model, x0, process=process, text=text, text_mask=text_mask, cond_mask=cond_mask,
                            generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(seen["x"][:, :, 0], x0[:, :, 0])
    assert seen["t"].shape == (2, 3) and (seen["t"][:, 0] == 0).all() and (seen["t"][:, 1:] > 0).all()
    assert not torch.equal(seen["x"][:, :, 1:], x0[:, :, 1:])
    loud_loss, _ = training_loss(loud, x0, process=process, text=text, text_mask=text_mask, cond_mask=cond_mask,
                                 generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(loss, loud_loss)


def _one_object(background, offset, at=(1, 2, 3)):
    """Latents (1, C, 3, 4, 4): `background` everywhere but one position, which holds background + offset."""
    x0 = torch.tensor(background).reshape(1, -1, 1, 1, 1).expand(1, len(background), 3, 4, 4).clone()
    x0[0, :, at[0], at[1], at[2]] += torch.tensor(offset)
    return x0


def test_detail_weights_single_out_an_object_on_a_flat_background_whatever_its_colour():
    positions = 3 * 4 * 4
    for offset in ([0.6, -0.8], [-1.0, 0.0]):  # two colours of the same latent distance (1)
        weight = detail_weights(_one_object([0.5, -2.0], offset), strength=0.5)  # (1, 3, 4, 4)
        expected = torch.ones(1, 3, 4, 4)
        expected[0, 1, 2, 3] = 1 + 0.5 * positions  # distance 1 against a mean distance of 1 / positions
        torch.testing.assert_close(weight, expected)
        torch.testing.assert_close(weight.mean(), torch.tensor(1.5))
    flat = detail_weights(_one_object([0.5, -2.0], [0.0, 0.0]), strength=0.5)
    torch.testing.assert_close(flat, torch.ones(1, 3, 4, 4))  # nothing stands out: every position alike


def test_weighted_mse_is_a_weighted_mean_over_free_positions():
    x0 = _one_object([0.5, -2.0], [0.6, -0.8])
    weight = detail_weights(x0, strength=2.0)
    cond_mask = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    cond_mask[:, 0] = True  # the first latent frame is given
    target = torch.zeros_like(x0)
    constant = torch.full_like(x0, 0.3)  # the same error everywhere: any weighting gives that error
    torch.testing.assert_close(masked_mse(constant, target, cond_mask, weight), torch.tensor([0.09]))
    wrong_object = torch.zeros_like(x0)
    wrong_object[0, :, 1, 2, 3] = 1.0  # error 1 at the object only
    free = 2 * 4 * 4
    plain = masked_mse(wrong_object, target, cond_mask)
    weighted = masked_mse(wrong_object, target, cond_mask, weight)
    object_weight = 1 + 2.0 * 3 * 4 * 4  # the mean distance is over every position, conditioned or not
    torch.testing.assert_close(plain, torch.tensor([1 / free]))
    torch.testing.assert_close(weighted, torch.tensor([object_weight / (free - 1 + object_weight)]))


def test_training_loss_with_detail_weight_counts_the_object_more_and_is_zero_for_the_exact_model():
    process = FlowMatching(prediction="x0")
    x0 = _one_object([0.5, -2.0], [0.6, -0.8]).repeat(2, 1, 1, 1, 1)
    text, text_mask = torch.zeros(2, 2, 8), torch.ones(2, 2, dtype=torch.bool)

    def misses_the_object(x, t, s, m):  # predicts the background everywhere
        return x0.flatten(3).median(dim=3).values[..., None, None].expand_as(x0)

    losses = [training_loss(model, x0, process=process, text=text, text_mask=text_mask, detail_weight=weight,
                            generator=torch.Generator().manual_seed(3))[0]
              for model in (misses_the_object, _oracle(process, x0)) for weight in (0.0, 1.0)]  # fmt: skip
    assert float(losses[1]) > 10 * float(losses[0]) > 0
    assert float(losses[2]) < 1e-6 and float(losses[3]) < 1e-6
    with pytest.raises(ValueError, match="detail_weight=-1"):
        DiffusionConfig(detail_weight=-1)


@pytest.mark.parametrize("process", [DDPM(prediction="eps"), FlowMatching()], ids=["ddpm-eps", "flow"])
def test_input_perturbation_noises_the_input_but_not_the_target(process):
    # The exact model reads the noise off its input, so what it misses is exactly gamma * xi, the extra
    # noise the target does not name: its loss is the mean of (gamma xi)^2 with xi drawn right after the noise.
    x0 = torch.randn(4, 3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    text, text_mask = torch.zeros(4, 2, 8), torch.ones(4, 2, dtype=torch.bool)
    gamma, seed = 0.3, 5
    loss, _ = training_loss(_oracle(process, x0), x0, process=process, text=text, text_mask=text_mask,
                            generator=torch.Generator().manual_seed(seed), input_perturbation=gamma)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    process.sample_timesteps(4, tokens=num_tokens(x0.shape, (1, 2, 2)), generator=generator, device=x0.device)
    draw_noise(x0, generator)
    xi = draw_noise(x0, generator)
    assert float(loss) == pytest.approx(float((gamma * xi).square().mean()), rel=1e-4)
    with pytest.raises(ValueError, match="input_perturbation=-0.1"):
        DiffusionConfig(input_perturbation=-0.1)


def test_temporal_error_counts_only_what_changes_from_frame_to_frame():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 4, 2, 2)  # (B, C, T', H', W')
    offset = torch.randn(2, 3, 1, 2, 2)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 4, 1, 1)
    steady, flicker = target + offset, target + offset * sign
    assert temporal_error(steady, target, None).abs().max() < 1e-6  # the same error in every frame: nothing
    expected = (2 * offset).square().mean(dim=(1, 2, 3, 4))  # (B,): each change is 2 * offset
    assert torch.allclose(temporal_error(flicker, target, None), expected, rtol=1e-5)
    # a conditioned frame 0 (image-to-video) leaves out the change into frame 1; frames 1-3 still count
    cond = torch.zeros(2, 4, 2, 2, dtype=torch.bool)
    cond[:, 0] = True
    flicker_after_0 = flicker.clone()
    flicker_after_0[:, :, 0] = target[:, :, 0] + 100.0  # a conditioned frame's output is never scored
    assert torch.allclose(temporal_error(flicker_after_0, target, cond), expected, rtol=1e-5)
    assert torch.equal(temporal_error(flicker[:, :, :1], target[:, :, :1], None), torch.zeros(2))  # a still


def test_training_loss_with_temporal_weight_adds_the_frame_to_frame_change_of_the_error():
    process = FlowMatching(prediction="x0")  # a constant x0 offset is then a velocity error constant over frames
    x0 = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    text, text_mask = torch.zeros(2, 2, 8), torch.ones(2, 2, dtype=torch.bool)
    sign = torch.tensor([1.0, -1.0, 1.0]).view(1, 1, 3, 1, 1)

    def losses(output, weight):
        return float(training_loss(lambda x, t, s, m: output, x0, process=process, text=text, text_mask=text_mask,
                                   generator=torch.Generator().manual_seed(2), temporal_weight=weight)[0])

    steady, flicker = x0 + 0.1, x0 + 0.1 * sign
    assert losses(steady, 0.0) > 0 and losses(steady, 2.0) == pytest.approx(losses(steady, 0.0), rel=1e-6)
    # the change between neighbouring frames is twice the error, so its square is four times the error's
    assert losses(flicker, 2.0) == pytest.approx(losses(flicker, 0.0) * (1 + 2.0 * 4), rel=1e-4)
    assert losses(x0, 2.0) < 1e-10  # the exact model
    with pytest.raises(ValueError, match="temporal_weight=-1"):
        DiffusionConfig(temporal_weight=-1)


def test_blur_frames_is_a_normalised_gaussian_per_frame():
    sigma = 1.3
    x = torch.zeros(2, 3, 2, 15, 15)
    x[1, 2, 1, 7, 7] = 1.0  # one delta, far enough from the border that nothing is clipped
    x[0, 0, 0] = 0.5  # a uniform frame
    out = blur_frames(x, sigma)
    offsets = torch.arange(15.0) - 7
    profile = torch.exp(-0.5 * (offsets / sigma) ** 2)
    expected = profile[:, None] * profile[None, :]
    expected = expected / expected.sum()  # (15, 15): the separable 2D Gaussian, clipped to 3 sigma below
    inside = (offsets.abs() <= math.ceil(3 * sigma))[:, None] & (offsets.abs() <= math.ceil(3 * sigma))[None, :]
    expected = torch.where(inside, expected, torch.zeros(()))
    expected = expected / expected.sum()
    assert torch.allclose(out[1, 2, 1], expected, atol=1e-7)
    assert torch.allclose(out[0, 0, 0], torch.full((15, 15), 0.5), atol=1e-7)  # uniform stays uniform
    untouched = torch.ones_like(out, dtype=torch.bool)
    untouched[1, 2, 1] = untouched[0, 0, 0] = False
    assert out[untouched].abs().max() == 0  # no frame or channel leaks into another


def _draws(x0, process, seed, blur_path):
    """Replay training_loss's draws: timesteps, noise, then which samples take the blurring path."""
    generator = torch.Generator().manual_seed(seed)
    t = process.sample_timesteps(x0.shape[0], tokens=num_tokens(x0.shape, (1, 2, 2)), generator=generator,
                                 device=x0.device)  # fmt: skip
    noise = draw_noise(x0, generator)
    on_path = torch.rand(x0.shape[0], generator=generator) < blur_path
    return t.double() / 1000, noise, on_path


def test_blur_path_trains_the_velocity_of_its_own_path():
    # The model that returns the numerical derivative of x(s) = (1 - s) (x0 + s (blur(x0) - x0)) + s eps at
    # the drawn s has ~zero loss and sees x(s) itself: input and target lie on one path.
    process, seed, blur_sigma = FlowMatching(sigma_sampling="uniform"), 3, 0.8
    x0 = torch.randn(5, 2, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    text, text_mask = torch.zeros(5, 2, 8), torch.ones(5, 2, dtype=torch.bool)
    sigma, noise, _ = _draws(x0, process, seed, 1.0)
    blurred = blur_frames(x0, blur_sigma)

    def path(s):
        s = s.double().reshape(-1, 1, 1, 1, 1)
        return (1 - s) * (x0 + s * (blurred - x0)) + s * noise

    seen = []

    def derivative(x, t, text, text_mask):
        seen.append(x)
        h = 1e-4
        return (path(sigma + h) - path(sigma - h)) / (2 * h)

    loss, _ = training_loss(derivative, x0, process=process, text=text, text_mask=text_mask,
                            generator=torch.Generator().manual_seed(seed), blur_path=1.0, blur_sigma=blur_sigma)  # fmt: skip
    assert torch.allclose(seen[0], path(sigma), atol=1e-6)
    assert float(loss) < 1e-10
    plain, _ = training_loss(_oracle(process, x0), x0, process=process, text=text, text_mask=text_mask,
                             generator=torch.Generator().manual_seed(seed), blur_path=1.0, blur_sigma=blur_sigma)  # fmt: skip
    assert float(plain) > 1e-3  # the straight path's exact model is not that path's


def test_blur_path_takes_its_fraction_of_samples_and_no_draws_when_off():
    # The straight path's exact model misses an on-path sample's target by exactly sigma (blur(x0) - x0).
    process, seed, fraction = FlowMatching(sigma_sampling="uniform"), 4, 0.5
    x0 = torch.randn(8, 2, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    text, text_mask = torch.zeros(8, 2, 8), torch.ones(8, 2, dtype=torch.bool)
    sigma, _, on_path = _draws(x0, process, seed, fraction)
    assert 0 < int(on_path.sum()) < 8  # this seed mixes both paths
    loss, _ = training_loss(_oracle(process, x0), x0, process=process, text=text, text_mask=text_mask,
                            generator=torch.Generator().manual_seed(seed), blur_path=fraction)  # fmt: skip
    miss = sigma.reshape(-1, 1, 1, 1, 1) * (blur_frames(x0, 1.0) - x0)  # (B, C, T', H', W')
    expected = (miss.square().flatten(1).mean(dim=1) * on_path).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    model = torch.nn.Linear(1, 1)  # any deterministic model: off means the very same loss, draw for draw

    def linear(x, t, text, text_mask):
        return model(x[..., None])[..., 0]

    off, _ = training_loss(linear, x0, process=process, text=text, text_mask=text_mask,
                           generator=torch.Generator().manual_seed(seed), blur_path=0.0)  # fmt: skip
    default, _ = training_loss(linear, x0, process=process, text=text, text_mask=text_mask,
                               generator=torch.Generator().manual_seed(seed))  # fmt: skip
    assert torch.equal(off, default)
    with pytest.raises(ValueError, match="needs flow matching"):
        training_loss(linear, x0, process=DDPM(), text=text, text_mask=text_mask, blur_path=0.5)


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def test_config_presets_build_and_load_through_omegaconf():
    for name in ("debug", "flow", "wan", "ddpm", "ddpm_cosine_v"):
        cfg = DiffusionConfig.from_preset(name)
        merged = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(DiffusionConfig), OmegaConf.create(vars(cfg)))
        )
        assert merged == cfg
        assert isinstance(build_process(cfg), DDPM if cfg.process == "ddpm" else FlowMatching)
    assert build_process(DiffusionConfig.from_preset("ddpm_cosine_v")) == DDPM(
        schedule="cosine", prediction="v"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"process": "edm"}, "process='edm'"),
        ({"process": "ddpm", "schedule": "sigmoid"}, "schedule='sigmoid'"),
        ({"process": "ddpm", "prediction": "score"}, "prediction='score'"),
        ({"process": "ddpm", "num_timesteps": 10}, "num_timesteps=10"),
        ({"shift": 0.0}, "shift=0.0"),
        ({"sigma_sampling": "beta"}, "sigma_sampling='beta'"),
        ({"flow_prediction": "eps"}, "prediction='eps'"),
        ({"blur_path": 1.5}, "blur_path=1.5"),
        ({"blur_path": 0.5, "process": "ddpm"}, "needs process='flow'"),
        ({"blur_sigma": 0.0}, "blur_sigma=0.0"),
        ({"self_cond": -0.1}, "self_cond=-0.1"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiffusionConfig(**overrides)


def test_x0_prediction_weighs_x0_errors_by_inverse_sigma_squared():
    """The loss compares velocities: an x0 error e at noise sigma is a velocity error e / sigma, with sigma
    floored at X0_MIN_SIGMA; the config's flow_prediction reaches the process."""
    process = build_process(DiffusionConfig(flow_prediction="x0", sigma_sampling="uniform"))
    assert process.prediction == "x0"
    x0, x = torch.randn(3, 2, 1, 2, 2), torch.randn(3, 2, 1, 2, 2)
    t = torch.tensor([500.0, 100.0, 10.0])  # sigma 0.5, 0.1, 0.01 (floored to 0.05)
    error = process.as_target(x0 + 0.1, x, t) - process.as_target(x0, x, t)
    for index, sigma in enumerate([0.5, 0.1, X0_MIN_SIGMA]):
        torch.testing.assert_close(error[index], torch.full_like(error[index], -0.1 / sigma))
    exact = process.as_target(x0[:2], process.add_noise(x0[:2], x[:2], t[:2]), t[:2])  # sigma above the floor
    torch.testing.assert_close(exact, process.training_target(x0[:2], x[:2], t[:2]))


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="debug"):
        DiffusionConfig.from_preset("huge")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("process", [DDPM(), FlowMatching()], ids=["ddpm", "flow"])
def test_training_loss_on_cuda_with_a_cpu_generator_and_mask(process):
    from dit.conditioning import MaskSamplerConfig, sample_cond_mask

    x0 = torch.randn(8, 4, 5, 8, 8, device="cuda")
    cond_mask = sample_cond_mask(
        MaskSamplerConfig.from_preset("debug"), 8, 5, 8, 8, torch.Generator().manual_seed(0)
    )
    text, text_mask = torch.zeros(8, 2, 8, device="cuda"), torch.ones(8, 2, dtype=torch.bool, device="cuda")
    losses = [
        training_loss(lambda x, t, s, m: 0.5 * x, x0, process=process, text=text, text_mask=text_mask,
                      cond_mask=cond_mask, generator=torch.Generator().manual_seed(0))[0]
        for _ in range(2)
    ]  # fmt: skip
    assert losses[0].device.type == "cuda" and torch.isfinite(losses[0])
    assert torch.equal(losses[0], losses[1])


def test_fixed_sigma_flow_loss_is_zero_for_the_exact_velocity_and_noise_power_for_zero():
    from bench.dit_loss import flow_loss_by_sigma

    latents = torch.zeros(3, 2, 2, 4, 4)  # x0 = 0: x_t = sigma * noise, so the velocity is x_t / sigma
    text, mask = torch.zeros(3, 1, 4), torch.ones(3, 1, dtype=torch.bool)
    exact = flow_loss_by_sigma(lambda x, t, *_: x / (t / 1000).view(-1, 1, 1, 1, 1), latents, text, mask, batch=2)
    zero = flow_loss_by_sigma(lambda x, *_: torch.zeros_like(x), latents, text, mask, sigmas=(0.5,), seed=1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    assert max(exact.values()) < 1e-10
    assert zero[0.5] == pytest.approx(float(noise.square().mean()), rel=1e-5)
