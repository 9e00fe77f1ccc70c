"""``GeneratorAdapter.denoising_loss``: the per-sample pre-training loss used by Diffusion-DPO, DRAGON and RAFT.

Checked on tiny random-init pipelines loaded through ``from_pretrained``: equality with a hand computation that
calls the scheduler and the denoiser directly (SD: DDPM ε-prediction; SD3: rectified flow), exact reproducibility
from the returned (t, ε), gradients reaching LoRA only, condition subsets, the training noise-level distributions,
5-D video latents, and bad inputs.
"""

from __future__ import annotations

import pytest
import torch

from tests.generators import flow_fixtures
from tests.generators.conftest import build_text_to_video
from tests.generators.flow_fixtures import build_sd3
from visalign.generators import DenoisingLoss, LoraSpec, load_generator

flow_dir = flow_fixtures.flow_dir
PROMPTS = ["a red cube", "two blue circles", "a green cat"]


def _condition(gen, prompts, height, width):
    with torch.no_grad():
        return gen.encode_condition(prompts, [""] * len(prompts), 1.0, height=height, width=width)


@pytest.fixture(scope="module")
def sd(sd_path):
    return load_generator(sd_path)


@pytest.fixture(scope="module")
def sd3(flow_dir):
    gen = load_generator(build_sd3(flow_dir))
    gen.max_sequence_length = 16
    return gen


