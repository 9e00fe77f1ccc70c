"""Tiny random-init CLIP models (HF transformers and open_clip) and a tiny embedding-MLP head, written offline.

Every builder writes real files (``config.json`` + ``model.safetensors``, a ``CLIPImageProcessor`` and a
``CLIPTokenizer``; or an open_clip ``open_clip_config.json`` + ``open_clip_model.safetensors``) so the scorer
loads them through its real loading path. Hidden size 32, one layer, 32 px images.

The tokenizers reuse the real CLIP BPE vocabulary that open_clip's wheel ships (49,408 tokens), so the text
towers keep CLIP's vocabulary size while everything else stays tiny.

Both towers get the *same* final layer-norm bias and the *same* projection. A random CLIP otherwise gives
image–text cosines of either sign, and CLIPScore's ``max(cos, 0)`` (or an affine clamp at 0) would zero every
gradient in the contract test; the shared component keeps cosines positive while still varying per input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visalign.scorers.card import ScorerCard

HIDDEN = 32
EMBED_DIM = 16
IMAGE_PX = 32
PATCH_PX = 8
SEED = 0


def write_clip_bpe_tokenizer_files(folder: Path) -> None:
    """Write HF-style ``vocab.json`` / ``merges.txt`` from the CLIP BPE file bundled with open_clip."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    # open_clip names the specials <start_of_text>/<end_of_text>; HF's CLIPTokenizer expects <|...|>.
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): idx for tok, idx in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.__getitem__)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")


def _shared_bias(generator: torch.Generator) -> torch.Tensor:
    return 2.0 + 0.3 * torch.randn(HIDDEN, generator=generator)


def build_hf_clip(folder: Path) -> Path:
    """Write a tiny ``CLIPModel`` + ``CLIPImageProcessor`` + ``CLIPTokenizer`` folder; return it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder) / "hf-clip"
    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(SEED)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": HIDDEN, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"image_size": IMAGE_PX, "patch_size": PATCH_PX, "hidden_size": HIDDEN, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 4},
        projection_dim=EMBED_DIM,
    )
    model = CLIPModel(config).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        bias = _shared_bias(g)
        model.vision_model.post_layernorm.bias.copy_(bias)
        model.text_model.final_layer_norm.bias.copy_(bias)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(folder, safe_serialization=True)
    # Processor defaults are CLIP's (bicubic, OpenAI mean/std); only the sizes shrink to the tiny tower.
    CLIPImageProcessor(size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX}
                       ).save_pretrained(folder)
    write_clip_bpe_tokenizer_files(folder)
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder


def build_open_clip(folder: Path) -> Path:
    """Write a tiny open_clip folder (``open_clip_config.json`` + ``open_clip_model.safetensors``); return it.

    The preprocessing config uses ImageNet mean/std on purpose, so tests can tell that the scorer reads
    mean/std from the model's config rather than assuming CLIP's.
    """
    import open_clip
    from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
    from safetensors.torch import save_file

    folder = Path(folder) / "open-clip"
    if (folder / "open_clip_model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "vision_cfg": {"image_size": IMAGE_PX, "layers": 1, "width": HIDDEN, "head_width": 8,
                           "patch_size": PATCH_PX},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": HIDDEN, "heads": 4, "layers": 1},
        },
        "preprocess_cfg": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    torch.manual_seed(SEED)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        bias = _shared_bias(g)
        model.visual.ln_post.bias.copy_(bias)
        model.ln_final.bias.copy_(bias)
        model.text_projection.copy_(model.visual.proj)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def tiny_head_layers() -> list[int]:
    """Layer widths of the tiny aesthetic head: the LAION layout's depth on the tiny embedding size."""
    return [EMBED_DIM, 32, 16, 8, 4, 1]


def build_embedding_head(folder: Path, layers: list[int], dropout: list[float]) -> Path:
    """Write a random MLP head in the LAION improved-aesthetic-predictor key layout (``layers.{i}.*``).

    The last bias is set to 5 so the raw score sits inside the card's affine window (1–10) and the clamp
    does not zero the gradient in the contract test.
    """
    from safetensors.torch import save_file

    from visalign.scorers.embedding_head import EmbeddingMLP

    path = Path(folder) / "tiny-head" / "head.safetensors"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    head = EmbeddingMLP(layers, dropout)
    with torch.no_grad():
        head.layers[-1].bias.fill_(5.0)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


def build_clip_scorer(card: ScorerCard, folder: Path) -> dict[str, Any]:
    """``tests.tiny`` builder for ``ClipScorer`` cards: the tiny folder of the card's backend."""
    backend = card.weights.get("backend", "open_clip")
    local_dir = build_hf_clip(folder) if backend == "hf" else build_open_clip(folder)
    return {"weights": {"local_dir": str(local_dir)}}


def build_embedding_head_scorer(card: ScorerCard, folder: Path) -> dict[str, Any]:
    """``tests.tiny`` builder for ``EmbeddingHeadScorer`` cards: tiny CLIP + tiny head + matching layer sizes."""
    overrides = build_clip_scorer(card, folder)
    layers = tiny_head_layers()
    dropout = list(card.params.get("head_dropout", [0.0] * (len(layers) - 1)))
    overrides["weights"]["head_file"] = str(build_embedding_head(folder, layers, dropout))
    overrides["params"] = {"head_layers": layers}
    return overrides
