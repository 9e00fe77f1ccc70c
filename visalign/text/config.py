"""Text generation settings of a run: the ``text`` section of a recipe (docs/extending.md#configuration)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextConfig:
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per completion (EOS included)."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature of training rollouts; log-probs are of logits / temperature, as TRL's."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens only; 0 = all."})
    stop: list[str] = field(default_factory=list, metadata={
        "help": "Stop strings: a completion ends on the token that completes one; the text handed to the scorers "
                "ends before it (its tokens are still trained on, like EOS)."})
    chat_template: bool | None = field(default=None, metadata={
        "help": "Wrap each prompt as a user turn with the tokenizer's chat template (true: required, and a tokenizer "
                "without one is an error; false: raw prompt text; null: when the tokenizer has one)."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "A system turn put before every prompt when the chat template is used; null = none."})
    max_prompt_tokens: int = field(default=256, metadata={
        "help": "Prompts longer than this many tokens are cut from the left (the end of a prompt is kept)."})
    eval_temperature: float = field(default=0.0, metadata={
        "help": "Temperature of evaluation completions; 0 = greedy (one deterministic completion per prompt)."})
    eval_samples_per_prompt: int = field(default=1, metadata={
        "help": "Completions per eval prompt (seeded, so evals pair); eval rewards average over them."})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.max_prompt_tokens < 1:
            raise ValueError("text.max_new_tokens and text.max_prompt_tokens must be >= 1.")
        if self.temperature <= 0:
            raise ValueError(f"text.temperature must be > 0 for training rollouts (log-probs need a density); got "
                             f"{self.temperature}. Use text.eval_temperature=0 for greedy evaluation.")
        if self.eval_temperature < 0 or self.top_k < 0 or self.eval_samples_per_prompt < 1:
            raise ValueError("text.eval_temperature and text.top_k must be >= 0, text.eval_samples_per_prompt >= 1.")
        if any(not s for s in self.stop):
            raise ValueError("text.stop has an empty string; every stop string needs at least one character.")
