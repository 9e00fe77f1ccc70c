"""Fixtures of the text-core tests: a tiny random-init character-level Llama (built offline, once per session) and
policies over it."""

from __future__ import annotations

import pytest
import torch

TINY = {"hidden_size": 32, "layers": 1, "heads": 2}


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory):
    """A folder with a random-init 1-layer Llama and the text world's character tokenizer (no chat template)."""
    from visalign.text.build_world import WorldBuildConfig, build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = build_tokenizer()
    config = WorldBuildConfig(hidden_size=TINY["hidden_size"], layers=TINY["layers"], heads=TINY["heads"])
    model = build_model(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def policy(tiny_lm):
    """A fresh :class:`CausalLMPolicy` over the tiny LM."""
    from visalign.text.policy import CausalLMPolicy

    torch.manual_seed(0)
    return CausalLMPolicy.from_pretrained(tiny_lm)


@pytest.fixture
def text_config():
    from visalign.text.config import TextConfig

    return TextConfig(max_new_tokens=6, chat_template=False)
