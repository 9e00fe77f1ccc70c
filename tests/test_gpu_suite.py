"""benchmarks/gpu_suite.py runs every measurement at tiny size on CPU, and its real sizes are the real models'."""

from __future__ import annotations

import json
import math

import torch

from benchmarks.gpu_suite import DIT, SD_UNET, main


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_the_suite_runs_at_tiny_size_on_cpu_and_writes_every_number(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "suite.json"
    results = main(["--size", "tiny", "--device", "cpu", "--runs", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    sd, dit = results["sd15"], results["sd35m_dit"]
    for pair in (sd["rollout_vs_stock"], sd["update_vs_bare_fwd_bwd"]):
        assert all(_positive(pair[k]) for k in ("ours_s", "theirs_s", "ratio"))
    assert _positive(sd["images_per_gpu_per_s"])
    assert set(sd["trainer_phases_s"]) == {"sample", "score", "update", "iteration"}
    assert all(_positive(v) for v in sd["trainer_phases_s"].values())
    for suite in (sd["unet"], dit):
        assert _positive(suite["train_step_gflops"]) and _positive(suite["fwd_bwd_s_checkpointing"])
        assert "sdpa" in suite["attention"] and _positive(suite["attention"]["sdpa"]["fwd_bwd_s"])
        assert suite["attention"]["sdpa"]["mfu"] is None and suite["peak_gib"] is None  # CPU: no peak, no MFU
    assert "eager" in sd["unet"]["attention"]


def test_real_sizes_are_sd15_and_sd35_medium():
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_UNET["real"])
        dit = SD3Transformer2DModel(**DIT["real"])
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    assert 2.2e9 < sum(p.numel() for p in dit.parameters()) < 2.3e9  # SD3.5 Medium's MMDiT-X
