"""Stable Diffusion adapter: rollout contract, on-policy ratio 1, stock-pipeline parity, LoRA round trip, bad input.

Every pipeline here is a tiny random-init SD built in tests/generators/conftest.py and loaded back through
``load_generator`` (the real ``from_pretrained`` path).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.generators.conftest import stock_images
from visalign.generators import LoraSpec, UnsupportedPipelineError, load_generator, select_train_steps

PROMPTS = ["a red cube", "two blue circles"]


@pytest.fixture(scope="module")
def stock(sd_path):
    """One stock ``StableDiffusionPipeline`` for the module: loading it is a large part of each parity test's cost."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(sd_path):
    return load_generator(sd_path)


@pytest.fixture(scope="module")
def rollout(sd):
    return sd.rollout(PROMPTS, images_per_prompt=2, steps=4, guidance=4.0, eta=1.0, seed=7)


def test_rollout_shapes_ranges_and_bookkeeping(rollout):
    assert rollout.media.shape == (4, 3, 32, 32) and rollout.media.dtype == torch.float32
    assert rollout.media.min() >= 0 and rollout.media.max() <= 1
    assert rollout.latents.shape == (4, 5, 4, 16, 16)
    assert rollout.log_probs.shape == (4, 4) and rollout.log_probs_sum.shape == (4, 4)
    assert torch.isfinite(rollout.log_probs).all() and torch.isfinite(rollout.log_probs_sum).all()
    torch.testing.assert_close(rollout.log_probs_sum, rollout.log_probs * 4 * 16 * 16, rtol=1e-5, atol=1e-3)
    assert rollout.prompts == ["a red cube", "a red cube", "two blue circles", "two blue circles"]
    assert rollout.seeds == [7, 8, 9, 10] and rollout.timesteps.shape == (4,)
    assert rollout.condition.negative_embeds is not None  # CFG on: the unconditional branch is kept for replay



def test_log_prob_is_not_constant_in_the_sample(sd, rollout):
    # Scoring a different x_{t'} must lower the density: a step_log_prob that ignored prev_sample would pass ratio 1.
    shifted = rollout.select(range(len(rollout)))
    shifted.latents = rollout.latents.clone()
    shifted.latents[:, 2] += 0.5
    assert (sd.step_log_prob(shifted, [1]) < rollout.log_probs[:, 1] - 1e-3).all()


def test_per_sample_seed_makes_samples_independent_of_batch(sd, rollout):
    alone = sd.rollout(["two blue circles"], steps=4, guidance=4.0, eta=1.0, seed=9)
    torch.testing.assert_close(alone.latents[0], rollout.latents[2], atol=1e-4, rtol=0)



def test_no_cfg_reproduces_stock_pipeline(sd, stock):
    ours = sd.rollout(PROMPTS[:1], steps=2, guidance=1.0, eta=0.0, seed=11)
    assert ours.condition.negative_embeds is None
    torch.testing.assert_close(ours.media, stock_images(stock, PROMPTS[:1], [11], 2, 1.0), atol=1e-4, rtol=0)


def train_a_few_steps(gen, steps: int = 2) -> None:
    """Adam steps pushing the log-prob of one sample up and another's down (a toy policy gradient)."""
    optimizer = torch.optim.Adam(gen.trainable_parameters(), lr=5e-2)
    advantages = torch.tensor([[1.0], [-1.0]])
    for _ in range(steps):
        r = gen.rollout(PROMPTS, steps=2, guidance=3.0, eta=1.0, seed=0)
        loss = -(advantages * gen.step_log_prob(r, [0, 1])).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def trained_lora(sd_path, tmp_path_factory):
    gen = load_generator(sd_path)
    gen.add_lora(LoraSpec(rank=4, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    before = [p.detach().clone() for p in gen.trainable_parameters()]
    train_a_few_steps(gen)
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, gen.trainable_parameters(), strict=True)]
    out = gen.save(tmp_path_factory.mktemp("lora"))
    return gen, out, changed


def test_gradient_reaches_lora_and_nothing_else(trained_lora):
    gen = trained_lora[0]
    params = gen.trainable_parameters()
    names = {n for m in gen.modules().values() for n, p in m.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for p in params)
    gen.pipeline.unet.zero_grad(set_to_none=True)
    r = gen.rollout(PROMPTS[:1], steps=2, guidance=3.0, eta=1.0, seed=0)
    gen.step_log_prob(r, [0, 1]).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    frozen = [p for m in gen.modules().values() for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_training_changes_every_lora_parameter(trained_lora):
    _, _, changed = trained_lora
    assert changed and all(changed)



def test_visalign_load_reads_its_lora_back(trained_lora, sd_path, sd):
    gen, lora_dir, _ = trained_lora
    loaded = load_generator(sd_path, lora=lora_dir)
    assert loaded.lora.rank == 4 and loaded.trainable_parameters()
    a = gen.rollout(PROMPTS, steps=2, guidance=3.0, eta=1.0, seed=2)
    b = loaded.rollout(PROMPTS, steps=2, guidance=3.0, eta=1.0, seed=2)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-4, rtol=0)
    with loaded.lora_disabled():
        base = loaded.rollout(PROMPTS, steps=2, guidance=3.0, eta=0.0, seed=2).media
    torch.testing.assert_close(base, sd.rollout(PROMPTS, steps=2, guidance=3.0, eta=0.0, seed=2).media, atol=1e-5,
                               rtol=0)


