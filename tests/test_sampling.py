"""Samplers: parity with diffusers, exactness on analytic data, guidance and conditioning invariants."""

import math

import pytest
import torch

from bench.sampling import GaussianMixture, analytic_model
from dit.conditioning import image_to_video, inpaint
from dit.diffusion import DDPM, FlowMatching
from dit.sampling import (
    SamplerConfig,
    ddpm_timesteps,
    euler_step,
    flow_ancestral_step,
    optimized_scale,
    sample,
    time_grid,
)

B, C, T, H, W = 2, 4, 3, 4, 4


def _text(batch=B, length=5, seed=0):
    text = torch.randn(batch, length, 8, generator=torch.Generator().manual_seed(seed))
    return text, torch.ones(batch, length, dtype=torch.bool)


def _toy_model(x, t, text, text_mask):
    """Depends on x, the timestep and the (masked mean of the) text, so every input matters."""
    pooled = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)  # (B, Dt)
    t = t.float().reshape(t.shape[0], -1).mean(1)  # (B,)
    return 0.9 * x + 0.001 * t.reshape(-1, 1, 1, 1, 1) + pooled.mean(1).reshape(-1, 1, 1, 1, 1)


def _noise(seed=0, shape=(B, C, T, H, W)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _process_for(sampler):
    return DDPM(schedule="cosine", prediction="v") if sampler in ("ddpm", "ddim") else FlowMatching(shift=2.0)


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers, step by step
# ---------------------------------------------------------------------------------------------------------


def _run_ours(process, sampler, steps, seed, **options):
    trajectory = []
    text, text_mask = _text()
    out = sample(_toy_model, _noise(), process=process, sampler=sampler, steps=steps, text=text, text_mask=text_mask,
                 generator=torch.Generator().manual_seed(seed), progress=False,
                 callback=lambda i, t, x: trajectory.append((t, x.clone())), **options)  # fmt: skip
    return out, trajectory


def _run_diffusers(scheduler, timesteps, seed, **step_options):
    generator = torch.Generator().manual_seed(seed)
    text, text_mask = _text()
    x, trajectory = _noise(), []
    for t in timesteps:
        pred = _toy_model(x, torch.full((B,), float(t)), text, text_mask)
        x = scheduler.step(pred, t, x, generator=generator, **step_options).prev_sample
        trajectory.append((float(t), x.clone()))
    return x, trajectory


def _assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs)
    for (t_ours, x_ours), (t_theirs, x_theirs) in zip(ours, theirs, strict=True):
        assert t_ours == pytest.approx(t_theirs, abs=1e-3)
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_matches_diffusers(prediction, variance):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_schedule="linear", clip_sample=False, prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
        variance_type={"beta_tilde": "fixed_small", "beta": "fixed_large"}[variance],
    )  # fmt: skip
    scheduler.set_timesteps(20)
    _, theirs = _run_diffusers(scheduler, scheduler.timesteps, seed=3)
    _, ours = _run_ours(DDPM(prediction=prediction), "ddpm", 20, seed=3, ddpm_variance=variance)
    _assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_matches_diffusers(spacing, eta, prediction):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
        timestep_spacing=spacing, prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
    )  # fmt: skip
    scheduler.set_timesteps(10)
    _, theirs = _run_diffusers(scheduler, scheduler.timesteps, seed=4, eta=eta)
    _, ours = _run_ours(DDPM(prediction=prediction), "ddim", 10, seed=4, eta=eta, spacing=spacing)
    _assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 12
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
    process = FlowMatching(shift=shift)
    torch.testing.assert_close(
        scheduler.sigmas.double(), process.sampling_sigmas(steps, tokens=0), rtol=0, atol=1e-6
    )
    _, theirs = _run_diffusers(scheduler, scheduler.timesteps, seed=5)
    _, ours = _run_ours(process, "euler", steps, seed=5)
    _assert_same_trajectory(ours, theirs)


