"""benchmarks/shapes_rm.py at the smallest scale: base samples → oracle labels → pairs → yes-token RMs (yes-no, bt,
bt-ties) from the shipped shapes VLM → held-out metrics next to the shipped proxy's, through ``main()``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("shapes_rm_bench", REPO / "benchmarks/shapes_rm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cell_writes_results(tmp_path):
    torch.set_num_threads(1)
    bench = load_bench()
    out = tmp_path / "rm"
    result = bench.main(["--train-prompts", "3", "--heldout-prompts", "2", "--samples-per-prompt", "4",
                         "--steps", "2", "--pairs-per-step", "2", "--out", str(out),
                         "--cache", str(tmp_path / "samples.pt"), "--save-rm", str(tmp_path / "saved")],
                        log=lambda line: None)
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["summary"] == result["summary"]
    assert set(saved["runs"]) == {"yes-no/seed0", "bt/seed0", "bt-ties/seed0"}
    assert saved["heldout_data"]["samples"] == 8 and saved["train_data"]["samples"] == 12
    for run in [saved["shipped"], *saved["runs"].values()]:
        held = run["heldout"]
        assert held["pairs"] == saved["heldout_data"]["pairs"]  # every scorer on the SAME pairs
        assert 0.0 <= held["tie_accuracy"] <= 1.0
    # bt drops ties, bt-ties trains on them.
    assert saved["runs"]["bt-ties/seed0"]["train_pairs"] == saved["train_data"]["pairs"]
    assert saved["runs"]["bt/seed0"]["train_pairs"] == saved["train_data"]["pairs"] - saved["train_data"]["ties"]
    assert (tmp_path / "saved" / "card.yaml").is_file() and (out / "results.md").is_file()
    # The cache is reused: the same samples come back without sampling again.
    again = bench.labelled_samples(bench.parse_args(["--cache", str(tmp_path / "samples.pt")]), log=None)
    assert again["train"]["prompts"] == [p for p in again["train"]["prompts"][::4] for _ in range(4)]
    assert len(again["train"]["prompts"]) == saved["train_data"]["samples"]
    assert float(again["train"]["all"].float().mean()) == saved["train_data"]["all_correct"]