def test_sd_loss_equals_ddpm_epsilon_loss_computed_by_hand(sd):
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 16, 16)
    cond = _condition(sd, PROMPTS, 32, 32)
    out = sd.denoising_loss(x0, cond, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, DenoisingLoss)
    assert out.loss.shape == (3,) and out.loss.dtype == torch.float32
    assert out.timesteps.dtype == torch.long and out.noise.shape == x0.shape
    assert 0 <= int(out.timesteps.min()) and int(out.timesteps.max()) < 1000
    with torch.no_grad():
        noisy = sd.pipeline.scheduler.add_noise(x0, out.noise, out.timesteps)
        pred = sd.pipeline.unet(noisy, out.timesteps, encoder_hidden_states=cond.embeds).sample
        expected = ((pred - out.noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_sd3_loss_equals_flow_matching_loss_computed_by_hand(sd3):
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8)
    cond = _condition(sd3, PROMPTS[:2], 16, 16)
    s = torch.tensor([0.3, 0.85])
    eps = torch.randn_like(x0)
    with torch.no_grad():
        out = sd3.denoising_loss(x0, cond, timesteps=s, noise=eps)
        x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        pred = sd3.pipeline.transformer(hidden_states=x_s, timestep=s * 1000, encoder_hidden_states=cond.embeds,
                                        pooled_projections=cond.extras["pooled_projections"]).sample
        expected = ((pred - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.timesteps, s)


def test_given_timesteps_and_noise_reproduce_the_value_and_condition_select_matches(sd, sd3):
    for gen, x0, size in ((sd, torch.randn(3, 4, 16, 16), 32), (sd3, torch.randn(3, 4, 8, 8), 16)):
        cond = _condition(gen, PROMPTS, size, size)
        with torch.no_grad():
            first = gen.denoising_loss(x0, cond, generator=torch.Generator().manual_seed(5))
            again = gen.denoising_loss(x0, cond, timesteps=first.timesteps, noise=first.noise)
            reseeded = gen.denoising_loss(x0, cond, generator=torch.Generator().manual_seed(5))
            other = gen.denoising_loss(x0, cond, generator=torch.Generator().manual_seed(6))
            subset = gen.denoising_loss(x0[[2, 0]], cond.select([2, 0]), timesteps=first.timesteps[[2, 0]],
                                        noise=first.noise[[2, 0]])
        assert torch.equal(again.loss, first.loss) and torch.equal(reseeded.loss, first.loss)
        assert not torch.allclose(other.loss, first.loss)
        torch.testing.assert_close(subset.loss, first.loss[[2, 0]], rtol=1e-5, atol=1e-6)


def test_per_sample_generators_make_each_draw_independent_of_the_batch(sd3):
    x0 = torch.randn(2, 4, 8, 8)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    with torch.no_grad():
        both = sd3.denoising_loss(x0, _condition(sd3, PROMPTS[:2], 16, 16), generator=gens)
        alone = sd3.denoising_loss(x0[1:], _condition(sd3, PROMPTS[1:2], 16, 16),
                                   generator=[torch.Generator().manual_seed(11)])
    assert torch.equal(alone.noise[0], both.noise[1]) and torch.equal(alone.timesteps[0], both.timesteps[1])


def test_training_noise_levels_follow_the_documented_distributions(sd, sd3):
    g = torch.Generator().manual_seed(0)
    t = sd.training_timesteps(torch.zeros(4000, 1), g)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    assert abs(t.float().mean().item() - 499.5) < 20  # uniform over the 1000 training timesteps
    s = sd3.training_timesteps(torch.zeros(4000, 4, 8, 8), g)
    # logit-normal u has median 1/2; SD3's static shift 3 maps it to 3·0.5 / (1 + 2·0.5) = 0.75.
    assert abs(s.median().item() - 0.75) < 0.03 and 0 < s.min() and s.max() < 1


def test_gradient_reaches_lora_only_and_the_disabled_reference_differs(sd_path):
    gen = load_generator(sd_path)
    gen.add_lora(LoraSpec(rank=2, alpha=2.0))
    x0 = torch.randn(2, 4, 16, 16)
    cond = _condition(gen, PROMPTS[:2], 32, 32)
    out = gen.denoising_loss(x0, cond, generator=torch.Generator().manual_seed(0))
    out.loss.sum().backward()
    named = dict(gen.denoiser.named_parameters())
    lora = [p for n, p in named.items() if "lora_" in n]
    # With B = 0 at init only B receives a non-zero gradient; A's gradient exists but is 0.
    assert lora and all(p.grad is not None for p in lora)
    assert all(p.grad.abs().sum() > 0 for n, p in named.items() if "lora_B" in n)
    assert all(p.grad is None for m in gen.modules().values() for p in m.parameters() if not p.requires_grad)
    with torch.no_grad(), gen.lora_disabled():
        ref = gen.denoising_loss(x0, cond, timesteps=out.timesteps, noise=out.noise)
    # "gaussian" LoRA init has B = 0: the adapted model equals the reference until it is trained.
    torch.testing.assert_close(ref.loss, out.loss.detach(), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
        moved = gen.denoising_loss(x0, cond, timesteps=out.timesteps, noise=out.noise)
        with gen.lora_disabled():
            ref_again = gen.denoising_loss(x0, cond, timesteps=out.timesteps, noise=out.noise)
    assert not torch.allclose(moved.loss, ref.loss)
    torch.testing.assert_close(ref_again.loss, ref.loss, rtol=0, atol=0)


def test_video_latents_are_5d_and_the_loss_is_per_sample(unet_dir):
    gen = load_generator(build_text_to_video(unet_dir / "t2v"))
    x0 = torch.randn(2, 4, 3, 16, 16)  # [B, C, F, h, w]
    cond = _condition(gen, PROMPTS[:2], 32, 32)
    with torch.no_grad():
        out = gen.denoising_loss(x0, cond, generator=torch.Generator().manual_seed(0))
        single = gen.denoising_loss(x0[:1], cond.select([0]), timesteps=out.timesteps[:1], noise=out.noise[:1])
    assert out.loss.shape == (2,) and out.noise.shape == x0.shape and torch.isfinite(out.loss).all()
    torch.testing.assert_close(single.loss, out.loss[:1], rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_fix(sd, sd3):
    x0 = torch.randn(2, 4, 16, 16)
    cond = _condition(sd, PROMPTS[:2], 32, 32)
    with pytest.raises(ValueError, match="condition.select"):
        sd.denoising_loss(x0, cond.select([0]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        sd.denoising_loss(x0, cond, timesteps=torch.tensor([10, 1000]))
    with pytest.raises(ValueError, match="shape"):
        sd.denoising_loss(x0, cond, noise=torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="one per sample"):
        sd.denoising_loss(x0, cond, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="not scheduler timesteps"):
        sd3.denoising_loss(torch.randn(2, 4, 8, 8), _condition(sd3, PROMPTS[:2], 16, 16),
                           timesteps=torch.tensor([500.0, 900.0]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_x0_estimate_maps_the_target_to_x0_and_matches_the_ddim_scheduler(prediction_type):
    """The conversion the forward-process objectives (nft) use: the training target is mapped back to x0 exactly,
    and an arbitrary output gives the DDIM scheduler's own ``pred_original_sample``."""
    from diffusers import DDIMScheduler

    from visalign.generators.denoising_loss import ddpm_noised_and_target, ddpm_x0_from_prediction

    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=False)
    torch.manual_seed(0)
    x0, noise, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 480, 930])
    noisy, target = ddpm_noised_and_target(x0, noise, t, scheduler.alphas_cumprod, prediction_type)
    recovered = ddpm_x0_from_prediction(noisy, target, t, scheduler.alphas_cumprod, prediction_type)
    torch.testing.assert_close(recovered, x0, rtol=1e-4, atol=1e-4)
    scheduler.set_timesteps(20)
    for i, step in enumerate(t.tolist()):
        expected = scheduler.step(out[i:i + 1], step, noisy[i:i + 1]).pred_original_sample
        got = ddpm_x0_from_prediction(noisy[i:i + 1], out[i:i + 1], t[i:i + 1], scheduler.alphas_cumprod,
                                      prediction_type)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_adapters_convert_their_own_predictions_to_x0_and_report_sampling_levels(sd, sd3):
    """SD (DDPM ε) and SD3 (flow v): ``x0_from_prediction`` of the target at ``noise_latents``' input is x0; of the
    denoiser's output it is the sampler's one-step estimate; ``step_noise_levels`` are the rollout's own levels."""
    for gen, x0, size in ((sd, torch.randn(2, 4, 16, 16), 32), (sd3, torch.randn(2, 4, 8, 8), 16)):
        cond = _condition(gen, PROMPTS[:2], size, size)
        noised = gen.noise_latents(x0, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(gen.x0_from_prediction(noised.noisy, noised.target, noised.timesteps), x0,
                                   rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            loss = gen.denoising_loss(x0, cond, timesteps=noised.timesteps, noise=noised.noise)
            pred = gen.training_prediction(noised, cond)
        torch.testing.assert_close(loss.loss, ((pred.float() - noised.target) ** 2).flatten(1).mean(1))
    rollout = sd.rollout(PROMPTS[:1], steps=4, guidance=1.0, eta=1.0, seed=0)
    assert torch.equal(sd.step_noise_levels(rollout), rollout.timesteps.long())
    step = sd.recompute_step(rollout, 1)
    with torch.no_grad():
        pred = sd.denoise(rollout.latents[:, 1], rollout.timesteps[1], rollout.condition, 1.0)
    level = sd.step_noise_levels(rollout)[1:2]
    torch.testing.assert_close(sd.x0_from_prediction(rollout.latents[:, 1], pred, level), step.x0, rtol=1e-4,
                               atol=1e-4)
    flow = sd3.rollout(PROMPTS[:1], steps=3, guidance=1.0, eta=0.0, seed=0, height=16, width=16)
    torch.testing.assert_close(sd3.step_noise_levels(flow), flow.schedule["sigmas"][:-1])
    assert float(sd3.step_noise_levels(flow)[0]) > float(sd3.step_noise_levels(flow)[-1]) > 0