def test_full_finetune_saves_a_pipeline_folder(sd_path, sd, tmp_path):
    gen = load_generator(sd_path)
    gen.train_full()
    train_a_few_steps(gen, steps=1)
    folder = gen.save(tmp_path / "full")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    reloaded = load_generator(folder)
    a = gen.rollout(PROMPTS, steps=2, guidance=3.0, eta=0.0, seed=4).media
    b = reloaded.rollout(PROMPTS, steps=2, guidance=3.0, eta=0.0, seed=4).media
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - sd.rollout(PROMPTS, steps=2, guidance=3.0, eta=0.0, seed=4).media).abs().max() > 0


def test_gradient_checkpointing_gives_the_same_gradient(trained_lora):
    gen = trained_lora[0]
    r = gen.rollout(PROMPTS[:1], steps=2, guidance=3.0, eta=1.0, seed=0)
    grads = []
    for checkpointing in (False, True):
        gen.set_gradient_checkpointing(checkpointing)
        gen.denoiser.train(checkpointing)  # diffusers only checkpoints in training mode; the tiny UNet has no dropout
        gen.denoiser.zero_grad(set_to_none=True)
        gen.step_log_prob(r, [0, 1]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.trainable_parameters()]))
    gen.set_gradient_checkpointing(False)
    gen.denoiser.eval()
    assert gen.denoiser.is_gradient_checkpointing is False and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_train_on_a_step_subset_of_a_short_rollout(sd):
    # Denoising reduction: roll out with 3 steps for training although inference uses more; train the first 2.
    r = sd.rollout(PROMPTS[:1], steps=3, guidance=3.0, eta=1.0, seed=1)
    steps = select_train_steps(r.num_steps, fraction=0.7)
    assert steps == [0, 1]
    lp = sd.step_log_prob(r, steps)
    torch.testing.assert_close(lp, r.log_probs[:, :2], atol=1e-4, rtol=0)
    torch.testing.assert_close(sd.step_log_prob(r, select_train_steps(3, window=(2, 3))), r.log_probs[:, 2:],
                               atol=1e-4, rtol=0)


# ---------------------------------------------------------------- bad input


def test_unknown_pipeline_class_lists_supported_families(sd_path, tmp_path):
    folder = tmp_path / "weird"
    shutil.copytree(sd_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedPipelineError, match="KandinskyPipeline.*StableDiffusionPipeline"):
        load_generator(folder)


def test_lora_for_another_base_model_is_a_clear_error(sd_path, sd_other_path, tmp_path):
    other = load_generator(sd_other_path)
    other.add_lora(LoraSpec(rank=2, alpha=2.0, target_modules=["to_k", "to_v"]))
    folder = other.save(tmp_path / "other-lora")
    with pytest.raises(ValueError, match="different base model"):
        load_generator(sd_path, lora=folder)


def test_empty_prompt_list(sd):
    with pytest.raises(ValueError, match="prompt list is empty"):
        sd.rollout([], steps=2)


def test_resolution_not_divisible_by_vae_factor(sd):
    with pytest.raises(ValueError, match=r"height=33 px is not divisible by 2.*32 or 34"):
        sd.rollout(PROMPTS, steps=2, height=33, width=32)


def test_misc_bad_arguments(sd):
    with pytest.raises(TypeError, match="not a single string"):
        sd.rollout("a red cube", steps=2)
    with pytest.raises(ValueError, match="2 prompts but 3 negative"):
        sd.rollout(PROMPTS, steps=2, negative_prompt=["x", "y", "z"])
    with pytest.raises(ValueError, match="reduction"):
        sd.step_log_prob(sd.rollout(PROMPTS[:1], steps=1), [0], reduction="max")


def test_sde_window_samples_only_its_steps_and_replays_them(sd_path):
    gen = load_generator(sd_path).configure_sde(window=(1, 3))
    windowed = gen.rollout(PROMPTS, steps=4, guidance=4.0, eta=1.0, seed=5)
    finite = torch.isfinite(windowed.log_probs).all(dim=0).tolist()
    assert finite == [False, True, True, False]  # η only inside [1, 3); the others are deterministic DDIM steps
    ratio = torch.exp(gen.step_log_prob(windowed, [1, 2]) - windowed.log_probs[:, 1:3])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)
    # Outside the window a step is the η = 0 step: from the same x_t it lands where the deterministic sampler does.
    out = gen.recompute_step(windowed, 3)
    assert float(out.std.max()) == 0.0
    torch.testing.assert_close(out.prev_sample, windowed.latents[:, 4], atol=1e-5, rtol=0)
    # The window changes the trajectory (step 0 lost its noise), a full window is the plain η sampler.
    plain = load_generator(sd_path).rollout(PROMPTS, steps=4, guidance=4.0, eta=1.0, seed=5)
    assert (windowed.latents[:, 1] - plain.latents[:, 1]).abs().max() > 1e-3
    full = gen.configure_sde(window=(0, 4)).rollout(PROMPTS, steps=4, guidance=4.0, eta=1.0, seed=5)
    torch.testing.assert_close(full.latents, plain.latents, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exceeds"):
        gen.configure_sde(window=(2, 6)).rollout(PROMPTS, steps=4, eta=1.0)
    with pytest.raises(ValueError, match="start < stop"):
        gen.configure_sde(window=(3, 3))
