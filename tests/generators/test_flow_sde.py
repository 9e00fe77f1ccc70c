"""Unit tests for the pure flow-matching SDE step (visalign.generators.flow_sde, docs/methods.md#flow-sde)."""

from __future__ import annotations

import math

import pytest
import torch

from visalign.generators.flow_sde import sde_step


def _inputs(shape=(3, 4, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("mode", ["flowgrpo", "dance", "cps"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 4, 3, 5, 6)])
def test_noise_level_zero_is_the_euler_step(mode, shape):
    v, x = _inputs(shape)
    s, s_next = torch.tensor([0.9, 0.5, 0.3][: shape[0]]), torch.tensor([0.7, 0.4, 0.1][: shape[0]])
    out = sde_step(v, s, s_next, x, noise_level=0.0, mode=mode)
    ds = (s_next - s).view(-1, *([1] * (len(shape) - 1)))
    torch.testing.assert_close(out.prev_sample, x + v * ds, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.mean, x + v * ds, rtol=0, atol=1e-6)
    assert torch.all(out.std == 0)
    assert torch.all(torch.isnan(out.logp_mean))  # a point mass has no density: not a trainable step


@pytest.mark.parametrize("mode", ["flowgrpo", "dance", "cps"])
def test_samples_have_mean_mu_and_variance_std_squared(mode):
    v, x = _inputs((1, 2, 3, 3))
    n = 20000
    v, x = v.expand(n, -1, -1, -1), x.expand(n, -1, -1, -1)
    out = sde_step(v, 0.6, 0.45, x, noise_level=0.7, mode=mode, generator=torch.Generator().manual_seed(1))
    std = out.std[0].item()
    assert std > 0
    emp_mean = out.prev_sample.mean(0)
    emp_var = out.prev_sample.var(0)
    # Standard error of the mean is std/sqrt(n); 5 SE is far beyond chance but catches a wrong mu.
    assert (emp_mean - out.mean[0]).abs().max() < 5 * std / math.sqrt(n)
    assert ((emp_var / std**2) - 1).abs().max() < 0.06
    # E[logp_elem] = −0.5 − log std − 0.5·log 2π (docs/methods.md#ddim-logprob statistical test).
    expected = -0.5 - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert abs(out.logp_mean.mean().item() - expected) < 0.02


def _gauss_logpdf(y, mu, std):
    return -((y - mu) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)


def test_flowgrpo_logp_equals_hand_written_gaussian_density():
    v, x = _inputs((2, 3, 4, 4))
    y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    s, s_next, a = 0.8, 0.6, 0.7
    out = sde_step(v, s, s_next, x, noise_level=a, prev_sample=y, mode="flowgrpo")
    ds = s_next - s
    g = a * math.sqrt(s / (1 - s))
    mu = x * (1 + g**2 * ds / (2 * s)) + v * (1 + g**2 * (1 - s) / (2 * s)) * ds  # flow_grpo's written form
    std = g * math.sqrt(-ds)
    elem = _gauss_logpdf(y, mu, std)
    torch.testing.assert_close(out.mean, mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logp_mean, elem.mean((1, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logp_sum, elem.sum((1, 2, 3)), rtol=1e-5, atol=1e-3)
    assert torch.equal(out.prev_sample, y)  # replay never resamples


def test_dance_and_cps_densities():
    v, x = _inputs((2, 3, 4, 4))
    y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    s, s_next, eta = 0.7, 0.5, 0.3
    dance = sde_step(v, s, s_next, x, noise_level=eta, prev_sample=y, mode="dance")
    x0 = x - s * v
    mu = x + (v + 0.5 * eta**2 * (x - (1 - s) * x0) / s**2) * (s_next - s)
    torch.testing.assert_close(dance.logp_mean, _gauss_logpdf(y, mu, eta * math.sqrt(s - s_next)).mean((1, 2, 3)))

    a = 0.5
    std_c = s_next * math.sin(a * math.pi / 2)
    mu_c = (1 - s_next) * x0 + math.sqrt(s_next**2 - std_c**2) * (x + (1 - s) * v)
    cps = sde_step(v, s, s_next, x, noise_level=a, prev_sample=y, mode="cps")
    torch.testing.assert_close(cps.logp_mean, _gauss_logpdf(y, mu_c, std_c).mean((1, 2, 3)))
    compat = sde_step(v, s, s_next, x, noise_level=a, prev_sample=y, mode="cps", logp_mode="flowgrpo_compat")
    torch.testing.assert_close(compat.logp_mean, (-((y - mu_c) ** 2)).mean((1, 2, 3)))


def test_gradient_flows_through_mu_not_the_sample():
    v, x = _inputs((2, 3, 4, 4))
    v.requires_grad_(True)
    first = sde_step(v, 0.8, 0.6, x, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert first.prev_sample.grad_fn is not None  # the fresh sample depends on v ...
    replay = sde_step(v, 0.8, 0.6, x, noise_level=0.7, prev_sample=first.prev_sample)
    (grad,) = torch.autograd.grad(replay.logp_mean.sum(), v)
    # ... but at the on-policy point d logp / d mu = (y − mu)/std² and y is detached, so the gradient is
    # exactly the score term, not zero as it would be if the sample were differentiated through.
    assert grad.abs().sum() > 0
    torch.testing.assert_close(replay.logp_mean, first.logp_mean)


def test_bf16_inputs_are_computed_in_fp32_and_storage_round_trip_is_replayable():
    v, x = _inputs((2, 3, 4, 4))
    out = sde_step(v.bfloat16(), 0.8, 0.6, x.bfloat16(), noise_level=0.7, storage_dtype=torch.bfloat16,
                   generator=torch.Generator().manual_seed(0))
    assert out.mean.dtype == torch.float32 and out.logp_mean.dtype == torch.float32
    assert torch.equal(out.prev_sample, out.prev_sample.bfloat16().float())  # already on the bf16 grid
    replay = sde_step(v.bfloat16(), 0.8, 0.6, x.bfloat16(), noise_level=0.7, prev_sample=out.prev_sample.bfloat16())
    assert torch.equal(replay.logp_mean, out.logp_mean)


def test_per_sample_generators_give_per_sample_noise():
    v, x = _inputs((2, 3, 4, 4))
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    both = sde_step(v, 0.8, 0.6, x, 0.7, generator=gens)
    alone = sde_step(v[1:], 0.8, 0.6, x[1:], 0.7, generator=[torch.Generator().manual_seed(12)])
    torch.testing.assert_close(both.prev_sample[1:], alone.prev_sample)


def test_explicit_noise_is_used_as_is():
    v, x = _inputs((2, 3, 4, 4))
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    out = sde_step(v, 0.8, 0.6, x, 0.7, noise=z)
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * z)


def test_singular_start_and_bad_arguments_raise():
    v, x = _inputs((2, 3, 4, 4))
    with pytest.raises(ValueError, match="sigma_at_one"):
        sde_step(v, 1.0, 0.9, x, noise_level=0.7)
    out = sde_step(v, 1.0, 0.9, x, noise_level=0.7, sigma_at_one=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.logp_mean).all()
    ode = sde_step(v, 1.0, 0.9, x, noise_level=0.0)  # the ODE needs no sigma_at_one and must stay finite at s = 1
    torch.testing.assert_close(ode.prev_sample, x - 0.1 * v, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        sde_step(v, 0.8, 0.6, x, 0.7, mode="ode")
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(v, 0.8, 0.6, x, -0.1)
