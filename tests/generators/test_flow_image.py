"""SD3 and FLUX adapters on tiny random-init pipelines loaded through ``from_pretrained`` (no network).

What is particular to the flow-matching image families: media and latent shapes, per-sample seeds, the one-step x0
estimate of the last Euler step, SDE windows and denoising reduction, bf16 replay, bad input. Ratio 1, stock parity
and the LoRA round trip are checked for every family in test_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.generators import flow_fixtures
from tests.generators.flow_fixtures import build_flux, build_sd3
from visalign.generators import (
    LoraSpec,
    UnsupportedPipelineError,
    generator_class,
    load_generator,
    select_train_steps,
)

PROMPTS = ["a red cube", "two blue circles"]
SIZE = {"height": 16, "width": 16}
SEQ_LEN = 16  # T5 tokens; the stock pipeline is called with the same value
BUILDERS = {"sd3": build_sd3, "flux": build_flux}
flow_dir = flow_fixtures.flow_dir  # the session fixture, shared with the other flow test modules


def _load(name, flow_dir):
    gen = load_generator(BUILDERS[name](flow_dir))
    gen.max_sequence_length = SEQ_LEN
    return gen


@pytest.fixture(scope="module", params=["sd3", "flux"])
def family(request, flow_dir):
    return request.param, _load(request.param, flow_dir)


def test_rollout_shapes_range_and_finite_log_probs(family):
    name, gen = family
    r = gen.rollout(PROMPTS, images_per_prompt=2, steps=3, guidance=4.0, eta=0.7, seed=3, **SIZE)
    assert r.media.shape == (4, 3, 16, 16) and r.media.dtype == torch.float32
    assert r.media.min() >= 0 and r.media.max() <= 1
    assert r.latents.shape[:2] == (4, 4) and r.log_probs.shape == (4, 3) == r.log_probs_sum.shape
    assert torch.isfinite(r.log_probs).all() and torch.isfinite(r.log_probs_sum).all()
    assert r.prompts == ["a red cube", "a red cube", "two blue circles", "two blue circles"]
    # Each sample depends on its own seed only: the same seed in a different batch gives the same trajectory.
    alone = gen.rollout(["two blue circles"], steps=3, guidance=4.0, eta=0.7, seed=r.seeds[2], **SIZE)
    torch.testing.assert_close(alone.latents[0], r.latents[2], rtol=0, atol=1e-5)



def test_last_euler_step_lands_on_the_x0_estimate(family):
    name, gen = family
    ours = gen.rollout(PROMPTS, steps=4, guidance=3.5, eta=0.0, seed=11, **SIZE)
    # The one-step x0 estimate (ReFL decodes it): the last Euler step goes to σ = 0, so it lands exactly on x0.
    last = gen.recompute_step(ours, ours.num_steps - 1)
    torch.testing.assert_close(last.x0, ours.latents[:, -1].float(), atol=1e-5, rtol=0)


def test_sde_window_and_denoising_reduction(family):
    name, gen = family
    gen.configure_sde(window=(1, 3))
    try:
        r = gen.rollout(PROMPTS, steps=4, guidance=4.0, eta=0.8, seed=5, **SIZE)
    finally:
        gen.configure_sde(window=None)
    assert torch.isnan(r.log_probs[:, [0, 3]]).all() and torch.isfinite(r.log_probs[:, 1:3]).all()
    window = select_train_steps(r.num_steps, window=(1, 3))
    assert (gen.step_log_prob(r, window) - r.log_probs[:, 1:3]).abs().max() < 1e-4
    # Outside the window the step is the Euler ODE step: x' = x + v·ds, so sampling there used no noise.
    ode = gen.rollout(PROMPTS, steps=4, guidance=4.0, eta=0.0, seed=5, **SIZE)
    torch.testing.assert_close(r.latents[:, 1], ode.latents[:, 1], rtol=0, atol=1e-6)
    # Denoising reduction: train on a 2-step SDE rollout, evaluate the 4-step ODE; both use the scheduler's sigmas.
    short = gen.rollout(PROMPTS, steps=2, guidance=4.0, eta=0.8, seed=5, **SIZE)
    assert short.schedule["sigmas"].shape == (3,) and ode.schedule["sigmas"].shape == (5,)
    assert (gen.step_log_prob(short, [0, 1]) - short.log_probs).abs().max() < 1e-4



def test_bad_inputs_raise_clear_errors(flow_dir):
    gen = _load("sd3", flow_dir)
    with pytest.raises(ValueError, match="empty"):
        gen.rollout([], steps=2, **SIZE)
    with pytest.raises(ValueError, match="height=17"):  # tiny SD3: VAE factor 2
        gen.rollout(PROMPTS, steps=2, height=17, width=16)
    with pytest.raises(ValueError, match="SDE window"):
        gen.configure_sde(window=(0, 9)).rollout(PROMPTS, steps=2, **SIZE)
    gen.configure_sde(window=None)
    with pytest.raises(ValueError, match="mode"):
        gen.configure_sde(mode="ode")
    flux = _load("flux", flow_dir)
    with pytest.raises(ValueError, match="divisible by 4"):
        flux.rollout(PROMPTS, steps=2, height=18, width=16)
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusion3Pipeline"):
        generator_class("KandinskyPipeline")


def test_bf16_rollout_replays_exactly_and_checkpointing_keeps_gradients(flow_dir):
    # bf16: the sampled latents are rounded to bf16 before they are scored (docs/methods.md#flow-sde "dtype
    # round-trip"), so the replay sees the very same values and the ratio stays 1 although the step arithmetic runs in
    # fp32.
    gen = load_generator(build_sd3(flow_dir), dtype="bf16")
    gen.max_sequence_length = SEQ_LEN
    gen.add_lora()
    r = gen.rollout(PROMPTS, steps=2, guidance=4.0, eta=0.7, seed=0, **SIZE)
    assert r.latents.dtype == torch.bfloat16 and r.log_probs.dtype == torch.float32
    assert (gen.step_log_prob(r, [0, 1]) - r.log_probs).abs().max() < 1e-4

    gen = _load("sd3", flow_dir)
    params = gen.add_lora(LoraSpec(rank=2, alpha=2.0, init=True))
    torch.nn.init.normal_(next(p for n, p in gen.denoiser.named_parameters() if "lora_B" in n), std=0.1)
    r = gen.rollout(PROMPTS, steps=2, guidance=4.0, eta=0.7, seed=0, **SIZE)
    plain = torch.autograd.grad(gen.step_log_prob(r, [0, 1]).sum(), params)
    gen.set_gradient_checkpointing(True)
    checkpointed = torch.autograd.grad(gen.step_log_prob(r, [0, 1]).sum(), params)
    assert sum(g.abs().sum() for g in plain) > 0
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
