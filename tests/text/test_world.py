"""The shipped tiny text world (assets/textworld): small, recorded, rebuilt reproducibly, exact checker."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from visalign.text.build_world import WorldBuildConfig, build_world
from visalign.text.world import StringTaskReward, is_held_out, parse_prompt

WORLD = Path(__file__).resolve().parents[2] / "assets" / "textworld"


def test_the_shipped_world_is_small_and_recorded():
    size = sum(p.stat().st_size for p in WORLD.rglob("*") if p.is_file())
    assert size < 2_000_000
    record = json.loads((WORLD / "build.json").read_text())
    assert record["config"] == json.loads(json.dumps(vars(WorldBuildConfig())))  # built with the defaults
    assert 0.2 < record["base_heldout_accuracy"]["greedy"] < 0.6  # room for RL to raise it
    heldout = (WORLD / "prompts" / "heldout.txt").read_text().split("\n")[:-1]
    train = (WORLD / "prompts" / "train.txt").read_text().split("\n")[:-1]
    assert all(is_held_out(parse_prompt(p).word) for p in heldout)
    assert not any(is_held_out(parse_prompt(p).word) for p in train)


def test_a_rebuild_is_byte_identical(tmp_path):
    config = WorldBuildConfig(steps=5, corpus_size=200, train_prompts=8, heldout_prompts=8)
    digests = []
    for name in ("a", "b"):
        build_world(tmp_path / name, config)
        digests.append(hashlib.sha256((tmp_path / name / "lm" / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_the_checker_is_exact():
    reward = StringTaskReward()
    out = reward(prompts=["shift abh=", "sort dcba=", "rev ab="], completions=["bca", "abcd", "ab"])
    assert out == [1.0, 1.0, 0.0]
