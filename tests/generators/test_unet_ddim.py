"""The pure DDIM step with log-prob against diffusers' DDIMScheduler and against its own Gaussian
(docs/methods.md#ddim-logprob)."""

from __future__ import annotations

import math

import pytest
import torch

from visalign.generators import select_train_steps
from visalign.generators.ddim_logprob import ddim_step_with_logprob


def scheduler(prediction_type: str = "epsilon", **kw):
    from diffusers import DDIMScheduler

    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s = DDIMScheduler(**{**config, **kw})
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("step", [0, 5, 9])  # 9: the last step, where t' < 0 uses final_alpha_cumprod
def test_matches_diffusers_ddim_step(prediction_type, eta, step):
    s = scheduler(prediction_type)
    g = torch.Generator().manual_seed(step)
    sample, output, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = s.timesteps[step]
    reference = s.step(output, t, sample, eta=eta, variance_noise=noise).prev_sample
    ours = ddim_step_with_logprob(output, t, t - 100, sample, s.alphas_cumprod, s.final_alpha_cumprod, eta=eta,
                                  prediction_type=prediction_type, noise=noise)
    torch.testing.assert_close(ours.prev_sample, reference, atol=1e-5, rtol=1e-5)


def test_clip_sample_matches_diffusers():
    s = scheduler(clip_sample=True, clip_sample_range=0.5)
    sample, output, noise = torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = s.timesteps[3]
    reference = s.step(output, t, sample, eta=1.0, variance_noise=noise).prev_sample
    ours = ddim_step_with_logprob(output, t, t - 100, sample, s.alphas_cumprod, s.final_alpha_cumprod, eta=1.0,
                                  clip_sample_range=0.5, noise=noise)
    torch.testing.assert_close(ours.prev_sample, reference, atol=1e-5, rtol=1e-5)


def test_samples_follow_the_gaussian_whose_density_it_reports():
    s = scheduler()
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).expand(4000, -1, -1, -1)
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).expand(4000, -1, -1, -1)
    noise = torch.randn(4000, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = s.timesteps[4]
    out = ddim_step_with_logprob(eps, t, t - 100, x_t, s.alphas_cumprod, s.final_alpha_cumprod, eta=1.0, noise=noise)
    std = out.std.flatten()[0]
    torch.testing.assert_close(out.prev_sample.mean(0), out.mean[0], atol=4 * std.item() / math.sqrt(4000), rtol=0)
    torch.testing.assert_close(out.prev_sample.var(0).mean(), std**2, rtol=0.03, atol=0)
    # E[logp_elem] = −0.5 − log std − 0.5·log 2π  (docs/methods.md#ddim-logprob, statistical test)
    expected = -0.5 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out.log_prob_mean.mean(), expected, atol=0.01, rtol=0)
    assert out.log_prob_sum.shape == (4000,)
    torch.testing.assert_close(out.log_prob_sum, out.log_prob_mean * 256, rtol=1e-5, atol=1e-3)


def test_gradient_flows_through_the_mean_only():
    s = scheduler()
    output = torch.randn(2, 4, 4, 4, requires_grad=True)
    x_t, prev = torch.randn(2, 2, 4, 4, 4)
    prev.requires_grad_(True)
    t = s.timesteps[2]
    out = ddim_step_with_logprob(output, t, t - 100, x_t, s.alphas_cumprod, s.final_alpha_cumprod, eta=1.0,
                                 prev_sample=prev)
    out.log_prob_mean.sum().backward()
    assert output.grad is not None and output.grad.abs().sum() > 0
    assert prev.grad is None  # the sample is a constant in the density


def test_per_sample_timesteps():
    s = scheduler()
    g = torch.Generator().manual_seed(0)
    sample, output, noise = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    t = torch.stack([s.timesteps[1], s.timesteps[6]])
    both = ddim_step_with_logprob(output, t, t - 100, sample, s.alphas_cumprod, s.final_alpha_cumprod, eta=1.0,
                                  noise=noise)
    for i in range(2):
        one = ddim_step_with_logprob(output[i:i + 1], t[i], t[i] - 100, sample[i:i + 1], s.alphas_cumprod,
                                     s.final_alpha_cumprod, eta=1.0, noise=noise[i:i + 1])
        torch.testing.assert_close(both.log_prob_mean[i:i + 1], one.log_prob_mean)


@pytest.mark.parametrize("kwargs, expected", [
    ({}, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ({"fraction": 0.99}, [0, 1, 2, 3, 4, 5, 6, 7, 8]),  # flow_grpo: int(10 · 0.99) = 9, highest noise first
    ({"fraction": 0.25}, [0, 1]),
    ({"window": (3, 5)}, [3, 4]),
])
def test_select_train_steps(kwargs, expected):
    assert select_train_steps(10, **kwargs) == expected


@pytest.mark.parametrize("kwargs, match", [
    ({"fraction": 0.05}, "trains none"),
    ({"fraction": 1.5}, r"\(0, 1\]"),
    ({"window": (4, 11)}, "start < stop"),
    ({"fraction": 0.5, "window": (0, 2)}, "not both"),
])
def test_select_train_steps_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_train_steps(10, **kwargs)
