"""benchmarks/shapes_objectives.py at the smallest scale: one real cell through ``main()`` on the shipped shapes
base model (Pareto GRPO over the two learned proxies, 1 iteration, 2 prompts per eval set), then its outputs,
the pairing of the Trainer's curve evaluation with the before/after evaluation, and ``--resume``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CELL = "pareto__clip+vlm__seed0"


def load_bench():
    spec = importlib.util.spec_from_file_location("shapes_objectives_bench", REPO / "benchmarks/shapes_objectives.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(out: Path) -> list[str]:
    # Smallest recipe the loop accepts: 2 prompts x 2 samples, 2 DDIM steps (one of them stochastic and trained).
    # --threads 0 leaves the test process's torch thread count alone.
    return ["--objectives", "pareto", "--seeds", "0", "--iterations", "1", "--curve-every", "1", "--curve-prompts",
            "2", "--eval-heldin", "2", "--eval-heldout", "2", "--eval-steps", "3", "--eval-images-per-prompt", "1",
            "--threads", "0", "--out", str(out), "--recipe", "prompts_per_step=2", "images_per_prompt=2", "steps=2",
            "train_steps_per_update=null", "train_fraction=0.5", "sde_window=[0, 1]"]


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-objectives")
    results = bench.main(tiny_args(out))
    return out, results


def test_cell_record_pairs_before_after_and_curves(smoke):
    out, _ = smoke
    cell = json.loads((out / "cells" / f"{CELL}.json").read_text())
    assert (cell["objective"], cell["reward"], cell["seed"]) == ("pareto", "clip+vlm", 0)
    for name in ("heldin", "heldout"):
        s = cell["sets"][name]
        assert s["n"] == 2
        before, after = s["oracle_all"]
        assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
        assert s["oracle_all_gain"] == pytest.approx(after - before)
        assert s["proxy_gain"] == pytest.approx(s["proxy"][1] - s["proxy"][0])
        assert set(s["attributes"]) <= {"colour", "shape", "count", "position"} and s["attributes"]
    curves = cell["curves"]
    assert curves["iteration"] == [0, 1]
    # The curve prompts are the first held-in eval prompts with the same seed and steps, so the Trainer's
    # evaluation before and after training must reproduce the benchmark's own before/after numbers.
    heldin = cell["sets"]["heldin"]
    assert curves["oracle"][0] == pytest.approx(heldin["oracle_reward"][0], abs=1e-5)
    assert curves["oracle"][-1] == pytest.approx(heldin["oracle_reward"][1], abs=1e-5)
    assert curves["proxy"][0] == pytest.approx(heldin["proxy"][0], abs=1e-4)
    assert curves["proxy"][-1] == pytest.approx(heldin["proxy"][1], abs=1e-4)
    assert cell["cpu_seconds"]["align"] > 0 and cell["cpu_seconds"]["curves"] > 0
    assert cell["fingerprint"]["recipe"]["iterations"] == 1


def test_trainer_ran_pareto_over_both_proxies_with_oracle_eval(smoke):
    out, _ = smoke
    run = out / "runs" / CELL
    config = json.loads((run / "train" / "config.json").read_text())
    assert config["objective"]["name"] == "grpo" and config["reward"]["pareto"] is True
    assert [t["scorer"] for t in config["reward"]["terms"]] == ["shapes-clip", "shapes-vlm"]
    assert config["eval"]["scorers"] == ["shapes-oracle"] and config["eval"]["eta"] == 0.0
    assert config["model"]["lora_rank"] > 0
    assert (run / "train" / "final").is_dir()
    metrics = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in metrics if "reward" in row]
    assert trained and {"reward/clip/mean", "reward/vlm/mean"} <= set(trained[0])

    from visalign.shapes.grammar import parse_prompt

    evaluated = {parse_prompt(p) for p in (run / "curve_prompts.txt").read_text().split("\n") if p}
    aligned = {parse_prompt(p) for p in (run / "align_prompts.txt").read_text().split("\n") if p}
    assert evaluated and aligned and not evaluated & aligned


def test_combined_results_table_and_plots(smoke):
    out, results = smoke
    from PIL import Image

    assert [(r["objective"], r["reward"], r["seeds"]) for r in results["aggregate"]] == [("pareto", "clip+vlm", [0])]
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["cells"]) == 1 and saved["aggregate"][0]["heldin/oracle_all_gain_pts"]["n"] == 1
    table = (out / "table.md").read_text()
    assert "| pareto" in table and "clip+vlm" in table and "Δ all held-out (pts)" in table
    for name in ("curves_clip+vlm.png", "overoptimisation.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_resume_skips_finished_cells_and_refuses_other_settings(bench, smoke, capsys):
    out, _ = smoke
    path = out / "cells" / f"{CELL}.json"
    before = path.read_bytes()
    bench.main([*tiny_args(out), "--resume"])
    assert "skipped (--resume)" in capsys.readouterr().out
    assert path.read_bytes() == before
    changed = tiny_args(out)
    changed[changed.index("--iterations") + 1] = "2"
    with pytest.raises(SystemExit, match="different settings.*recipe"):
        bench.main([*changed, "--resume"])


def test_reward_table_drives_the_train_config(bench, tmp_path):
    args = bench.parse_args(["--out", str(tmp_path), "--curve-every", "3"])
    recipe = bench.resolve_recipe("grpo", {"lr": 1e-3})
    spec = bench.fingerprint("grpo", "uncertainty", recipe, args)
    from visalign.shapes.demo import DemoConfig

    demo = DemoConfig(**recipe, output_dir=str(tmp_path))
    config = bench.build_train_config(demo, spec, tmp_path / "a.txt", tmp_path / "c.txt", tmp_path, 3, 16)
    assert [t["scorer"] for t in config.reward.terms] == ["shapes-uncertainty"]
    assert config.reward.uncertainty_weights is True and config.reward.pareto is False
    assert config.optim.lr == 1e-3 and config.eval.every == 3 and config.eval.max_prompts == 16
    with pytest.raises(ValueError, match="unknown key"):
        bench.resolve_recipe("grpo", {"learning_rate": 1e-3})
    with pytest.raises(SystemExit, match="close: .*'raft'"):
        bench.parse_args(["--objectives", "raf"])


def test_polish_row_continues_the_grpo_lora_on_the_differentiable_terms(bench, tmp_path):
    args = tiny_args(tmp_path)
    args[args.index("pareto")] = "grpo+polish"
    args[args.index("--seeds"):args.index("--seeds")] = ["--rewards", "oracle+colour"]
    args += ["polish_iterations=1"]
    bench.main(args)
    cell = json.loads((tmp_path / "cells" / "grpo+polish__oracle+colour__seed0.json").read_text())
    assert cell["fingerprint"]["recipe"]["polish_iterations"] == 1
    run = tmp_path / "runs" / "grpo+polish__oracle+colour__seed0"
    polish = [json.loads(line) for line in (run / "polish" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in polish if "reward/shapes-colour/mean" in r] == [1]  # the oracle has no gradient
    assert (run / "polish" / "final" / "pytorch_lora_weights.safetensors").is_file()
    # Rows without a polish keep it off, whatever the demo's default is.
    assert bench.resolve_recipe("grpo", {})["polish_iterations"] == 0
    with pytest.raises(ValueError, match="differentiable"):
        bench.polish_rewards([{"scorer": "shapes-oracle", "weight": 1.0}])


def test_nft_row_trains_on_clean_eta0_samples_through_the_benchmark(bench, tmp_path):
    # The likelihood-free row (docs/methods.md#nft) at the smallest budget: its recipe samples with η = 0 (it needs
    # no log-prob), the Trainer runs the nft objective, and the cell records a trained LoRA graded before and after.
    args = tiny_args(tmp_path)
    args[args.index("pareto")] = "nft"
    args[args.index("--seeds"):args.index("--seeds")] = ["--rewards", "oracle"]
    bench.main(args)
    cell = json.loads((tmp_path / "cells" / "nft__oracle__seed0.json").read_text())
    assert cell["fingerprint"]["objective"] == "nft" and cell["fingerprint"]["recipe"]["eta"] == 0.0
    assert cell["fingerprint"]["recipe"]["polish_iterations"] == 0
    for name in ("heldin", "heldout"):
        before, after = cell["sets"][name]["oracle_all"]
        assert cell["sets"][name]["oracle_all_gain"] == pytest.approx(after - before)
    run = tmp_path / "runs" / "nft__oracle__seed0"
    config = json.loads((run / "train" / "config.json").read_text())
    assert config["objective"]["name"] == "nft" and config["sample"]["eta"] == 0.0
    metrics = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in metrics if "loss" in row]
    assert losses and all(math.isfinite(v) for v in losses)
    assert (run / "train" / "final" / "pytorch_lora_weights.safetensors").is_file()
