"""The tiny text world: string tasks with an exact checker, so text alignment can be measured (assets/textworld).

A prompt names an operation and a word over the letters ``a``–``h``, e.g. ``"rev cabd="``; the answer is the
operation applied to the word (``"dbac"``). The operations:

- ``rev``: the word reversed;
- ``sort``: its letters in alphabetical order;
- ``shift``: every letter moved one on in the alphabet (``h`` wraps to ``a``).

The world's base model (:mod:`visalign.text.build_world`) is fine-tuned on a *noisy* corpus in which only a
fraction of the answers are right and the rest are plausible mistakes (the word copied, another operation's answer),
so it can do every task but often does not: the exact checker :class:`StringTaskReward` gives RL something to raise.
Words are split between training and held-out by a hash of the word, so held-out accuracy measures generalisation to
words the policy never saw in its corpus or its RL prompts.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = "abcdefgh"
OPERATIONS: dict[str, Callable[[str], str]] = {
    "rev": lambda word: word[::-1],
    "sort": lambda word: "".join(sorted(word)),
    "shift": lambda word: "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in word),
}
# Every character a prompt or an answer can hold; the world's tokenizer has one token per character.
ALPHABET = sorted(set(LETTERS) | set("".join(OPERATIONS)) | {" ", "="})


@dataclass(frozen=True)
class Task:
    """One prompt of the world: an operation and a word."""

    operation: str
    word: str

    @property
    def prompt(self) -> str:
        return f"{self.operation} {self.word}="

    @property
    def answer(self) -> str:
        return OPERATIONS[self.operation](self.word)


def parse_prompt(prompt: str) -> Task | None:
    """The task a prompt poses, or None when it is not a world prompt (``"<op> <word>="``)."""
    head, sep, tail = prompt.strip().partition(" ")
    if not sep or not tail.endswith("=") or head not in OPERATIONS:
        return None
    word = tail[:-1]
    if not word or any(c not in LETTERS for c in word):
        return None
    return Task(head, word)


def is_held_out(word: str, fraction: float = 0.2) -> bool:
    """Whether a word belongs to the held-out split: a hash of the word, so the split never depends on order."""
    digest = int(hashlib.sha1(word.encode()).hexdigest()[:8], 16)
    return digest % 1000 < fraction * 1000


def random_tasks(count: int, *, held_out: bool, seed: int, min_length: int = 3, max_length: int = 6) -> list[Task]:
    """``count`` distinct tasks of one split, operations drawn uniformly (seeded)."""
    rng = random.Random(seed)
    tasks: list[Task] = []
    seen: set[Task] = set()
    while len(tasks) < count:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_length, max_length)))
        task = Task(rng.choice(sorted(OPERATIONS)), word)
        if is_held_out(word) == held_out and task not in seen:
            seen.add(task)
            tasks.append(task)
    return tasks


def noisy_answer(task: Task, rng: random.Random, correct_fraction: float) -> str:
    """The corpus answer of a task: right with probability ``correct_fraction``, else a plausible mistake (the word
    copied, or another operation's answer)."""
    if rng.random() < correct_fraction:
        return task.answer
    others = [op for op in sorted(OPERATIONS) if op != task.operation]
    mistakes = [task.word] + [OPERATIONS[op](task.word) for op in others]
    wrong = [m for m in mistakes if m != task.answer] or [task.word[1:] + task.word[:1]]
    return rng.choice(wrong)


class StringTaskReward:
    """The world's exact checker as a TRL reward function: 1.0 when the completion is the answer, else 0.0.

    Leading and trailing whitespace is ignored. A prompt that is not a world prompt gets ``None`` (the reward
    abstains; the combiner skips it), never a silent 0.

    A class, not a closure: rewards are shipped to worker processes, and closures do not pickle.

    >>> StringTaskReward()(prompts=["rev abc=", "sort cab=", "hello"], completions=["cba", "abc ", "x"])
    [1.0, 1.0, None]
    """

    __name__ = "string_task_accuracy"  # TRL logs a reward function under its __name__

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: object) -> list[float | None]:
        rewards: list[float | None] = []
        for prompt, completion in zip(prompts, completions, strict=True):
            task = parse_prompt(prompt)
            rewards.append(None if task is None else float(completion.strip() == task.answer))
        return rewards
