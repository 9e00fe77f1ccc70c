"""Building text runs of the real engine on the tiny LM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

LETTER_PROMPTS = ["rev abc=", "sort cab=", "shift dd=", "rev hgf=", "sort eab=", "shift abc=", "rev ddd=", "sort g="]


def text_recipe(tmp_path: Path, lm: Path, **sections: Any) -> Path:
    """A recipe file for a text-grpo run on the LM folder ``lm`` with the letter prompts; ``sections`` update it."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(LETTER_PROMPTS) + "\n")
    recipe: dict[str, Any] = {
        "model": {"model": str(lm), "lora_rank": 8, "lora_alpha": 8.0,
                  "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "sample": {"prompts": str(prompts), "prompts_per_step": 4, "images_per_prompt": 4},
        "text": {"max_new_tokens": 6, "chat_template": False},
        "reward": {"terms": ["tests.text.rewards:count_a"]},
        "objective": {"name": "text-grpo"},
        "optim": {"lr": 1e-2},
        "run": {"output_dir": str(tmp_path / "run"), "iterations": 2, "checkpoint_every": 100, "progress": False,
                "tensorboard": False},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def trainer_of(recipe: Path, *overrides: str):
    from visalign.train.config import load_train_config
    from visalign.train.loop import Trainer

    return Trainer(load_train_config(recipe, list(overrides)))
