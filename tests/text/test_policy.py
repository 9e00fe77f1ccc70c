"""The causal-LM policy on a tiny random Llama: G completions with exact token log-probs, left padding, seeding,
stop strings, chat templates, LoRA round trip (docs/methods.md#text-core)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from visalign.generators import LoraSpec
from visalign.text.policy import CausalLMPolicy, ChatTemplateError

TARGETS = ["q_proj", "v_proj"]


def test_generate_groups_left_padding_and_exact_log_probs(policy, text_config):
    prompts = ["rev abc=", "sort hgfedcba="]  # different lengths: the short one is left-padded
    rollout = policy.generate(prompts, text_config, completions_per_prompt=3, seed=7)
    assert rollout.prompts == [prompts[0]] * 3 + [prompts[1]] * 3 and len(rollout.texts) == 6
    assert rollout.prompt_mask[0, 0] == 0 and rollout.prompt_mask[3].all()  # left padding
    assert rollout.completion_ids.shape == rollout.log_probs.shape == rollout.completion_mask.shape
    assert rollout.completion_ids.shape[1] <= text_config.max_new_tokens
    assert torch.all(rollout.log_probs[rollout.completion_mask == 0] == 0)
    assert torch.all(rollout.log_probs[rollout.completion_mask > 0] < 0)
    # ratio 1 on-policy: the objectives' own log-prob function, with gradients, gives the rollout's numbers
    again = policy.rollout_log_probs(rollout).log_probs
    assert torch.equal(again.detach(), rollout.log_probs)
    # ... and matches a plain unpadded forward pass of one sample (left padding and positions are right)
    row = 0
    n = int(rollout.completion_mask[row].sum())
    prompt = rollout.prompt_ids[row][rollout.prompt_mask[row] > 0]
    ids = torch.cat([prompt, rollout.completion_ids[row, :n]])[None]
    logits = policy.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    plain = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
    torch.testing.assert_close(rollout.log_probs[row, :n], plain, atol=1e-5, rtol=1e-5)


def test_a_sample_does_not_depend_on_its_batch(policy, text_config):
    alone = policy.generate(["shift abc="], text_config, completions_per_prompt=2, seed=11)
    mixed = policy.generate(["shift abc=", "rev hhhhhh="], text_config, completions_per_prompt=2, seed=11)
    assert mixed.texts[:2] == alone.texts
    assert policy.generate(["shift abc="], text_config, completions_per_prompt=2, seed=12).seeds == [12, 13]


def test_greedy_is_deterministic_and_eos_first_leaves_one_trained_token(policy, text_config):
    greedy = [policy.generate(["rev abc="], text_config, temperature=0.0).texts for _ in range(2)]
    assert greedy[0] == greedy[1]
    eos = policy.tokenizer.eos_token_id

    def eos_first(module, inputs, logits):  # make EOS the only likely token: every completion is empty
        return logits + 50.0 * torch.nn.functional.one_hot(torch.tensor(eos), logits.shape[-1]).to(logits)

    policy.model.lm_head.register_forward_hook(eos_first)
    rollout = policy.generate(["rev abc=", "sort ba="], text_config, completions_per_prompt=2, seed=0)
    assert rollout.texts == [""] * 4 and rollout.ended.all()
    assert rollout.lengths.tolist() == [1.0] * 4  # the decision to stop is still trained


def test_stop_strings_end_and_cut_the_completion(policy, text_config):
    free = policy.generate(["rev abc="], dataclasses.replace(text_config, max_new_tokens=12), seed=3,
                           completions_per_prompt=4)
    letter = next(c for t in free.texts for c in t if c.strip())  # a character the model does produce
    stopped = policy.generate(["rev abc="], dataclasses.replace(text_config, max_new_tokens=12, stop=[letter]),
                              seed=3, completions_per_prompt=4)
    decode = policy.tokenizer.decode
    for before, after, ids, mask in zip(free.texts, stopped.texts, stopped.completion_ids, stopped.completion_mask,
                                        strict=True):
        if letter in before:
            assert after == before[: before.index(letter)]
            n = int(mask.sum())  # trained tokens end on the one that completed the stop string
            assert letter in decode(ids[:n], skip_special_tokens=True)
            assert letter not in decode(ids[: n - 1], skip_special_tokens=True)


def test_chat_template_missing_and_present(policy, text_config):
    with pytest.raises(ChatTemplateError, match="has no chat_template.*text.chat_template=false"):
        policy.format_prompts(["rev abc="], dataclasses.replace(text_config, chat_template=True))
    assert policy.format_prompts(["rev abc="], dataclasses.replace(text_config, chat_template=None)) == ["rev abc="]
    policy.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'][0] }} {{ m['content'] }} {% endfor %}"
                                      "{% if add_generation_prompt %}a={% endif %}")
    config = dataclasses.replace(text_config, chat_template=None, system_prompt="be")
    assert policy.format_prompts(["rev abc="], config) == ["s be u rev abc= a="]
    assert len(policy.generate(["rev abc="], config, completions_per_prompt=2).texts) == 2


def test_bad_prompts_are_refused(policy, text_config):
    with pytest.raises(TypeError, match="not a single string"):
        policy.generate("rev abc=", text_config)
    with pytest.raises(ValueError, match="prompt list is empty"):
        policy.generate([], text_config)
    with pytest.raises(ValueError, match="have no tokens"):
        policy.generate([""], text_config)


def test_lora_trains_only_adapters_and_round_trips(policy, text_config, tiny_lm, tmp_path):
    params = policy.add_lora(LoraSpec(rank=4, alpha=4.0, target_modules=TARGETS))
    assert params and all("lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)
    rollout = policy.generate(["rev abc="], text_config, completions_per_prompt=2, seed=1)
    policy.rollout_log_probs(rollout).log_probs.sum().backward()
    assert all(p.grad is not None for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    with policy.lora_disabled():
        base = policy.rollout_log_probs(rollout).log_probs
    tuned = policy.rollout_log_probs(rollout).log_probs.detach()
    assert not torch.allclose(base, tuned)
    policy.save(tmp_path / "lora")
    loaded = CausalLMPolicy.from_pretrained(tiny_lm, lora=tmp_path / "lora")
    torch.testing.assert_close(loaded.rollout_log_probs(rollout).log_probs.detach(), tuned)
    with pytest.raises(ValueError, match="do not fit this causal LM"):
        CausalLMPolicy.from_pretrained(tiny_lm).add_lora(LoraSpec(target_modules=["to_q"]))
