"""A tiny random-init text reward model (BERT sequence classifier, hidden 32, one layer) written offline.

The tokenizer is a ``tokenizers`` WordLevel model over a small vocabulary, saved as ``tokenizer.json`` and read
back with ``AutoTokenizer.from_pretrained(folder)``, the same path a real checkpoint takes. Pairs are encoded
BERT-style, ``[CLS] prompt [SEP] completion [SEP]`` with segment ids 0/1, as DeBERTa reward models read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = ("a an the red green blue cyan yellow circle circles square squares triangle above below left right of "
         "two three one answer yes no done is it what colour shape think user assistant < > / : ? . , "
         "0 1 2 3 4 5 6 7 8 9").split()
VOCAB = {token: index for index, token in enumerate(SPECIAL + WORDS)}
# A readable template with no special tokens of its own; the scorer must not add [CLS]/[SEP] on top of it.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"


def write_tiny_text_rm(folder: Path, *, num_labels: int = 1, padding_side: str = "right", seed: int = 0) -> Path:
    """Write a tiny ``BertForSequenceClassification`` and its tokenizer into ``folder`` (once) and return it.

    Args:
        folder: where ``config.json``, ``model.safetensors`` and the tokenizer files go.
        num_labels: logits per text; labels are named ``label_0``, ``label_1``, ...
        padding_side: what the saved tokenizer asks for (the scorer must give the same scores either way).
        seed: weights are a function of the seed only, so two folders with one seed hold the same model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    cls_id, sep_id = VOCAB["[CLS]"], VOCAB["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=64, padding_side=padding_side,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, type_vocab_size=2, pad_token_id=VOCAB["[PAD]"], num_labels=num_labels,
        id2label={i: f"label_{i}" for i in range(num_labels)}, label2id={f"label_{i}": i for i in range(num_labels)},
        # Wide init: scores of O(1) that differ clearly between texts, so a padding or pairing bug shows up.
        initializer_range=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def build_sequence_classifier(card: Any, folder: Path) -> dict[str, Any]:
    """BUILDERS entry for ``SequenceClassificationScorer``: a single-logit tiny RM, shared by every such card."""
    return {"weights": {"local_dir": str(write_tiny_text_rm(Path(folder) / "text-rm"))}}
