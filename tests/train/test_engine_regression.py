"""The engine split (one engine, experience sources, rewards in visalign/rewards) changed no number: a tiny GRPO run
logs the metrics that the trainer before the split logged, recorded in ``data/grpo_metrics_before_engine.jsonl``
(commit ae03e39, ``visalign train pipelines/tiny-sd-grpo.yaml`` with the overrides below, OMP_NUM_THREADS=1).

Wall-clock keys (``time/*``, ``samples_per_second``) are left out: they are the only ones that may differ."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.train.conftest import TINY_RECIPE
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer

RECORDED = Path(__file__).with_name("data") / "grpo_metrics_before_engine.jsonl"
OVERRIDES = ["sample.prompts_per_step=2", "sample.images_per_prompt=3", "sample.steps=3", "model.resolution=32",
             "run.progress=false", "run.tensorboard=false", "run.iterations=4", "run.checkpoint_every=2",
             "eval.every=2", "eval.max_prompts=2", "run.seed=3", "optim.ema_decay=0.9", "objective.params.beta=0.01",
             "reward.terms=[brightness,{scorer: saturation, weight: 0.5, transform: rank}]"]


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not (k.startswith("time/") or k == "samples_per_second")}


def test_a_tiny_grpo_run_logs_the_metrics_recorded_before_the_engine_split(tmp_path):
    out = tmp_path / "grpo"
    Trainer(load_train_config(TINY_RECIPE, [*OVERRIDES, f"run.output_dir={out}"])).run(resume=False)
    now = [_comparable(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = [_comparable(json.loads(line)) for line in RECORDED.read_text().splitlines()]
    assert len(now) == len(before) == 6  # eval at start, 4 iterations, eval at the end
    for i, (a, b) in enumerate(zip(now, before, strict=True)):
        assert a.keys() == b.keys(), f"row {i}: keys {sorted(a.keys() ^ b.keys())} differ"
        for key in a:
            same = a[key] == b[key] or (isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key]))
            assert same, f"row {i} {key}: {a[key]} now, {b[key]} before the split"
