"""Tiny random-init vision-language models of every yes-token family, written offline with their processors.

Each family gets a folder (``config.json``, ``model.safetensors``, ``tokenizer.json`` + ``tokenizer_config.json``
with the chat template, ``processor_config.json``) that the scorer loads through the real path:
``AutoProcessor.from_pretrained(folder)`` and ``AutoModelForImageTextToText.from_pretrained(folder)``.

Tokenizers are small BPE vocabularies trained in code with the ``tokenizers`` library on a corpus containing the
template words, so that "Yes", " Yes", "yes", " yes", "No", ... are single tokens, plus the family's special
tokens. Qwen2-VL and Idefics3 use byte-level BPE (``ĠYes``), LLaVA a SentencePiece-style Metaspace BPE (``▁Yes``),
as the real checkpoints do. Chat templates are simplified copies of the real ones (same special tokens and turn
layout). Text hidden sizes are 32, 1–2 layers; vision towers 1 layer; images are resized to ≤ 32 px.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = [
    "Yes", "No", "yes", "no", " Yes yes Yes No no No yes no Yes. No.",
    'Does this figure show "a red circle"? Please answer Yes or No.',
    "Does this video show two blue squares? Is the first image better than the second with respect to quality",
    "how well it matches the prompt a green triangle above a cyan circle. Is there a shape? Is it red?",
    "system user assistant USER: ASSISTANT: User: Assistant: You are a helpful assistant.",
    "You compare two images generated for the same prompt and judge which one is better.\n",
]

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
# llava-hf/llava-1.5-7b-hf's template: no system turn, images first, "ASSISTANT:" as the generation prompt.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

IDEFICS3_SPECIAL = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                     "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
# HuggingFaceTB/SmolVLM-Instruct's template: "User:<image>text<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def write_tokenizer(folder: Path, special: list[str], *, metaspace: bool, config: dict[str, Any]) -> None:
    """Train a ~400-token BPE on :data:`CORPUS` and save ``tokenizer.json`` + ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in special else None))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(CORPUS).replace(" ", "▁")) | {"▁"})
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400 + len(special), special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096, **config}), encoding="utf-8")


def _save_spread(model, folder: Path) -> None:
    """Re-draw every weight matrix with std 0.3 and save as safetensors.

    Default init (std 0.02) makes a tiny random VLM answer almost the same for every image, so tests of padding,
    pairwise symmetry or gradients would pass for a scorer that ignored the pixels; wider weights make the answer
    depend visibly on the image and the question.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)


def _tok(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def build_qwen2_vl(folder: Path, *, qwen25: bool = False) -> None:
    """Qwen2-VL (or Qwen2.5-VL): 4-px patches, 2×2 merge, images resized to 16–32 px sides."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    write_tokenizer(folder, QWEN_SPECIAL, metaspace=False,
                    config={"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
                            "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": QWEN_TEMPLATE})
    tok = _tok(folder)
    sizes = {"min_pixels": 16 * 16, "max_pixels": 32 * 32, "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, pad_token_id=0,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    if qwen25:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2)
    processor = Processor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                          video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=QWEN_TEMPLATE)
    processor.save_pretrained(folder)
    _save_spread(Model(Config(text_config=text, vision_config=vision, **ids)), folder)


def build_llava(folder: Path) -> None:
    """LLaVA-1.5: CLIP vision tower on 16-px crops (4-px patches + CLS), Llama text model."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    write_tokenizer(folder, LLAVA_SPECIAL, metaspace=True,
                    config={"tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>",
                            "unk_token": "<unk>", "pad_token": "<pad>", "chat_template": LLAVA_TEMPLATE})
    tok = _tok(folder)
    image_processor = LlavaImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    processor.save_pretrained(folder)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.convert_tokens_to_ids("<pad>"))
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=16, vision_feature_select_strategy="default", vision_feature_layer=-1)
    _save_spread(LlavaForConditionalGeneration(config), folder)


def build_idefics3(folder: Path) -> None:
    """Idefics3 (SmolVLM's architecture): 16-px tiles of 4-px patches, pixel shuffle 2 → 4 tokens per tile."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaConfig,
    )

    write_tokenizer(folder, IDEFICS3_SPECIAL, metaspace=False,
                    config={"tokenizer_class": "TokenizersBackend", "eos_token": "<end_of_utterance>",
                            "pad_token": "<|endoftext|>", "chat_template": IDEFICS3_TEMPLATE})
    tok = _tok(folder)
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)
    processor.save_pretrained(folder)
    tok = processor.tokenizer
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    config = Idefics3Config(vision_config=vision, text_config=text.to_dict(), scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    _save_spread(Idefics3ForConditionalGeneration(config), folder)


FAMILY_BUILDERS = {"qwen2.5-vl": lambda f: build_qwen2_vl(f, qwen25=True), "qwen2-vl": build_qwen2_vl,
                   "llava": build_llava, "idefics3": build_idefics3}


def family_of_hub_id(hub_id: str) -> str:
    """Which tiny family stands in for a card's real checkpoint."""
    name = hub_id.lower()
    for key, family in (("qwen2.5-vl", "qwen2.5-vl"), ("qwen2-vl", "qwen2-vl"), ("llava", "llava"),
                        ("smolvlm", "idefics3"), ("idefics3", "idefics3")):
        if key in name:
            return family
    raise ValueError(f"No tiny VLM family stands in for {hub_id!r}; known: {sorted(FAMILY_BUILDERS)}.")


def build_family(family: str, folder: Path) -> Path:
    """Write the tiny model of ``family`` under ``folder/vlm-<family>`` once; return that folder."""
    target = Path(folder) / f"vlm-{family}"
    if not (target / "model.safetensors").is_file():
        FAMILY_BUILDERS[family](target)
    return target


def build_vlm_yes(card, folder: Path) -> dict[str, Any]:
    """``BUILDERS`` entry for ``VlmYesScorer``: a tiny model of the card's family as ``weights.local_dir``."""
    # Cards of shipped local models (shapes-vlm) have no hub id; they name their family in params.family.
    target = build_family(family_of_hub_id(str(card.weights.get("hub_id") or card.params.get("family", ""))), folder)
    return {"weights": {"local_dir": str(target)}}
