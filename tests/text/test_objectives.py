"""The text objectives on the tiny LM through the real engine: DPO = log 2 at init, RLOO's leave-one-out baseline,
best-of-N trains on the argmax, on-policy ratio 1, GRPO raises a verifiable reward, GDPO and PAR apply to text
unchanged (docs/methods.md#text-core)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.text.helpers import text_recipe, trainer_of
from visalign.generators import LoraSpec
from visalign.objectives.base import UpdateContext, build_objective
from visalign.rewards import RewardSpec
from visalign.scorers import ScoreBatch
from visalign.text.pairs import tokenize_pairs


def context(policy, steps: list[float] | None = None) -> UpdateContext:
    def optimizer_step() -> float:
        if steps is not None:
            steps.append(1.0)
        return 0.0

    return UpdateContext(policy, [], optimizer_step, torch.Generator().manual_seed(0))


def test_dpo_loss_is_log_two_at_init_and_rpo_adds_the_chosen_nll(policy, text_config):
    policy.add_lora(LoraSpec(rank=4, alpha=4.0, target_modules=["q_proj", "v_proj"]))  # B = 0: θ = ref at init
    rows = [{"prompt": "rev abc=", "chosen": "cba", "rejected": "abc"},
            {"prompt": "sort cab=", "chosen": "abc", "rejected": ""}]  # an empty completion: EOS only
    batch = tokenize_pairs(policy, rows, text_config)
    assert batch.rejected_mask[1].sum() == 1 and batch.chosen_mask[0].sum() == 4  # 3 letters + EOS
    out = build_objective("text-dpo", {"beta": 0.1}).update(batch, context(policy))
    assert out["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out["rewards/margins"] == 0.0 and out["rewards/accuracies"] == 0.0
    rpo = build_objective("text-dpo", {"beta": 0.1, "sft_weight": 0.5}).update(batch, context(policy))
    assert rpo["loss"] == pytest.approx(math.log(2) + 0.5 * rpo["sft_loss"], abs=1e-6) and rpo["sft_loss"] > 0


def test_dpo_raises_the_margin_on_its_pairs(policy, text_config):
    params = policy.add_lora(LoraSpec(rank=4, alpha=4.0, target_modules=["q_proj", "v_proj", "o_proj"]))
    optimizer = torch.optim.Adam(params, lr=2e-2)
    batch = tokenize_pairs(policy, [{"prompt": "rev abc=", "chosen": "cba", "rejected": "abc"}], text_config)
    objective = build_objective("text-dpo", {"beta": 0.5})
    ctx = UpdateContext(policy, [], lambda: (optimizer.step(), optimizer.zero_grad())[0] or 0.0,
                        torch.Generator().manual_seed(0))
    losses = [objective.update(batch, ctx)["loss"] for _ in range(15)]
    assert losses[-1] < losses[0] - 0.1


def test_rloo_advantages_of_a_real_rollout_are_the_hand_computed_leave_one_out(tiny_lm, tmp_path):
    trainer = trainer_of(text_recipe(tmp_path, tiny_lm, objective={"name": "text-rloo"}))
    batch = trainer.source.next()
    adv, _ = trainer.objective.advantages(batch, context(trainer.adapter))
    r = batch.rewards.tolist()
    for i in range(len(r)):
        group = [j for j in range(len(r)) if batch.group_ids[j] == batch.group_ids[i]]
        baseline = sum(r[j] for j in group if j != i) / (len(group) - 1)
        assert float(adv[i]) == pytest.approx(r[i] - baseline, abs=1e-6)


def test_best_of_n_fine_tunes_on_each_groups_argmax(tiny_lm, tmp_path):
    trainer = trainer_of(text_recipe(tmp_path, tiny_lm, objective={"name": "text-best-of-n"}))
    batch = trainer.source.next()
    fitted: list[list[str]] = []
    real = trainer.adapter.rollout_log_probs
    trainer.adapter.rollout_log_probs = lambda sub: (fitted.append(sub.texts), real(sub))[1]
    out = trainer.update(batch)
    rewards = batch.rewards.view(-1, 4)
    best = [batch.rollout.texts[4 * g + int(torch.nonzero(rewards[g] == rewards[g].max())[0])] for g in range(4)]
    winners = fitted[0]
    assert out["kept"] == 4.0 and len(winners) == 4
    for g in range(4):  # each fitted completion has its group's highest reward
        texts = batch.rollout.texts[4 * g:4 * g + 4]
        assert max(rewards[g][k] for k in range(4) if texts[k] == winners[g]) == rewards[g].max()
    assert out["kept_reward"] == pytest.approx(float(rewards.max(dim=1).values.mean()))
    assert best  # the hand-picked argmax exists for every group


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_is_on_policy_at_the_first_step(tiny_lm, tmp_path, loss_type):
    trainer = trainer_of(text_recipe(tmp_path, tiny_lm, objective={"name": "text-grpo",
                                                                   "params": {"loss_type": loss_type, "beta": 0.04}}))
    out = trainer.update(trainer.source.next())
    assert out["ratio"] == pytest.approx(1.0, abs=1e-6)  # the rollout's log-probs are the trained ones
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA is the reference
    assert out["clip_ratio_low"] == 0.0 and out["clip_ratio_high"] == 0.0 and math.isfinite(out["grad_norm"])


def test_grpo_raises_a_verifiable_reward_in_a_seeded_cpu_run(tiny_lm, tmp_path):
    recipe = text_recipe(tmp_path, tiny_lm, objective={"name": "text-grpo", "params": {"loss_type": "dapo"}},
                         model={"lora_rank": 0}, optim={"lr": 1e-2}, run={"iterations": 25, "seed": 0})
    summary = trainer_of(recipe).run(resume=False)
    # mean reward of the first and last fifth of the run: the fraction of 'a' in the completions
    assert summary["train_reward_last"] > summary["train_reward_first"] + 0.15, summary


def test_gdpo_and_par_apply_to_text_unchanged(tiny_lm, tmp_path):
    table = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p, "ref_rewards": {"count-a": 0.3}} for p in ["rev abc=", "sort cab=", "shift dd=", "rev hg="]]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    terms = [{"scorer": "tests.text.rewards:count_a", "transform": {"kind": "par"}},
             {"scorer": "tests.text.rewards:short", "weight": 0.5}]
    recipe = text_recipe(tmp_path, tiny_lm, sample={"prompts": str(table)},
                         reward={"terms": terms, "aggregation": "gdpo"})
    trainer = trainer_of(recipe)
    batch = trainer.source.next()
    rollout = batch.rollout
    # the same RewardSpec, called directly on the completions, gives the source's numbers
    spec = RewardSpec.from_config({"terms": terms, "aggregation": "gdpo", "modality": "text"})
    direct = spec.for_update(ScoreBatch(prompts=rollout.prompts, texts=rollout.texts,
                                        metadata=rollout.extras["metadata"]), group_ids=rollout.prompts)
    torch.testing.assert_close(batch.advantages, direct.advantages)
    raw = torch.tensor([c.count("a") / len(c) if c else 0.0 for c in rollout.texts])
    torch.testing.assert_close(batch.per_scorer["count-a"], torch.sigmoid(raw - 0.3))  # PAR: σ(r − r_ref)
    summed = RewardSpec.from_config({"terms": terms, "modality": "text"}).for_update(
        ScoreBatch(prompts=rollout.prompts, texts=rollout.texts, metadata=rollout.extras["metadata"]),
        group_ids=rollout.prompts)
    assert not torch.allclose(summed.advantages, batch.advantages)  # GDPO's own advantages, not the weighted sum's
