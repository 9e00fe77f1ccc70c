"""CogVideoX adapter on a tiny random-init ``CogVideoXPipeline`` loaded through ``from_pretrained`` (no network).

CogVideoX's scheduler is zero-terminal-SNR v-prediction DDIM with ``set_alpha_to_one=True``: the last step lands on
``ᾱ = 1`` and has zero variance, so it is deterministic (NaN log-prob) and is excluded from training, as Flow-GRPO
excludes its last step.
"""

from __future__ import annotations

import pytest
import torch

from tests.generators import flow_fixtures
from tests.generators.flow_fixtures import build_cogvideox
from visalign.generators import load_generator, select_train_steps

PROMPTS = ["a red cube", "two blue circles"]
SIZE = {"height": 16, "width": 16, "num_frames": 9}
SEQ_LEN = 16  # the tiny transformer's max_text_seq_length
flow_dir = flow_fixtures.flow_dir


def _load(flow_dir):
    gen = load_generator(build_cogvideox(flow_dir))
    gen.max_sequence_length = SEQ_LEN
    return gen


@pytest.fixture(scope="module")
def cog(flow_dir):
    return _load(flow_dir)


def test_terminal_step_is_deterministic_and_excluded(cog):
    r = cog.rollout(PROMPTS, steps=4, guidance=6.0, eta=1.0, seed=3, **SIZE)
    assert r.media.shape == (2, 9, 3, 16, 16) and r.media.min() >= 0 and r.media.max() <= 1
    assert r.latents.shape == (2, 5, 3, 4, 2, 2)  # [B, S+1, F', C, h, w]
    trainable = select_train_steps(r.num_steps, window=(0, r.num_steps - 1))
    assert torch.isfinite(r.log_probs[:, trainable]).all()
    assert torch.isnan(r.log_probs[:, -1]).all()  # ᾱ_prev = 1: zero variance, no density


def test_step_matches_hand_written_v_prediction_ddim(cog):
    """The policy mean at η = 1 is docs/methods.md#ddim-logprob with v-prediction, using the scheduler's own ᾱ."""
    r = cog.rollout(PROMPTS[:1], steps=4, guidance=1.0, eta=1.0, seed=0, **SIZE)
    i = 1
    out = cog.recompute_step(r, i)
    sched = cog.pipeline.scheduler
    t, t_prev = int(r.timesteps[i]), int(r.schedule["prev_timesteps"][i])
    a, a_prev = sched.alphas_cumprod[t].float(), sched.alphas_cumprod[t_prev].float()
    x = r.latents[:, i]
    with torch.no_grad():
        v = cog.predict(r.plan, x, i)
    x0 = a.sqrt() * x - (1 - a).sqrt() * v
    eps = a.sqrt() * v + (1 - a).sqrt() * x
    std = ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    mu = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    torch.testing.assert_close(out.mean.detach(), mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.flatten()[0], std, rtol=1e-5, atol=1e-7)

