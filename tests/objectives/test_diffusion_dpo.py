"""Diffusion-DPO and λ-Harmonic RPO on offline pairs: log 2 at the reference, a gradient that favours the chosen
sample, RPO's relation to DPO, and the SFT term."""

from __future__ import annotations

import math

import pytest
import torch

from tests.objectives.conftest import GradRecorder, make_context
from visalign.generators import LoraSpec, load_generator
from visalign.objectives.base import PairBatch, build_objective
from visalign.objectives.rpo_harmonic import rpo_preference_loss


@pytest.fixture(scope="module")
def adapter(bright_sd_path):
    adapter = load_generator(bright_sd_path)
    adapter.add_lora(LoraSpec(rank=4, alpha=4.0))  # zero B: θ = base exactly until a step moves it
    return adapter


@pytest.fixture(scope="module")
def pairs(adapter) -> PairBatch:
    """Three pairs: chosen = bright images, rejected = dark images, encoded by the tiny VAE, prompts encoded without
    CFG (as the pairs source does)."""
    g = torch.Generator().manual_seed(0)
    chosen = (0.7 + 0.2 * torch.rand(3, 3, 32, 32, generator=g)).clamp(0, 1)
    rejected = 0.2 * torch.rand(3, 3, 32, 32, generator=g)
    prompts = ["a red cube", "two blue circles", "a green star"]
    with torch.no_grad():
        condition = adapter.encode_condition(prompts, [""] * 3, 1.0, height=32, width=32)
        return PairBatch(prompts=prompts, condition=condition, chosen=adapter.encode_media(chosen),
                         rejected=adapter.encode_media(rejected), weights=torch.ones(3))


def named(adapter):
    return {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}


def _loss_at(adapter, batch, objective, params, seed=0):
    recorder = GradRecorder(named(adapter))
    metrics = build_objective(objective, params).update(batch, make_context(adapter, [], recorder, seed=seed))
    return metrics, recorder


def test_loss_is_log2_at_init_and_the_gradient_is_nonzero(adapter, pairs):
    metrics, recorder = _loss_at(adapter, pairs, "diffusion-dpo", {"beta": 5000.0})
    assert metrics["pairs"] == 3 and metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["implicit_acc"] == 0.0  # inside = 0 exactly: no pair is "right" yet
    lora_b = [g for n, g in recorder.grads[0].items() if "lora_B" in n]
    assert lora_b and any(float(g.abs().sum()) > 0 for g in lora_b)


def _mse_gap(adapter, batch, t, eps):
    """ℓ(x_w) − ℓ(x_l) of the current weights at fixed draws (lower = the chosen sample denoised better)."""
    with torch.no_grad():
        w = adapter.denoising_loss(batch.chosen, batch.condition, timesteps=t, noise=eps).loss
        lo = adapter.denoising_loss(batch.rejected, batch.condition, timesteps=t, noise=eps).loss
    return float((w - lo).mean())


def test_a_step_along_the_gradient_favours_the_chosen_sample(adapter, pairs):
    """One SGD step on the DPO loss lowers ℓ_θ(x_w) − ℓ_θ(x_l) (the chosen sample's denoising error falls relative
    to the rejected one's), measured at the draws of the update; the opposite step raises it."""
    params = named(adapter)
    _, recorder = _loss_at(adapter, pairs, "diffusion-dpo", {"beta": 5000.0}, seed=1)
    g = torch.Generator().manual_seed(1)  # the same (t, ε) the update drew first
    draw = adapter.denoising_loss(pairs.chosen, pairs.condition, generator=g)
    before = _mse_gap(adapter, pairs, draw.timesteps, draw.noise)
    grads = recorder.grads[0]
    lr = 1e-2 / max(float(torch.sqrt(sum((x.double() ** 2).sum() for x in grads.values()))), 1e-12)
    gaps = {}
    for sign in (-1.0, 1.0):
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(sign * lr * grads[n])
        gaps[sign] = _mse_gap(adapter, pairs, draw.timesteps, draw.noise)
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * lr * grads[n])
    assert gaps[1.0] < before < gaps[-1.0]


def test_rpo_with_sure_labels_and_no_reconstruction_is_dpo_at_twice_beta(adapter, pairs):
    dpo, dpo_grads = _loss_at(adapter, pairs, "diffusion-dpo", {"beta": 2.0}, seed=3)
    rpo, rpo_grads = _loss_at(adapter, pairs, "rpo-harmonic", {"beta": 1.0, "reconstruction_weight": 0.0}, seed=3)
    # Same (t, ε): the first draws of both come from the same seeded generator; RPO then draws its labels (all 1).
    assert rpo["label_fraction"] == 1.0 and rpo["loss"] == pytest.approx(dpo["loss"], abs=1e-6)
    for name, grad in dpo_grads.grads[0].items():
        torch.testing.assert_close(rpo_grads.grads[0][name], grad, rtol=1e-4, atol=1e-9)


def test_rpo_labels_follow_the_preference_and_the_reconstruction_term_adds_the_chosen_mse(adapter, pairs):
    soft = PairBatch(prompts=pairs.prompts, condition=pairs.condition, chosen=pairs.chosen, rejected=pairs.rejected,
                     weights=torch.ones(3), preference=torch.zeros(3))
    rpo, _ = _loss_at(adapter, soft, "rpo-harmonic", {"beta": 1.0, "reconstruction_weight": 0.0})
    assert rpo["label_fraction"] == 0.0
    # At θ = ref, Δ = 0: the preference term is log 2 whatever the labels; the reconstruction adds mean ℓ_θ(x_w).
    with_rec, _ = _loss_at(adapter, pairs, "rpo-harmonic", {"beta": 1.0, "reconstruction_weight": 1.0})
    assert with_rec["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert with_rec["loss"] == pytest.approx(math.log(2) + with_rec["similar_loss"], abs=1e-6)
    assert with_rec["similar_loss"] > 0


def test_rpo_preference_loss_table():
    delta = torch.tensor([0.0, 2.0, -2.0])
    ones = rpo_preference_loss(delta, torch.ones(3), beta=1.0)
    zeros = rpo_preference_loss(delta, torch.zeros(3), beta=1.0)
    torch.testing.assert_close(ones, torch.nn.functional.softplus(-delta))
    torch.testing.assert_close(zeros, torch.nn.functional.softplus(delta))


def test_sft_term_adds_the_weighted_chosen_mse(adapter, pairs):
    plain, _ = _loss_at(adapter, pairs, "diffusion-dpo", {"beta": 5000.0}, seed=4)
    with_sft, _ = _loss_at(adapter, pairs, "diffusion-dpo", {"beta": 5000.0, "sft_weight": 0.5}, seed=4)
    assert with_sft["loss"] == pytest.approx(plain["loss"] + 0.5 * with_sft["sft_loss"], abs=1e-6)


@pytest.mark.parametrize(("params", "match"), [({"beta": 0.0}, "beta > 0"), ({"reference": "ref"}, "reference"),
                                               ({"sft_weight": -1.0}, "sft_weight")])
def test_bad_params_are_refused(params, match):
    with pytest.raises(Exception, match=match):
        build_objective("diffusion-dpo", params)
