"""Groundwork for ``visalign shapes build``: the seeded training-data stream and the word-level tokenizer.

The asset build (a tiny latent diffusion pipeline, a video pipeline, a contrastive open_clip proxy and a
yes/no VLM, docs/architecture.md#shapes-world) trains on scenes rendered and captioned on the fly, never on a
stored dataset: :func:`iter_image_batches` and :func:`iter_video_batches` are infinite, deterministic streams
for a seed. :func:`write_clip_tokenizer` writes the stock ``CLIPTokenizer`` folder every text tower of the
world shares, with one token per caption word (docs/shapes.md#pitfalls: a hand-written merge chain breaks because
BPE merge ranks interfere across words, so the merges are *trained*, by a small deterministic BPE).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visalign.shapes.grammar import caption, vocabulary
from visalign.shapes.render import render_scene, render_video
from visalign.shapes.world import (
    IMAGE_MIX,
    PromptSpec,
    sample_motion_spec,
    sample_prompt_spec,
    sample_scene,
    sample_video_scene,
)

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


@dataclass
class ShapesDataConfig:
    """What the on-the-fly training stream draws; one seed fixes every batch."""

    seed: int = field(default=0, metadata={"help": "Seed of the stream; the same seed yields the same batches."})
    batch_size: int = field(default=64, metadata={"help": "Samples per yielded batch."})
    size_px: int = field(default=32, metadata={"help": "Side of the square images in pixels (the world uses 32-64)."})
    split: str = field(default="train", metadata={"help": "Compositions to draw: 'train' or 'heldout'."})
    mix: dict[str, float] = field(default_factory=lambda: dict(IMAGE_MIX), metadata={
        "help": "Share of single / count / relation prompts among images (normalised; ignored for videos)."})
    num_frames: int = field(default=8, metadata={"help": "Frames per clip for video batches (the world uses 8-16)."})
    paraphrase: bool = field(default=True, metadata={
        "help": "Draw a random wording of each caption; false uses the canonical wording only."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least 1.")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout'; got {self.split!r}.")
        unknown = set(self.mix) - set(IMAGE_MIX)
        if unknown or not self.mix or min(self.mix.values()) < 0 or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix {self.mix} must give non-negative shares to some of {sorted(IMAGE_MIX)}.")
        if self.num_frames < 2:
            raise ValueError(f"num_frames ({self.num_frames}) must be at least 2 for motion to be visible.")


@dataclass
class ShapesBatch:
    """One batch of the stream.

    Attributes:
        media: float32 in [0, 1], ``[B, 3, H, W]`` (images) or ``[B, T, 3, H, W]`` (videos).
        captions: B captions of the grammar, one per sample.
        specs: B parsed specs (what the oracle grades against).
    """

    media: np.ndarray
    captions: list[str]
    specs: list[PromptSpec]


def iter_image_batches(config: ShapesDataConfig) -> Iterator[ShapesBatch]:
    """An endless, seeded stream of rendered, captioned still scenes.

    >>> batch = next(iter_image_batches(ShapesDataConfig(batch_size=2)))
    >>> batch.media.shape, len(batch.captions)
    ((2, 3, 32, 32), 2)
    """
    rng = np.random.default_rng(config.seed)
    while True:
        specs = [sample_prompt_spec(rng, config.split, config.mix) for _ in range(config.batch_size)]
        media = np.stack([render_scene(sample_scene(s, rng), config.size_px) for s in specs])
        yield ShapesBatch(media, _captions(specs, rng, config.paraphrase), specs)


def iter_video_batches(config: ShapesDataConfig) -> Iterator[ShapesBatch]:
    """An endless, seeded stream of rendered, captioned motion clips ``[B, T, 3, H, W]``."""
    rng = np.random.default_rng(config.seed)
    while True:
        specs = [sample_motion_spec(rng, config.split) for _ in range(config.batch_size)]  # type: ignore[arg-type]
        media = np.stack([render_video(sample_video_scene(s, rng, config.num_frames), config.size_px)
                          for s in specs])
        yield ShapesBatch(media, _captions(specs, rng, config.paraphrase), list(specs))


def _captions(specs: list[PromptSpec], rng: np.random.Generator, paraphrase: bool) -> list[str]:
    return [caption(s, rng if paraphrase else None) for s in specs]


# ---------------------------------------------------------------- tokenizer


def train_word_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE merges (CLIP format, end-of-word suffix ``</w>``) until every word is one symbol.

    Each step merges the most frequent adjacent pair over ``words``, ties broken by the pair's spelling, so
    the merge list is a pure function of the word list. (HF ``tokenizers``' trainer breaks ties by hash-map
    order, which changed token ids between two runs of the same build; a text model's embedding rows are
    indexed by those ids, so the build would not be reproducible.)

    Args:
        words: distinct lower-case words.

    Returns:
        Merges in rank order, as ``merges.txt`` lists them.
    """
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in pieces.values():
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, symbols in pieces.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            pieces[word] = merged


def write_clip_tokenizer(folder: str | Path, max_length: int = 16) -> Path:
    """Write a ``CLIPTokenizer`` folder whose vocabulary holds every caption word as one token.

    Merges come from :func:`train_word_bpe` on the grammar's vocabulary; ``vocab.json`` holds the special
    tokens, the single characters (with and without ``</w>``) and every merge result, in that fixed order, and
    ``merges.txt`` uses CLIP's format. The folder is reloaded through ``CLIPTokenizer.from_pretrained`` to add
    the tokenizer config. Pad and unknown tokens are ``<|endoftext|>``, as in CLIP, so a text model built
    with this tokenizer must use ``bos_token_id = tokenizer.bos_token_id`` and
    ``eos_token_id = pad_token_id = tokenizer.eos_token_id`` (see :func:`tokenizer_summary`).

    Args:
        folder: created if missing; existing tokenizer files are overwritten.
        max_length: ``model_max_length`` in tokens, BOS and EOS included (the longest caption needs 14).

    Returns:
        The folder, loadable with ``transformers.CLIPTokenizer.from_pretrained``.
    """
    from transformers import CLIPTokenizer

    words = vocabulary()
    longest = max(len(c.split()) for c in _longest_captions()) + 2
    if max_length < longest:
        raise ValueError(f"max_length={max_length} cannot hold the longest caption ({longest} tokens with BOS/EOS).")
    merges = train_word_bpe(words)
    chars = sorted({ch for w in words for ch in w})
    tokens = [BOS_TOKEN, EOS_TOKEN, *chars, *(ch + "</w>" for ch in chars), *(a + b for a, b in merges)]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(str(out), model_max_length=max_length, bos_token=BOS_TOKEN,
                                              eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    tokenizer.save_pretrained(str(out))
    _check_one_token_per_word(tokenizer, words)
    return out


def _longest_captions() -> list[str]:
    from visalign.shapes.grammar import all_captions
    from visalign.shapes.world import all_prompt_specs

    return [c for kind in ("relation", "motion") for c in all_captions(all_prompt_specs(kind)[0])]


def _check_one_token_per_word(tokenizer: Any, words: list[str]) -> None:
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise RuntimeError(f"Tokenizer splits caption words {split}; raise the BPE vocabulary size.")


def tokenizer_summary(folder: str | Path) -> dict[str, Any]:
    """Vocabulary size and special-token ids of a written tokenizer folder (for text-model configs)."""
    vocab = json.loads((Path(folder) / "vocab.json").read_text(encoding="utf-8"))
    return {"vocab_size": len(vocab), "bos_token_id": vocab[BOS_TOKEN], "eos_token_id": vocab[EOS_TOKEN],
            "pad_token_id": vocab[EOS_TOKEN]}