def test_dynamic_shift_matches_diffusers_time_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    process = FlowMatching(dynamic_shift=True)
    tokens = T * (H // 2) * (W // 2) * 100
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(
        sigmas=torch.linspace(1, 0, 9)[:-1].tolist(), mu=math.log(process.shift_for(tokens))
    )
    torch.testing.assert_close(
        scheduler.sigmas.double(), process.sampling_sigmas(8, tokens=tokens), rtol=0, atol=1e-6
    )


def test_time_grids():
    assert ddpm_timesteps(1000, 4, "leading") == [750, 500, 250, 0, -1]
    assert ddpm_timesteps(1000, 4, "trailing") == [999, 749, 499, 249, -1]
    grid = time_grid(FlowMatching(), 4)
    assert grid == pytest.approx([1000, 750, 500, 250, 0])


# ---------------------------------------------------------------------------------------------------------
# Exactness on analytic data
# ---------------------------------------------------------------------------------------------------------

MIXTURE_1D = GaussianMixture(
    weights=torch.tensor([0.3, 0.7], dtype=torch.float64),
    means=torch.tensor([[-1.0], [1.5]], dtype=torch.float64),
    stds=torch.tensor([0.3, 0.5], dtype=torch.float64),
)


def _mixture_samples(process, sampler, steps, count=8000, **options):
    noise = torch.randn(count, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    text, text_mask = torch.zeros(count, 1, 1), torch.ones(count, 1, dtype=torch.bool)
    out = sample(analytic_model(MIXTURE_1D, process), noise, process=process, sampler=sampler, steps=steps,
                 text=text, text_mask=text_mask, generator=torch.Generator().manual_seed(1), progress=False,
                 patch_size=(1, 1, 1), **options)  # fmt: skip
    return out.flatten().double()


@pytest.mark.parametrize(
    "process, sampler, steps, options",
    [
        (DDPM(), "ddpm", 100, {"spacing": "trailing"}),
        (
            DDPM(schedule="cosine", prediction="v"),
            "ddpm",
            100,
            {"spacing": "trailing", "ddpm_variance": "beta"},
        ),
        (DDPM(), "ddim", 100, {"spacing": "trailing"}),
        (FlowMatching(), "heun", 25, {}),
        (FlowMatching(prediction="x0"), "heun", 25, {}),
        (FlowMatching(shift=3.0), "euler_a", 100, {}),
    ],
    ids=["ddpm-eps", "ddpm-v-large-variance", "ddim", "heun", "heun-x0", "euler-ancestral"],
)
def test_sampler_recovers_mixture_moments(process, sampler, steps, options):
    x = _mixture_samples(process, sampler, steps, **options)
    weights, means, stds = MIXTURE_1D.weights, MIXTURE_1D.means[:, 0], MIXTURE_1D.stds
    mean = float(weights @ means)
    var = float(weights @ (stds**2 + means**2)) - mean**2
    stderr = math.sqrt(var / x.numel())
    assert abs(float(x.mean()) - mean) < 4 * stderr
    assert abs(float(x.var()) / var - 1) < 0.04
    # The share of the left mode, where the two components barely overlap.
    assert abs(float((x < 0).double().mean()) - 0.3) < 0.02


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("shift", [1.0, 4.0])
@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_flow_sampler_is_exact_on_a_straight_path(sampler, shift, prediction):
    """Point data: the exact velocity is constant along each path, so every step lands on the line; an exact
    x0 model converted to velocities walks the same path."""
    point = GaussianMixture(torch.ones(1, dtype=torch.float64), torch.tensor([[0.7, -1.2]], dtype=torch.float64),
                            torch.zeros(1, dtype=torch.float64))  # fmt: skip
    process = FlowMatching(shift=shift, prediction=prediction)
    noise = torch.randn(64, 2, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    target = point.means[0].float().reshape(1, 2, 1, 1, 1)
    states = []
    out = sample(analytic_model(point, process), noise, process=process, sampler=sampler, steps=5,
                 text=torch.zeros(64, 1, 1), text_mask=torch.ones(64, 1, dtype=torch.bool), progress=False,
                 patch_size=(1, 1, 1), callback=lambda i, t, x: states.append((t, x.clone())))  # fmt: skip
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=1e-5)
    grid = time_grid(process, 5)
    assert [t for t, _ in states] == grid[:-1]
    for (_, x), t_next in zip(states, grid[1:], strict=True):
        sigma = t_next / 1000
        torch.testing.assert_close(x, (1 - sigma) * target + sigma * noise, rtol=0, atol=1e-5)


def test_flow_ancestral_step_without_noise_is_the_euler_step():
    x, velocity, process = _noise(seed=1), _noise(seed=2), FlowMatching()
    for t, t_next in [(1000.0, 900.0), (700.0, 300.0), (200.0, 0.0)]:
        torch.testing.assert_close(flow_ancestral_step(x, velocity, process=process, t=t, t_next=t_next, eta=0.0),
                                   euler_step(x, velocity, sigma=t / 1000, sigma_next=t_next / 1000))  # fmt: skip


def test_flow_ancestral_keeps_point_data_on_its_path_and_redraws_the_noise():
    """With the exact model of point data every state is (1 - sigma) x0 + sigma * (unit Gaussian noise): the
    ancestral step keeps that marginal while replacing the noise (Euler keeps the initial noise), and ends on x0."""
    point = GaussianMixture(torch.ones(1, dtype=torch.float64), torch.tensor([[0.7]], dtype=torch.float64),
                            torch.zeros(1, dtype=torch.float64))  # fmt: skip
    process, count, steps = FlowMatching(shift=3.0), 20000, 6
    noise = torch.randn(count, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0))

    def carried_noise(sampler):
        """Per intermediate state, the noise it carries: (x - (1 - sigma) x0) / sigma, flattened."""
        states = []
        out = sample(analytic_model(point, process), noise, process=process, sampler=sampler, steps=steps,
                     text=torch.zeros(count, 1, 1), text_mask=torch.ones(count, 1, dtype=torch.bool),
                     generator=torch.Generator().manual_seed(1), progress=False, patch_size=(1, 1, 1),
                     callback=lambda i, t, x: states.append(x.double().flatten()))  # fmt: skip
        torch.testing.assert_close(out, torch.full_like(out, 0.7), rtol=0, atol=1e-5)
        sigmas = [t / 1000 for t in time_grid(process, steps)[1:-1]]
        return [(x - (1 - sigma) * 0.7) / sigma for x, sigma in zip(states[:-1], sigmas, strict=True)]

    def correlation(a):
        return float(torch.corrcoef(torch.stack([a, noise.double().flatten()]))[0, 1])

    for residual in carried_noise("euler_a"):
        assert abs(float(residual.mean())) < 4 / count**0.5
        assert abs(float(residual.std()) - 1) < 0.02
        assert correlation(residual) < 0.5
    assert all(correlation(residual) > 0.9999 for residual in carried_noise("euler"))


def test_heun_converges_at_second_order_and_euler_at_first():
    gaussian = GaussianMixture(torch.ones(1, dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64),
                               torch.tensor([0.3], dtype=torch.float64))  # fmt: skip
    process = FlowMatching()
    noise = torch.linspace(-2, 2, 9).reshape(9, 1, 1, 1, 1)

    def solve(sampler, steps):
        return sample(analytic_model(gaussian, process), noise, process=process, sampler=sampler, steps=steps,
                      text=torch.zeros(9, 1, 1), text_mask=torch.ones(9, 1, dtype=torch.bool), progress=False,
                      patch_size=(1, 1, 1)).double()  # fmt: skip

    # The ODE of a Gaussian is solved in closed form: x0 = mu + s * noise (the optimal transport map).
    exact = 0.5 + 0.3 * noise.double()
    euler = [float((solve("euler", n) - exact).abs().max()) for n in (20, 40)]
    heun = [float((solve("heun", n) - exact).abs().max()) for n in (10, 20)]
    assert 1.6 < euler[0] / euler[1] < 2.4
    assert 3.0 < heun[0] / heun[1] < 5.0
    assert heun[1] < euler[1]


# ---------------------------------------------------------------------------------------------------------
# Conditioning, guidance, determinism
# ---------------------------------------------------------------------------------------------------------

SAMPLERS = ["ddpm", "ddim", "euler", "heun", "euler_a"]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", ["frames", "region"])
def test_conditioned_positions_come_out_bit_identical(sampler, kind):
    clean = _noise(seed=9)
    if kind == "frames":
        condition = image_to_video(clean[:, :, :1], latent_frames=T)
    else:
        region = torch.zeros(B, T, H, W, dtype=torch.bool)
        region[:, :, 2:, :] = True  # the bottom half, aligned to 2x2 patches, is regenerated
        condition = inpaint(clean, region)
    text, text_mask = _text()
    neg_text, neg_mask = _text(length=3, seed=1)
    seen = []

    def model(x, t, text, text_mask):
        seen.append(t)
        return _toy_model(x, t, text, text_mask)

    out = sample(model, _noise(), process=_process_for(sampler), sampler=sampler, steps=4, text=text,
                 text_mask=text_mask, neg_text=neg_text, neg_mask=neg_mask, guidance_scale=4.0,
                 cond_latents=condition.latents, cond_mask=condition.mask, eta=0.5, spacing="trailing",
                 generator=torch.Generator().manual_seed(0), progress=False)  # fmt: skip
    keep = condition.mask[:, None].expand_as(out)
    assert torch.equal(out[keep], clean[keep])
    assert not torch.equal(out[~keep], clean[~keep])
    expected_shape = (2 * B, T) if kind == "frames" else (2 * B, T * (H // 2) * (W // 2))
    assert all(t.shape == expected_shape for t in seen)
    assert all((t[:, 0] == 0).all() and (t[:, -1] > 0).all() for t in seen)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_scale_one_is_the_conditional_prediction_in_one_pass(sampler):
    text, text_mask = _text()
    neg_text, neg_mask = _text(seed=1)
    batches = []

    def model(x, t, text, text_mask):
        batches.append(x.shape[0])
        return _toy_model(x, t, text, text_mask)

    options = dict(process=_process_for(sampler), sampler=sampler, steps=3, text=text, text_mask=text_mask,
                   progress=False)  # fmt: skip
    plain = sample(model, _noise(), generator=torch.Generator().manual_seed(0), **options)
    with_negative = sample(model, _noise(), neg_text=neg_text, neg_mask=neg_mask, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(0), **options)  # fmt: skip
    assert torch.equal(plain, with_negative)
    assert set(batches) == {B}
    guided = sample(model, _noise(), neg_text=neg_text, neg_mask=neg_mask, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), **options)  # fmt: skip
    assert not torch.allclose(guided, plain)


def test_cfg_combines_cond_and_uncond_from_one_batched_call():
    """One Euler step from sigma = 1 to 0 returns noise - prediction, which exposes the guided output."""
    text, text_mask = _text(length=5)
    neg_text, neg_mask = _text(length=2, seed=1)  # shorter: padded and masked inside the sampler
    noise, process, scale = _noise(), FlowMatching(), 6.0
    out = sample(_toy_model, noise, process=process, sampler="euler", steps=1, text=text, text_mask=text_mask,
                 neg_text=neg_text, neg_mask=neg_mask, guidance_scale=scale, progress=False)  # fmt: skip
    t = torch.full((B,), 1000.0)
    cond = _toy_model(noise, t, text, text_mask)
    uncond = _toy_model(noise, t, neg_text, neg_mask)
    torch.testing.assert_close(noise - out, uncond + scale * (cond - uncond))


def test_cfg_of_an_x0_model_guides_the_velocities():
    """Guidance combines velocities: an x0 model's cond and uncond outputs are converted before they mix
    (for plain CFG the order would not matter; for guidance rescale, which compares stds, it does)."""
    text, text_mask = _text(length=5)
    neg_text, neg_mask = _text(length=2, seed=1)
    noise, process, scale = _noise(), FlowMatching(prediction="x0"), 6.0
    options = dict(process=process, sampler="euler", steps=1, text=text, text_mask=text_mask, neg_text=neg_text,
                   neg_mask=neg_mask, guidance_scale=scale, progress=False)
    t = torch.full((B,), 1000.0)
    cond, uncond = noise - _toy_model(noise, t, text, text_mask), noise - _toy_model(noise, t, neg_text, neg_mask)
    torch.testing.assert_close(noise - sample(_toy_model, noise, **options), uncond + scale * (cond - uncond))
    rescaled = sample(_toy_model, noise, guidance_rescale=1.0, **options)
    guided = uncond + scale * (cond - uncond)
    expected = guided * (cond.flatten(1).std(1) / guided.flatten(1).std(1)).reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noise - rescaled, expected)


def test_guidance_rescale_restores_the_conditional_std():
    text, text_mask = _text()
    neg_text, neg_mask = _text(seed=1)
    noise, process = _noise(), FlowMatching()
    options = dict(process=process, sampler="euler", steps=1, text=text, text_mask=text_mask, neg_text=neg_text,
                   neg_mask=neg_mask, guidance_scale=7.0, progress=False)  # fmt: skip
    rescaled = noise - sample(_toy_model, noise, guidance_rescale=1.0, **options)
    cond = _toy_model(noise, torch.full((B,), 1000.0), text, text_mask)
    torch.testing.assert_close(rescaled.flatten(1).std(1), cond.flatten(1).std(1))
    plain = noise - sample(_toy_model, noise, guidance_rescale=0.0, **options)
    half = noise - sample(_toy_model, noise, guidance_rescale=0.5, **options)
    torch.testing.assert_close(half, 0.5 * (plain + rescaled))


@pytest.mark.parametrize("process, sampler, steps", [(DDPM(), "ddim", 400), (FlowMatching(), "heun", 25)],
                         ids=["ddim", "heun"])  # fmt: skip
def test_classifier_guidance_samples_the_posterior(process, sampler, steps):
    """Data N(0, 1), observation y = x0 + N(0, r^2): guidance with the exact log p(y | x_t) samples p(x0 | y)."""
    y, r = 1.2, 0.5
    standard = GaussianMixture(torch.ones(1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                               torch.ones(1, dtype=torch.float64))  # fmt: skip

    def log_prob(x, t):
        # x_t = a x0 + b eps with a^2 s^2 + b^2 = v: x0 | x_t ~ N(a x_t / v, b^2 / v) for x0 ~ N(0, 1).
        if isinstance(process, DDPM):
            abar = process.alphabar(t).float()
            a, b = abar.sqrt(), (1 - abar).sqrt()
        else:
            b = t.float() / 1000
            a = 1 - b
        var = a**2 + b**2
        mean, spread = a / var, b**2 / var + r**2
        return -((y - mean * x.flatten(1)[:, 0]) ** 2) / (2 * spread)

    count = 8000
    noise = torch.randn(count, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    out = sample(analytic_model(standard, process), noise, process=process, sampler=sampler, steps=steps,
                 text=torch.zeros(count, 1, 1), text_mask=torch.ones(count, 1, dtype=torch.bool),
                 classifier_log_prob=log_prob, classifier_scale=1.0, spacing="trailing", progress=False,
                 patch_size=(1, 1, 1)).flatten().double()  # fmt: skip
    post_mean, post_var = y / (1 + r**2), r**2 / (1 + r**2)
    assert abs(float(out.mean()) - post_mean) < 5 * math.sqrt(post_var / count)
    assert abs(float(out.var()) / post_var - 1) < 0.04


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_fixed_seed_gives_identical_samples(sampler):
    text, text_mask = _text()
    options = dict(process=_process_for(sampler), sampler=sampler, steps=4, text=text, text_mask=text_mask,
                   eta=1.0, progress=False)  # fmt: skip
    first = sample(_toy_model, _noise(), generator=torch.Generator().manual_seed(7), **options)
    second = sample(_toy_model, _noise(), generator=torch.Generator().manual_seed(7), **options)
    other = sample(_toy_model, _noise(), generator=torch.Generator().manual_seed(8), **options)
    assert torch.equal(first, second)
    assert torch.equal(first, other) == (sampler in ("euler", "heun"))  # only ddpm / ddim(eta > 0) draw noise


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sdedit_strength_ends(sampler):
    text, text_mask = _text()
    source = _noise(seed=3)
    calls = []
    options = dict(process=_process_for(sampler), sampler=sampler, steps=8, text=text, text_mask=text_mask,
                   init_latents=source, generator=torch.Generator().manual_seed(0), progress=False,
                   callback=lambda i, t, x: calls.append(i))  # fmt: skip
    assert torch.equal(sample(_toy_model, _noise(), strength=0.0, **options), source)
    assert calls == []
    sample(_toy_model, _noise(), strength=0.5, **options)
    assert calls == [4, 5, 6, 7]
    if sampler in ("euler", "heun"):  # sigma = 1 is pure noise: strength 1 ignores the source entirely
        options.pop("init_latents")
        full = sample(_toy_model, _noise(), init_latents=source, strength=1.0, **options)
        assert torch.equal(full, sample(_toy_model, _noise(), **options))


def test_invalid_requests_fail_clearly():
    text, text_mask = _text()
    with pytest.raises(ValueError, match="sampler='euler' needs a FlowMatching"):
        sample(_toy_model, _noise(), process=DDPM(), sampler="euler", steps=2, text=text, text_mask=text_mask)
    with pytest.raises(ValueError, match="neg_text"):
        sample(_toy_model, _noise(), process=FlowMatching(), sampler="euler", steps=2, text=text, text_mask=text_mask,
               guidance_scale=5.0)  # fmt: skip
    with pytest.raises(ValueError, match="spacing='middle'"):
        SamplerConfig(spacing="middle")
    with pytest.raises(ValueError, match="debug"):
        SamplerConfig.from_preset("nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_on_cuda_are_deterministic_and_keep_conditions(sampler):
    device = "cuda"
    text, text_mask = (tensor.to(device) for tensor in _text())
    neg_text, neg_mask = (tensor.to(device) for tensor in _text(length=2, seed=1))
    condition = image_to_video(_noise(seed=2)[:, :, :1].to(device), latent_frames=T)
    runs = [
        sample(_toy_model, _noise().to(device), process=_process_for(sampler), sampler=sampler, steps=6,
               text=text, text_mask=text_mask, neg_text=neg_text, neg_mask=neg_mask, guidance_scale=4.0,
               cond_latents=condition.latents, cond_mask=condition.mask.cpu(), eta=1.0,
               classifier_log_prob=lambda x, t: -(x**2).flatten(1).sum(1), classifier_scale=0.1,
               generator=torch.Generator(device).manual_seed(0), progress=False)
        for _ in range(2)
    ]  # fmt: skip
    assert runs[0].device.type == "cuda" and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :, 0], condition.latents[:, :, 0])


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_self_conditioned_model_reads_its_previous_estimate(sampler, guidance_scale):
    """Each call of a self-conditioned model gets the clean-latent estimate of the call before it (zeros at
    first), each guidance branch its own, with conditioned positions holding their clean latents."""
    clean = _noise(seed=9)
    condition = image_to_video(clean[:, :, :1], latent_frames=T)
    text, text_mask = _text()
    neg_text, neg_mask = _text(length=3, seed=1)
    process = _process_for(sampler)
    calls = []

    def model(x, t, text, text_mask, x0_prev):
        out = _toy_model(x, t, text, text_mask) + 0.1 * x0_prev
        calls.append((x.clone(), t.clone(), x0_prev.clone(), out.clone()))
        return out

    keep = condition.mask[:, None].expand(B, C, T, H, W)
    sample(model, _noise(), process=process, sampler=sampler, steps=4, text=text, text_mask=text_mask,
           neg_text=neg_text, neg_mask=neg_mask, guidance_scale=guidance_scale, cond_latents=condition.latents,
           cond_mask=condition.mask, progress=False, self_cond=True)  # fmt: skip
    copies = 1 if guidance_scale == 1.0 else 2
    keep = torch.cat([keep] * copies)
    assert len(calls) == (7 if sampler == "heun" else 4)
    first = calls[0][2]
    assert torch.equal(first[~keep], torch.zeros_like(first[~keep]))
    for (x, _, x0_prev, _), (x_before, t_before, _, out_before) in zip(calls[1:], calls[:-1], strict=True):
        t_free = t_before[:, 1:].amax(dim=1)  # the unconditioned frames' timestep, (copies*B,)
        target = process.as_target(out_before, x_before, t_free)
        estimate = process.to_x0_eps(target, x_before, t_free)[0]
        torch.testing.assert_close(x0_prev[~keep], estimate[~keep])
        assert torch.equal(x0_prev[keep], x[keep])  # the clean condition
        assert torch.equal(x[keep], torch.cat([clean] * copies)[keep])



def _frame_local_toy(x, t, text, text_mask, frame_local=False):
    """_toy_model plus a term only the frame-local call has, so the two predictions differ everywhere."""
    return _toy_model(x, t, text, text_mask) + (0.3 * x.flip(2) if frame_local else 0.0)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_temporal_guidance_adds_the_conditional_less_the_frame_local_prediction(guidance_scale):
    """One Euler step from sigma = 1 to 0 returns noise - prediction: the guided output plus
    s * (cond - cond_frame_local), with the frame-local call made on the prompt."""
    text, text_mask = _text(length=5)
    neg_text, neg_mask = _text(length=2, seed=1)
    noise, scale = _noise(), 1.5
    options = dict(process=FlowMatching(), sampler="euler", steps=1, text=text, text_mask=text_mask,
                   neg_text=neg_text, neg_mask=neg_mask, guidance_scale=guidance_scale, progress=False)
    t = torch.full((B,), 1000.0)
    cond = _frame_local_toy(noise, t, text, text_mask)
    weak = _frame_local_toy(noise, t, text, text_mask, frame_local=True)
    plain = noise - sample(_frame_local_toy, noise, **options)
    guided = noise - sample(_frame_local_toy, noise, temporal_guidance=scale, **options)
    torch.testing.assert_close(guided, plain + scale * (cond - weak))


def test_temporal_guidance_calls_the_frame_local_model_only_where_it_can_matter():
    """Off: no frame-local call. On: one per model evaluation of a video. An image (one latent frame) has
    nothing to keep apart, so it makes none and samples exactly as without."""
    text, text_mask = _text()
    neg_text, neg_mask = _text(seed=1)
    calls = []

    def model(x, t, text, text_mask, frame_local=False):
        calls.append(frame_local)
        return _frame_local_toy(x, t, text, text_mask, frame_local)

    options = dict(process=FlowMatching(), sampler="heun", steps=3, text=text, text_mask=text_mask,
                   neg_text=neg_text, neg_mask=neg_mask, guidance_scale=3.0, progress=False)
    sample(model, _noise(), **options)
    assert calls == [False] * 5
    calls.clear()
    sample(model, _noise(), temporal_guidance=1.0, **options)
    assert calls == [False, True] * 5
    calls.clear()
    image = _noise(shape=(B, C, 1, H, W))
    assert torch.equal(sample(model, image, temporal_guidance=1.0, **options), sample(model, image, **options))
    assert not any(calls)
    with pytest.raises(ValueError, match="temporal_guidance=-1"):
        sample(model, _noise(), temporal_guidance=-1.0, **options)


def test_temporal_guidance_start_guides_only_the_later_steps_of_the_full_grid():
    """start f: no frame-local call before step round(f * steps) (both evaluations of a Heun step follow
    its step), so the trajectory up to there is the unguided one; v2v's skipped steps count; f = 1 is off."""
    text, text_mask = _text()
    neg_text, neg_mask = _text(seed=1)
    calls, states = [], []

    def model(x, t, text, text_mask, frame_local=False):
        calls.append(frame_local)
        return _frame_local_toy(x, t, text, text_mask, frame_local)

    def run(temporal_guidance=1.0, **extra):
        calls.clear()
        states.clear()
        sample(model, _noise(), process=FlowMatching(), steps=4, text=text, text_mask=text_mask, neg_text=neg_text,
               neg_mask=neg_mask, guidance_scale=3.0, temporal_guidance=temporal_guidance, progress=False,
               callback=lambda index, t, x: states.append(x.clone()), **extra)  # fmt: skip
        return list(calls), list(states)

    heun_calls, _ = run(sampler="heun", temporal_guidance_start=0.5)
    assert heun_calls == [False] * 4 + [False, True] * 3  # steps 0-1: two evaluations each; 2-3 guided
    plain_calls, plain = run(sampler="euler", temporal_guidance=0.0)
    late_calls, late = run(sampler="euler", temporal_guidance_start=0.5)
    assert late_calls == [False, False, False, True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(late[:2], plain[:2], strict=True))
    assert not torch.allclose(late[2], plain[2])
    every_calls, _ = run(sampler="euler", temporal_guidance_start=0.0)
    assert every_calls == [False, True] * 4
    off_calls, off = run(sampler="euler", temporal_guidance_start=1.0)
    assert not any(off_calls) and all(torch.equal(a, b) for a, b in zip(off, plain, strict=True))
    source = _noise(seed=5)
    v2v_calls, _ = run(sampler="euler", init_latents=source, strength=0.5, temporal_guidance_start=0.75)
    assert v2v_calls == [False, False, True]  # the run is steps 2-3; guidance from step 3
    with pytest.raises(ValueError, match="temporal_guidance_start=1.5: must be in"):
        run(sampler="euler", temporal_guidance_start=1.5)


def test_temporal_guidance_of_a_self_conditioned_model_reads_the_conditional_estimate():
    """The frame-local call gets the estimate the conditional call of the same step read (not the one that
    call just made, and not the unconditional copy's)."""
    text, text_mask = _text()
    neg_text, neg_mask = _text(seed=1)
    calls = []

    def model(x, t, text, text_mask, x0_prev, frame_local=False):
        calls.append((frame_local, x0_prev.clone()))
        return _frame_local_toy(x, t, text, text_mask, frame_local) + 0.1 * x0_prev

    sample(model, _noise(), process=FlowMatching(), sampler="euler", steps=3, text=text, text_mask=text_mask,
           neg_text=neg_text, neg_mask=neg_mask, guidance_scale=3.0, temporal_guidance=1.0, progress=False,
           self_cond=True)  # fmt: skip
    assert [local for local, _ in calls] == [False, True] * 3
    for (_, both), (_, local) in zip(calls[0::2], calls[1::2], strict=True):
        assert torch.equal(local, both[:B])  # the [cond; uncond] batch's conditional half
    assert not torch.equal(calls[3][1], calls[1][1])  # and it moves from step to step


# ---------------------------------------------------------------------------------------------------------
# CFG-Zero*
# ---------------------------------------------------------------------------------------------------------


def test_optimized_scale_projects_uncond_onto_cond_per_sample():
    """s* is the least-squares scale: 1 for equal predictions, 1/k for uncond = k cond, and cond - s* uncond
    is orthogonal to uncond in every sample; fitted over the positions given, the rest ignored."""
    cond, other = _noise(seed=1), _noise(seed=2)
    assert torch.allclose(optimized_scale(cond, cond), torch.ones(B, 1, 1, 1, 1))
    k = torch.tensor([2.0, -0.5]).view(B, 1, 1, 1, 1)
    assert torch.allclose(optimized_scale(cond, k * cond), 1 / k)
    scale = optimized_scale(cond, other)
    assert scale.shape == (B, 1, 1, 1, 1)
    residual = ((cond - scale * other) * other).flatten(1).sum(1)  # (B,)
    assert torch.allclose(residual, torch.zeros(B), atol=1e-4)
    where = torch.zeros(B, 1, T, H, W, dtype=torch.bool)
    where[:, :, 1:] = True  # the first latent frame conditioned: what it holds must not count
    moved = other.clone()
    moved[:, :, 0] = 100.0
    torch.testing.assert_close(optimized_scale(cond, moved, where), optimized_scale(cond[:, :, 1:], other[:, :, 1:]))


def test_cfg_zero_star_does_not_push_away_from_an_uncond_prediction_parallel_to_cond():
    """A model whose unconditional velocity is its conditional one times a per-sample factor: plain CFG
    scales the velocity by k + w (1 - k), CFG-Zero* leaves nothing to guide away from and samples exactly as
    the conditional model alone, at any scale; with an image condition, whatever the model predicts at the
    conditioned frame does not enter s*."""
    text, text_mask = _text()
    neg_text, neg_mask = _text(seed=1)
    neg_text = neg_text + torch.tensor([1.0, -2.0]).view(B, 1, 1)  # a different factor in each sample

    def model(x, t, text, text_mask):
        pooled = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)  # (B, Dt)
        factor = 1.0 + pooled.mean(1).abs().reshape(-1, 1, 1, 1, 1)  # the prompt sets the scale
        return factor * (0.9 * x + 0.001 * t.float().reshape(t.shape[0], -1).mean(1).reshape(-1, 1, 1, 1, 1))

    options = dict(process=FlowMatching(shift=2.0), sampler="euler", steps=4, text=text, text_mask=text_mask,
                   neg_text=neg_text, neg_mask=neg_mask, progress=False)
    alone = sample(model, _noise(), **{**options, "guidance_scale": 1.0})
    for scale in (3.0, 7.0):
        zero_star = sample(model, _noise(), guidance_scale=scale, cfg_zero_star=True, **options)
        torch.testing.assert_close(zero_star, alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(sample(model, _noise(), guidance_scale=scale, **options), alone, atol=1e-3)
    def conditioned_model(x, t, text, text_mask):
        """The same, plus a prompt-dependent term on the first latent frame alone, so the two predictions are
        parallel only where the sample is generated."""
        pooled = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)  # (B, Dt)
        first = torch.zeros_like(x)
        first[:, :, 0] = 5.0 * pooled.mean(1).reshape(-1, 1, 1, 1)
        return model(x, t, text, text_mask) + first

    condition = image_to_video(_noise(seed=3)[:, :, :1], latent_frames=T)
    i2v = dict(options, cond_latents=condition.latents, cond_mask=condition.mask)
    torch.testing.assert_close(sample(conditioned_model, _noise(), guidance_scale=5.0, cfg_zero_star=True, **i2v),
                               sample(conditioned_model, _noise(), **{**i2v, "guidance_scale": 1.0}),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    same = dict(options, neg_text=text, neg_mask=text_mask)  # cond == uncond: s* = 1, plain CFG
    torch.testing.assert_close(sample(model, _noise(), guidance_scale=3.0, cfg_zero_star=True, **same),
                               sample(model, _noise(), guidance_scale=3.0, **same))


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_a"])
def test_zero_init_steps_leave_the_noise_as_it_is_and_then_sample_from_it(sampler):
    """The first n steps keep x bit-identical to the noise and call no model (one that is not self-
    conditioned); the run goes on from there. n counts the full grid, v2v's skipped steps included."""
    text, text_mask = _text()
    calls, states = [], []

    def model(x, t, text, text_mask):
        calls.append(float(t.flatten()[0]))
        return _toy_model(x, t, text, text_mask)

    def run(**extra):
        calls.clear()
        states.clear()
        out = sample(model, _noise(), process=FlowMatching(shift=2.0), sampler=sampler, steps=4, text=text,
                     text_mask=text_mask, generator=torch.Generator().manual_seed(0), progress=False,
                     callback=lambda index, t, x: states.append((t, x.clone())), **extra)  # fmt: skip
        return out, list(calls), list(states)

    grid = time_grid(FlowMatching(shift=2.0), 4)
    plain, plain_calls, _ = run()
    zeroed, zeroed_calls, zeroed_states = run(zero_init_steps=2)
    assert [t for t, _ in zeroed_states] == grid[:4]
    assert all(torch.equal(x, _noise()) for _, x in zeroed_states[:2])
    assert not torch.equal(zeroed_states[2][1], _noise())
    assert min(zeroed_calls) <= grid[2] < grid[1] < max(plain_calls)  # no call at steps 0 and 1
    assert not torch.allclose(zeroed, plain)
    _, v2v_calls, _ = run(init_latents=_noise(seed=5), strength=0.5, zero_init_steps=2)
    _, v2v_plain, _ = run(init_latents=_noise(seed=5), strength=0.5)
    assert v2v_calls == v2v_plain  # the run starts at step 2: nothing left to zero


def test_zero_init_steps_keep_a_self_conditioned_models_estimate_and_refuse_what_cannot_work():
    """A zeroed step still calls a self-conditioned model (x unchanged), so the next step reads a real
    estimate rather than zeros. DDPM samplers have no zero-velocity step, and n must leave steps to run."""
    text, text_mask = _text()
    seen = []

    def model(x, t, text, text_mask, x0_prev):
        seen.append((x.clone(), x0_prev.clone()))
        return _toy_model(x, t, text, text_mask) + 0.1 * x0_prev

    sample(model, _noise(), process=FlowMatching(), sampler="euler", steps=3, text=text, text_mask=text_mask,
           progress=False, self_cond=True, zero_init_steps=1)  # fmt: skip
    assert len(seen) == 3
    assert torch.equal(seen[0][0], _noise()) and torch.equal(seen[1][0], _noise())  # step 0 left x as it was
    assert not seen[0][1].any() and seen[1][1].abs().sum() > 0  # step 1 reads step 0's estimate
    options = dict(text=text, text_mask=text_mask, progress=False)
    with pytest.raises(ValueError, match="zero_init_steps=1: a zero-velocity step needs a flow sampler"):
        sample(_toy_model, _noise(), process=DDPM(), sampler="ddim", steps=3, zero_init_steps=1, **options)
    with pytest.raises(ValueError, match="zero_init_steps=3: must be below steps=3"):
        sample(_toy_model, _noise(), process=FlowMatching(), sampler="euler", steps=3, zero_init_steps=3, **options)
    with pytest.raises(ValueError, match="zero_init_steps=-1: must be >= 0"):
        SamplerConfig(zero_init_steps=-1)
    with pytest.raises(ValueError, match="needs a flow sampler"):
        SamplerConfig.from_preset("ddim", zero_init_steps=1)
