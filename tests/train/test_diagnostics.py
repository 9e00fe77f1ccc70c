"""Reward-hacking diagnostics and loop helpers that need no model: collapse monitor, diversity, frozen reward
statistics during evaluation, metrics truncation on resume, the prompt stream's resumable position."""

from __future__ import annotations

import json
import math

import pytest
import torch

from visalign.rewards.spec import RewardSpec
from visalign.scorers import ScoreBatch
from visalign.train.diagnostics import CollapseMonitor, group_diversity
from visalign.train.loop import truncate_metrics
from visalign.train.prompts import PromptStream


def test_collapse_monitor_baselines_on_first_iterations_and_counts_warnings():
    monitor = CollapseMonitor(ratio=0.2, baseline_iterations=3)
    assert [monitor.check(v) for v in (1.0, float("nan"), 0.5, 1.5)] == [None] * 4
    assert monitor.initial == pytest.approx(1.0)  # mean of 1.0, 0.5, 1.5; NaN skipped
    assert monitor.check(0.3) is None  # 30 % of the baseline: fine
    message = monitor.check(0.1)
    assert message and "reward variance collapse" in message and "0.1" in message
    monitor.check(0.05)
    assert monitor.warned == 2
    restored = CollapseMonitor(ratio=0.2, baseline_iterations=3)
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert restored.initial == monitor.initial and restored.warned == 2


def test_group_diversity_is_within_group_only():
    black, white = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    same = torch.stack([black, black, white, white])
    assert group_diversity(same, torch.tensor([0, 0, 1, 1])) == 0.0  # groups collapsed, groups differ
    mixed = torch.stack([black, white, black, white])
    assert group_diversity(mixed, torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(group_diversity(mixed, torch.tensor([0, 1, 2, 3])))
    video = mixed[:, None].expand(4, 2, 3, 8, 8)
    assert group_diversity(video, torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0, abs=1e-5)


def test_evaluation_leaves_running_reward_statistics_alone():
    spec = RewardSpec.from_config([{"scorer": "brightness", "transform": "running-zscore"}])
    batch = ScoreBatch(prompts=["a"] * 3, media=torch.rand(3, 3, 8, 8))
    spec(batch)
    before = spec.state_dict()
    with spec.frozen_transforms():
        spec(ScoreBatch(prompts=["a"] * 3, media=torch.ones(3, 3, 8, 8)))
    assert spec.state_dict() == before
    spec(batch)  # training calls update the statistics again after the block
    assert spec.state_dict()["transforms"]["brightness"]["count"] == 6


def test_truncate_metrics_drops_later_rows_and_a_torn_line(tmp_path):
    rows = [{"step": 0, "eval/reward": 0.1}, {"step": 1, "reward": 0.2}, {"step": 2, "reward": 0.3},
            {"step": 3, "reward": 0.4}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew'
    (tmp_path / "metrics.jsonl").write_text(text)
    kept = truncate_metrics(tmp_path, 2)
    assert kept == rows[:3]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_prompt_stream_resumes_mid_epoch():
    prompts = [f"p{i}" for i in range(5)]
    stream = PromptStream(prompts, seed=3)
    stream.take(3), stream.take(3)  # crosses into the second epoch
    state = stream.state_dict()
    expected = [stream.take(2) for _ in range(4)]
    resumed = PromptStream(prompts, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.take(2) for _ in range(4)] == expected
    assert len(set(PromptStream(prompts, seed=3).take(5))) == 5  # an epoch draws every prompt once
    with pytest.raises(ValueError, match="lower sample.prompts_per_step or add prompts"):
        stream.take(6)


def test_prompt_tables_carry_metadata(tmp_path):
    from visalign.scoring import InputError
    from visalign.train.prompts import read_prompt_table

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a red circle", "count": 1}\n\n{"prompt": " ", "count": 0}\n'
                     '{"prompt": "two cats", "count": 2}\n')
    assert read_prompt_table(jsonl) == (["a red circle", "two cats"], [{"count": 1}, {"count": 2}])
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,tag\na dog,animal\na car,vehicle\n")
    prompts, meta = read_prompt_table(csv)
    stream = PromptStream(prompts, seed=0, metadata=meta)
    drawn, drawn_meta = stream.take_with_metadata(2)
    assert sorted(drawn) == ["a car", "a dog"]
    assert [m["tag"] for m in drawn_meta] == [{"a dog": "animal", "a car": "vehicle"}[p] for p in drawn]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a dog"}\n')
    with pytest.raises(InputError, match="needs a 'prompt' column; the first row has \\['text'\\]"):
        read_prompt_table(bad)


def test_a_step_never_draws_the_same_prompt_twice():
    stream = PromptStream(["a", "b", "c"], seed=1)
    for _ in range(20):  # steps of 2 out of 3 cross an epoch boundary every other step
        drawn = stream.take(2)
        assert len(set(drawn)) == 2


def test_logger_writes_jsonl_image_and_video_grids(tmp_path):
    from PIL import Image

    from visalign.train.logging import RunLogger, read_metrics

    logger = RunLogger(tmp_path, tensorboard=True)
    logger.log(1, {"reward": 0.5, "kl": float("nan")})
    png = logger.grid(1, torch.rand(4, 3, 8, 8), columns=2)
    video = torch.zeros(2, 3, 3, 8, 8)
    video[:, 1] = 1.0  # the middle frame is white: a first-frame-only grid would miss it
    vid_png = logger.grid(2, video, columns=2, tag="train")
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "reward": 0.5, "kl": None}]  # NaN → null, still valid JSON
    assert Image.open(png).size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    gif = Image.open(vid_png.with_suffix(".gif"))
    assert gif.n_frames == 3
    gif.seek(1)
    assert max(gif.convert("L").getdata()) == 255
    assert any((tmp_path / "tensorboard").iterdir())


def test_shipped_prompt_sets_are_files():
    """The shapes world's sets are plain files the generic reader reads; an old ``shapes:<set>`` name is a missing
    file whose error says where the sets went."""
    from visalign.registry import UnknownIdError
    from visalign.scoring import InputError
    from visalign.shapes.prompt_sets import build_prompt_sets, list_prompt_sets, prompt_file
    from visalign.train.prompts import read_prompt_table

    assert "train" in list_prompt_sets() and "heldin_eval" in list_prompt_sets()
    prompts, meta = read_prompt_table(prompt_file("train"))
    assert prompts == build_prompt_sets()["train.txt"] and meta == [{}] * len(prompts)
    with pytest.raises(UnknownIdError, match="Unknown shapes prompt set 'trian'.* Known: heldin_eval"):
        prompt_file("trian")
    with pytest.raises(InputError, match="shapes:train: no such file.*assets/shapes/prompts/train.txt"):
        read_prompt_table("shapes:train")
