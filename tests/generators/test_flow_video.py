"""Wan and LTX adapters on tiny random-init pipelines loaded through ``from_pretrained`` (no network).

The SDE step broadcasts its noise level over the 5-D latents ``[B, C, F', h, w]``; this checks what is particular to
the flow video families: media ``[B, T, 3, H, W]`` in [0, 1], the true summed density, SDE windows, bad frame counts.
Ratio 1, stock parity and the LoRA round trip are checked for every family in test_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.generators import flow_fixtures
from tests.generators.flow_fixtures import build_ltx, build_wan
from visalign.generators import load_generator

PROMPTS = ["a red cube", "two blue circles"]
SEQ_LEN = 16
# Per family: builder, sizes, and the latent shape [C, F', h, w] those sizes give (Wan: ×8 space, LTX: ×4 space).
FAMILIES = {
    "wan": (build_wan, {"height": 16, "width": 16, "num_frames": 5}, (16, 2, 2, 2)),
    "ltx": (build_ltx, {"height": 32, "width": 32, "num_frames": 9}, (8, 3, 8, 8)),
}
flow_dir = flow_fixtures.flow_dir  # the session fixture, shared with the other flow test modules


def _load(name, flow_dir):
    gen = load_generator(FAMILIES[name][0](flow_dir))
    gen.max_sequence_length = SEQ_LEN
    return gen


@pytest.fixture(scope="module", params=list(FAMILIES))
def video(request, flow_dir):
    gen = _load(request.param, flow_dir)
    return gen, FAMILIES[request.param][1], FAMILIES[request.param][2]


def test_rollout_is_a_video_with_finite_log_probs_and_the_true_density(video):
    gen, size, latent = video
    r = gen.rollout(PROMPTS, steps=3, guidance=4.0, eta=0.7, seed=2, **size)
    frames, height = size["num_frames"], size["height"]
    assert r.media.shape == (2, frames, 3, height, height) and r.media.min() >= 0 and r.media.max() <= 1
    assert r.latents.shape == (2, 4, *latent)  # [B, S+1, C, F', h, w]
    assert torch.isfinite(r.log_probs).all() and torch.isfinite(r.log_probs_sum).all()
    # logp_sum is the true density: D · logp_mean with D = C·F'·h·w.
    torch.testing.assert_close(r.log_probs_sum, r.log_probs * torch.Size(latent).numel())



def test_sde_window_and_cps_mode(video):
    gen, size, _ = video
    gen.configure_sde(mode="cps", window=(0, 2))
    try:
        r = gen.rollout(PROMPTS, steps=3, guidance=4.0, eta=0.5, seed=1, **size)
        assert torch.isfinite(r.log_probs[:, :2]).all() and torch.isnan(r.log_probs[:, 2]).all()
        assert (gen.step_log_prob(r, [0, 1]) - r.log_probs[:, :2]).abs().max() < 1e-4
    finally:
        gen.configure_sde(mode="flowgrpo", window=None)



def test_bad_frame_count_names_the_fix(video):
    gen, _, _ = video
    with pytest.raises(ValueError, match="num_frames=6 must be 1 \\+ a multiple of 4"):
        gen.rollout(PROMPTS, steps=2, height=32, width=32, num_frames=6)
