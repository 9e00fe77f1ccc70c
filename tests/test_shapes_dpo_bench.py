"""benchmarks/shapes_dpo.py at the smallest scale: base samples → oracle pairs → Diffusion-DPO → oracle evaluation
through ``main()`` on the shipped shapes base model (1 seed, 2 prompts × 4 samples, 2 iterations, 2 eval prompts)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("shapes_dpo_bench", REPO / "benchmarks/shapes_dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_results(tmp_path):
    bench = load_bench()
    out = tmp_path / "dpo"
    bench.main(["--seeds", "0", "--prompts", "2", "--samples-per-prompt", "4",
                "--iterations", "2", "--pairs-per-step", "2", "--eval-prompts", "2", "--eval-images-per-prompt", "1",
                "--eval-steps", "3", "--out", str(out)], log=lambda line: None)
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert {"command", "args", "base", "seeds", "summary", "eval_prompts"} <= set(result)
    assert set(result["base"]) == {"heldin", "heldout"}
    (seed,) = result["seeds"]
    assert seed["seed"] == 0 and seed["pairs"] > 0
    assert len(seed["losses"]) == 2
    # Policy = reference at the first step (LoRA starts at zero): the DPO loss is log 2.
    assert abs(seed["loss_first"] - math.log(2)) < 1e-3
    for name in ("heldin", "heldout"):
        assert math.isfinite(seed["gain_points"][name])
        assert math.isfinite(result["summary"]["gain_points"][name]["mean"])
    assert seed["wall_seconds"]["total"] > 0 and seed["cpu_seconds"]["total"] > 0
    assert (out / "results.md").is_file() and not (out / "runs").exists()
