"""Build the tiny text world (assets/textworld) reproducibly on a CPU: a character tokenizer, a ~100k-parameter
Llama trained on a noisy corpus of :mod:`visalign.text.world` tasks, and the prompt splits.

    python -m visalign.text.build_world --out assets/textworld

Writes ``lm/`` (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``),
``prompts/train.txt`` and ``prompts/heldout.txt`` (one prompt per line), and ``build.json`` (every setting, the
corpus loss and the base model's held-out accuracy). Everything random is seeded and the run uses one thread, so a
rebuild on the same software gives the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from visalign.text.world import ALPHABET, Task, noisy_answer, random_tasks

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]


@dataclass
class WorldBuildConfig:
    seed: int = field(default=0, metadata={"help": "Seed of the corpus, the prompt splits and the weights."})
    corpus_size: int = field(default=6000, metadata={"help": "Training examples in the noisy corpus."})
    correct_fraction: float = field(default=0.35, metadata={"help": "Fraction of corpus answers that are right."})
    train_prompts: int = field(default=512, metadata={"help": "RL training prompts (training-split words)."})
    heldout_prompts: int = field(default=128, metadata={"help": "Held-out prompts (held-out-split words)."})
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    layers: int = field(default=2, metadata={"help": "Transformer layers."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    steps: int = field(default=1500, metadata={"help": "Optimizer steps of the corpus fine-tune."})
    batch_size: int = field(default=64, metadata={"help": "Corpus examples per step."})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate (cosine decay to 10%)."})


def build_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast``: one token per character of the world, plus pad/eos/unk.

    No chat template: the world's prompts are raw text (``text.chat_template`` stays null or false).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join with nothing between them
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=32)


def build_model(config: WorldBuildConfig, vocab_size: int, pad_id: int, eos_id: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=2 *
    config.hidden_size,
                        num_hidden_layers=config.layers, num_attention_heads=config.heads,
                        num_key_value_heads=config.heads, max_position_embeddings=32, pad_token_id=pad_id,
                        eos_token_id=eos_id, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama)


def corpus_batch(tasks: list[Task], answers: list[str], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + answer + <eos>`` rows; labels are -100 on the prompt and padding (loss on answers)."""
    rows, labels = [], []
    for task, answer in zip(tasks, answers, strict=True):
        prompt = tokenizer(task.prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def train_on_corpus(model: Any, tokenizer: Any, config: WorldBuildConfig) -> list[float]:
    """Fine-tune on the noisy corpus; returns the loss every 100 steps."""
    rng = random.Random(config.seed)
    tasks = random_tasks(config.corpus_size, held_out=False, seed=config.seed + 1)
    answers = [noisy_answer(t, rng, config.correct_fraction) for t in tasks]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / config.steps * torch.pi)).item()))
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    losses = []
    for step in range(config.steps):
        pick = torch.randint(len(tasks), (config.batch_size,), generator=generator).tolist()
        batch = corpus_batch([tasks[i] for i in pick], [answers[i] for i in pick], tokenizer)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == config.steps - 1:
            losses.append(round(float(loss.detach()), 4))
    model.eval()
    return losses


def held_out_accuracy(folder: Path, prompts: list[str], *, temperature: float, seed: int = 1234) -> float:
    """Mean exact-match reward of one completion per prompt, sampled by the policy the trainer uses."""
    from visalign.text.config import TextConfig
    from visalign.text.policy import CausalLMPolicy
    from visalign.text.world import StringTaskReward

    policy = CausalLMPolicy.from_pretrained(folder)
    rollout = policy.generate(prompts, TextConfig(max_new_tokens=10), seed=seed, temperature=temperature)
    rewards = StringTaskReward()(prompts=rollout.prompts, completions=rollout.texts)
    return sum(r for r in rewards if r is not None) / len(rewards)


def build_world(out: Path, config: WorldBuildConfig) -> dict[str, Any]:
    """Write the world into ``out`` and return what ``build.json`` records."""
    torch.set_num_threads(1)  # bit-reproducible: reductions do not depend on a thread split
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    losses = train_on_corpus(model, tokenizer, config)
    lm = out / "lm"
    lm.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(lm, safe_serialization=True)
    tokenizer.save_pretrained(lm)
    prompts = out / "prompts"
    prompts.mkdir(exist_ok=True)
    train = [t.prompt for t in random_tasks(config.train_prompts, held_out=False, seed=config.seed + 2)]
    heldout = [t.prompt for t in random_tasks(config.heldout_prompts, held_out=True, seed=config.seed + 3)]
    (prompts / "train.txt").write_text("\n".join(train) + "\n")
    (prompts / "heldout.txt").write_text("\n".join(heldout) + "\n")
    record = {"config": asdict(config), "corpus_loss_every_100_steps": losses,
              "parameters": sum(p.numel() for p in model.parameters()),
              "base_heldout_accuracy": {"greedy": held_out_accuracy(lm, heldout, temperature=0.0),
                                        "sampled_t1": held_out_accuracy(lm, heldout, temperature=1.0)},
              "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny text world (a char-level Llama and its prompts).")
    parser.add_argument("--out", default="assets/textworld", help="Output folder (default assets/textworld).")
    parser.add_argument("--steps", type=int, default=WorldBuildConfig.steps, help="Corpus fine-tune steps.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of everything.")
    args = parser.parse_args(argv)
    record = build_world(Path(args.out), WorldBuildConfig(seed=args.seed, steps=args.steps))
    print(json.dumps({k: record[k] for k in ("parameters", "base_heldout_accuracy", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
