"""What a yes-token judge reads at its answer position (docs/methods.md#vqascore): the single-token ids of the answer
words in one tokenizer, and the optional log-σ head on the answer's hidden state (docs/methods.md#rm-uncertainty)."""

from __future__ import annotations

from typing import Any

import torch


def answer_token_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """The distinct single-token ids that spell any of ``words``, with and without a leading space.

    ``"Yes"`` is looked up as the vocabulary entry ``Yes`` and as the encodings of ``"Yes"`` and ``" Yes"``; only
    encodings that are exactly one token count (a variant split into pieces is not the model saying "Yes" in one
    step). Byte-level BPE (Qwen, SmolVLM) yields ``Yes``/``ĠYes``, SentencePiece (LLaVA's Llama) ``▁Yes``.

    Returns:
        Sorted list of token ids; empty when no variant is a single token.
    """
    vocab = tokenizer.get_vocab()
    ids: set[int] = set()
    for word in words:
        if word in vocab:
            ids.add(int(vocab[word]))
        for text in (word, " " + word):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(int(encoded[0]))
    return sorted(ids)


def uncertainty_head_for(model: Any) -> torch.nn.Linear:
    """A zero-initialised linear head ``[D] → 1`` (log σ = 0, σ = 1 at first) on the text model's hidden size."""
    config = model.config
    size = int(getattr(config, "text_config", config).hidden_size)
    head = torch.nn.Linear(size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head
