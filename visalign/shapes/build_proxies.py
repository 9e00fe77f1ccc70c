"""Learned proxy rewards of the shapes world: a tiny contrastive CLIP and a tiny yes/no VLM, trained on renders.

Part of ``visalign shapes build`` (docs/architecture.md#shapes-world). Both proxies train on scenes rendered on the fly
(:func:`visalign.shapes.build.iter_image_batches`, training compositions only) with *hard negatives*
(:mod:`visalign.shapes.negatives`: swapped colours or shapes, swapped order, another relation, a wrong count,
colour or shape), because a proxy that cannot tell those apart cannot carry a compositional reward
(docs/shapes.md#reward-fine-tuning: the prototype's CLIP reached 86% / 70% on such pairs and did not help alignment).

- :func:`build_clip_proxy`: a transformers ``CLIPModel`` (ViT on 4-px patches + the world's word-level
  ``CLIPTokenizer``) trained with InfoNCE over the batch's true captions *plus* two hard negatives per image,
  saved with its ``CLIPImageProcessor`` so ``ClipScorer`` (``hf`` backend) loads it from the folder.
- :func:`build_vlm_proxy`: a LLaVA-1.5-layout VLM (CLIP vision tower, projector, Llama text model, the llava-hf
  chat template) trained to answer the VQAScore question ``Does this figure show "{prompt}"? Please answer Yes or
  No.`` with "Yes" for the true caption and "No" for a hard negative; ``VlmYesScorer`` loads the folder.

Images are augmented with mild blur and noise and, when a VAE folder is given (``assets/shapes/t2i/vae``), a share of
them goes through the VAE round trip, so the proxies transfer to generated images. Training is seeded: for a seed
and a number of steps the weights are a pure function of both; ``minutes`` only caps the number of steps, and the
steps actually run are in the returned metrics.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.shapes.build import ShapesDataConfig, iter_image_batches, write_clip_tokenizer
from visalign.shapes.grammar import caption, vocabulary
from visalign.shapes.negatives import NEGATIVE_KINDS, hard_negative, sample_hard_negative
from visalign.shapes.world import PromptSpec

VQA_TEMPLATE = 'Does this figure show "{prompt}"? Please answer Yes or No.'
# Relations carry the binding and order the proxies must learn, so they get a larger share than in base training.
PROXY_MIX = {"single": 0.15, "count": 0.2, "relation": 0.65}
# Order negatives ("B left of A", "A right of B") are the ones a first run got wrong most (55% held-in, after 626
# steps, vs 93-100% for colour, shape, count and binding swaps), and relation order is exactly what the base model
# gets wrong (docs/shapes.md#generator), so half of the relation images draw their first negative from these kinds.
ORDER_KINDS = ("swap_order", "relation")
ORDER_SHARE = 0.5
# llava-hf/llava-1.5-7b-hf's chat template (no system turn, images first, "ASSISTANT:" as the generation prompt).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]


# ---------------------------------------------------------------- data


@dataclass
class ProxyBatch:
    """Images with their true captions and hard-negative captions.

    Attributes:
        images: float32 ``[B, 3, H, W]`` in [0, 1] (augmented).
        specs: B true specs; captions: B true captions (random wording).
        negatives: per image, K ``(kind, spec, caption)`` hard negatives.
    """

    images: Tensor
    specs: list[PromptSpec]
    captions: list[str]
    negatives: list[list[tuple[str, PromptSpec, str]]]


class Augment:
    """Mild blur, noise and (optionally) a VAE round trip, so proxies trained on renders also read generations.

    Args:
        vae: a diffusers ``AutoencoderKL`` or None.
        vae_fraction: share of each batch sent through the VAE (encode → mean latent → decode).
    """

    def __init__(self, vae: Any = None, vae_fraction: float = 0.5):
        self.vae, self.vae_fraction = vae, vae_fraction

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """images: float32 ``[B, 3, H, W]`` in [0, 1] → same shape, augmented, in [0, 1]."""
        b = images.shape[0]
        x = images
        if self.vae is not None:
            n = int(round(self.vae_fraction * b))
            with torch.no_grad():
                latents = self.vae.encode(x[:n] * 2 - 1).latent_dist.mean
                x = torch.cat([(self.vae.decode(latents).sample.clamp(-1, 1) + 1) / 2, x[n:]])
        sigma = torch.rand(b, generator=generator) * 0.8
        x = _blur(x, sigma)
        noise = torch.randn(x.shape, generator=generator) * (torch.rand(b, 1, 1, 1, generator=generator) * 0.04)
        return (x + noise).clamp(0.0, 1.0)


def _blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Per-image separable Gaussian blur with std ``sigma [B]`` in pixels (0 = unchanged), 5-tap kernel."""
    offsets = torch.arange(-2, 3, dtype=images.dtype)
    s = sigma.clamp(min=1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # [B, 5]
    b, c, h, w = images.shape
    x = images.reshape(1, b * c, h, w)
    k = kernel.repeat_interleave(c, 0)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(b * c, 1, 1, 5), groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(b * c, 1, 5, 1), groups=b * c)
    return x.reshape(b, c, h, w)


def iter_proxy_batches(seed: int, batch_size: int, negatives_per_image: int, augment: Augment,
                       split: str = "train", order_share: float = ORDER_SHARE) -> Iterator[ProxyBatch]:
    """An endless seeded stream of augmented renders with true and hard-negative captions (distinct kinds)."""
    stream = iter_image_batches(ShapesDataConfig(seed=seed, batch_size=batch_size, split=split, mix=PROXY_MIX))
    rng = np.random.default_rng([seed, 1])
    generator = torch.Generator().manual_seed(seed)
    for batch in stream:
        negatives = [sample_negatives(spec, rng, negatives_per_image, order_share) for spec in batch.specs]
        images = augment(torch.from_numpy(batch.media), generator)
        yield ProxyBatch(images, batch.specs, batch.captions, negatives)


def sample_negatives(spec: PromptSpec, rng: np.random.Generator, count: int, order_share: float = 0.0
                     ) -> list[tuple[str, PromptSpec, str]]:
    """``count`` hard negatives of ``spec`` as (kind, spec, caption), of distinct kinds while kinds remain; for a
    relation the first is an order negative (``ORDER_KINDS``) with probability ``order_share``."""
    kinds = list(NEGATIVE_KINDS[spec.kind])
    chosen: list[tuple[str, PromptSpec, str]] = []
    while len(chosen) < count:
        pool = tuple(kinds)
        if not chosen and spec.kind == "relation" and rng.random() < order_share:
            pool = ORDER_KINDS
        kind, negative = sample_hard_negative(spec, rng, pool)
        chosen.append((kind, negative, caption(negative, rng)))
        if len(kinds) > 1:
            kinds.remove(kind)
    return chosen


@dataclass
class EvalSet:
    """Fixed pairs for hard-negative accuracy: each image with its true caption and each applicable negative."""

    images: Tensor
    captions: list[str]
    negatives: list[str]
    kinds: list[str]
    owner: list[int]  # index of the image each (caption, negative) pair belongs to


def build_eval_set(split: str, num_images: int, seed: int = 12345, augment: Augment | None = None) -> EvalSet:
    """Renders of ``split`` compositions ('train' = held-in, 'heldout') with one negative of every applicable kind."""
    batch = next(iter_image_batches(ShapesDataConfig(seed=seed, batch_size=num_images, split=split,
                                                     mix=PROXY_MIX)))
    rng = np.random.default_rng([seed, 2])
    images = torch.from_numpy(batch.media)
    if augment is not None:
        images = augment(images, torch.Generator().manual_seed(seed))
    return eval_set_from(images, batch.specs, rng)


def eval_set_from(images: Tensor, specs: list[PromptSpec], rng: np.random.Generator) -> EvalSet:
    """Pairs every image (true for its spec) with one negative of each applicable kind, captions in random wording."""
    captions, negatives, kinds, owner = [], [], [], []
    for i, spec in enumerate(specs):
        for kind in NEGATIVE_KINDS[spec.kind]:
            negative = hard_negative(spec, kind, rng)
            if negative is None:
                continue
            captions.append(caption(spec, rng))
            negatives.append(caption(negative, rng))
            kinds.append(kind)
            owner.append(i)
    return EvalSet(images, captions, negatives, kinds, owner)


def hard_negative_accuracy(score: Callable[[Tensor, list[str]], Tensor], data: EvalSet,
                           batch_size: int = 256) -> dict[str, float]:
    """Share of pairs where ``score(image, true caption) > score(image, negative)``, overall and per kind.

    Args:
        score: ``(images [N, 3, H, W] in [0, 1], captions) -> [N]`` paired scores (a scorer's ``raw``).
        data: the pairs.

    Returns:
        ``{"all": acc, "<kind>": acc, ..., "pairs": n}``.
    """
    media = data.images[torch.tensor(data.owner)]
    true_scores, neg_scores = [], []
    for start in range(0, len(data.owner), batch_size):
        sl = slice(start, start + batch_size)
        true_scores.append(score(media[sl], data.captions[sl]).float().cpu())
        neg_scores.append(score(media[sl], data.negatives[sl]).float().cpu())
    correct = (torch.cat(true_scores) > torch.cat(neg_scores)).numpy()
    kinds = np.asarray(data.kinds)
    out = {"all": float(correct.mean()), "pairs": float(len(correct))}
    for kind in sorted(set(data.kinds)):
        out[kind] = float(correct[kinds == kind].mean())
    return out


# ---------------------------------------------------------------- CLIP proxy


def _clip_model(folder: Path, seed: int) -> tuple[Any, Any, Any]:
    """Write the tokenizer and image processor into ``folder``; return (model, tokenizer, preprocess)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from visalign.scorers.clip import hf_preprocess
    from visalign.shapes.build import tokenizer_summary

    write_clip_tokenizer(folder)
    ids = tokenizer_summary(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3)
    processor.save_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=ids["vocab_size"], hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=ids["bos_token_id"],
                         eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"]),
        vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=4),
        projection_dim=64)
    model = CLIPModel(config)
    return model, CLIPTokenizer.from_pretrained(folder), hf_preprocess(processor, "shapes-clip")


class _ClipEncoder:
    """Image and text embeddings exactly as ``ClipScorer``'s hf backend computes them (same tokenisation)."""

    def __init__(self, model: Any, tokenizer: Any, preprocess: Any):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess

    def images(self, images: Tensor) -> Tensor:
        out = self.model.get_image_features(pixel_values=self.preprocess(images))
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)

    def texts(self, texts: list[str]) -> Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)

    def cosine(self, images: Tensor, texts: list[str]) -> Tensor:
        return (self.images(images) * self.texts(texts)).sum(-1)


def clip_hard_negative_loss(encoder: _ClipEncoder, batch: ProxyBatch) -> Tensor:
    """Symmetric InfoNCE where each image's candidates also include every image's hard negatives.

    Candidates that are *true* for an image (another image of the same spec, or a negative that happens to equal
    the image's spec) are masked out instead of being pushed away.
    """
    b = len(batch.specs)
    neg_specs = [spec for row in batch.negatives for _, spec, _ in row]
    texts = batch.captions + [cap for row in batch.negatives for _, _, cap in row]
    img = encoder.images(batch.images)
    txt = encoder.texts(texts)
    scale = encoder.model.logit_scale.exp().clamp(max=100.0)
    logits = scale * img @ txt.T  # [B, B + B·K]
    column_specs = list(batch.specs) + neg_specs
    same = torch.tensor([[col == row for col in column_specs] for row in batch.specs])
    same[torch.arange(b), torch.arange(b)] = False
    logits = logits.masked_fill(same, -1e4)
    targets = torch.arange(b)
    loss_image = F.cross_entropy(logits, targets)
    loss_text = F.cross_entropy(logits[:, :b].T.masked_fill(same[:, :b].T, -1e4), targets)
    return 0.5 * (loss_image + loss_text)


def _train(params: list[Tensor], step_fn: Callable[[int], Tensor], max_steps: int, minutes: float, lr: float,
           desc: str, warmup: int = 30, decay: bool = True) -> dict[str, float]:
    """AdamW with warm-up and (``decay``) cosine decay over ``max_steps``; stops early when ``minutes`` run out."""
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * (
        0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps)) if decay else 1.0))
    start, losses, step = time.perf_counter(), [], 0
    bar = tqdm(total=max_steps, desc=desc, unit="step", dynamic_ncols=True)
    while step < max_steps and time.perf_counter() - start < 60 * minutes:
        loss = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
    bar.close()
    return {"steps": step, "seconds": time.perf_counter() - start, "loss_last": float(np.mean(losses[-20:]))}


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (None: leave torch's setting), restoring it afterwards.

    On a CPU shared with other jobs, small matrices and several threads spin at OpenMP barriers: the CLIP proxy's
    step measured 5 s with 2 threads and 0.17 s with 1 thread on a 2-core machine under load.
    """
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_vae(vae_dir: str | Path | None) -> Any:
    if vae_dir is None or not (Path(vae_dir) / "config.json").is_file():
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(vae_dir), use_safetensors=True).eval().requires_grad_(False)


def build_clip_proxy(out_dir: str | Path, minutes: float = 4.0, seed: int = 0, *, max_steps: int = 900,
                     batch_size: int = 64, lr: float = 1e-3, vae_dir: str | Path | None = None,
                     eval_images: int = 300, num_threads: int | None = 1,
                     order_share: float = ORDER_SHARE) -> dict[str, Any]:
    """Train the contrastive CLIP proxy and save it as a ``CLIPModel`` folder that ``ClipScorer`` loads.

    Args:
        out_dir: created; receives config.json, model.safetensors, the tokenizer, preprocessor_config.json and
            metrics.json.
        minutes: wall-clock cap on training (evaluation comes on top).
        seed: seeds the weights and the data stream.
        max_steps: optimizer steps (the cosine schedule's length).
        batch_size: images per step; each brings its true caption and two hard negatives.
        lr: peak AdamW learning rate.
        vae_dir: optional ``AutoencoderKL`` folder; half of each batch goes through its round trip.
        eval_images: images per split for the hard-negative accuracy in the returned metrics.
        num_threads: torch intra-op threads while building (see :func:`torch_threads`); None keeps the setting.
        order_share: share of relation images whose first negative is an order negative (``ORDER_KINDS``).

    Returns:
        Metrics: steps, seconds, final loss, and ``heldin`` / ``heldout`` hard-negative accuracy (overall and per
        kind) on plain ground-truth renders.
    """
    with torch_threads(num_threads):
        return _build_clip(Path(out_dir), minutes, seed, max_steps, batch_size, lr, vae_dir, eval_images, order_share)


def _build_clip(out: Path, minutes: float, seed: int, max_steps: int, batch_size: int, lr: float,
                vae_dir: str | Path | None, eval_images: int, order_share: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, preprocess = _clip_model(out, seed)
    encoder = _ClipEncoder(model, tokenizer, preprocess)
    batches = iter_proxy_batches(seed, batch_size, 2, Augment(_load_vae(vae_dir)), order_share=order_share)
    model.train()
    metrics: dict[str, Any] = _train(list(model.parameters()),
                                     lambda _: clip_hard_negative_loss(encoder, next(batches)),
                                     max_steps, minutes, lr, "shapes CLIP proxy")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        _evaluate_splits(metrics, encoder.cosine, eval_images)
    return _record(out, metrics, seed=seed, max_steps=max_steps, batch_size=batch_size, lr=lr,
                   order_share=order_share, vae=str(vae_dir) if vae_dir else None)


# ---------------------------------------------------------------- VLM proxy


def _write_vlm_tokenizer(folder: Path) -> Any:
    """A Metaspace BPE (as LLaVA's Llama tokenizer) over the VQAScore template and every caption word.

    Every word of the question and "Yes"/"No" become single tokens (the corpus repeats each word, and the
    vocabulary is large enough for all of them), so the model reads words, not letters.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    words = sorted(set(vocabulary()) | set(VQA_TEMPLATE.replace('"{prompt}"?', "").split())
                   | {"Yes", "No", "USER:", "ASSISTANT:", "Please", "answer", "or", '"', "?", "."})
    corpus = [" ".join(words), VQA_TEMPLATE.format(prompt="a red circle left of two blue squares"), "Yes No yes no"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(corpus).replace(" ", "▁")) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=LLAVA_SPECIAL, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus * 50, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"model_max_length": 512, "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "chat_template": LLAVA_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return AutoTokenizer.from_pretrained(folder)


def _vlm_model(folder: Path, seed: int, vision_init: str | Path | None = None) -> tuple[Any, Any]:
    """Write tokenizer + processor into ``folder``; return (LlavaForConditionalGeneration, LlavaProcessor).

    With ``vision_init`` (a CLIP proxy folder from :func:`build_clip_proxy`), the vision tower takes that model's
    vision config and weights: a from-scratch tower left the yes/no loss at chance (0.69) for 200 steps, while the
    CLIP tower already separates colour, shape and position.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    tok = _write_vlm_tokenizer(folder)
    image_processor = LlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                          image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    processor.save_pretrained(folder)
    torch.manual_seed(seed)
    clip = None
    if vision_init is not None:
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(str(vision_init), use_safetensors=True)
        vision = clip.config.vision_config
    else:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=4, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tok.convert_tokens_to_ids("<pad>"), bos_token_id=tok.convert_tokens_to_ids("<s>"),
                       eos_token_id=tok.convert_tokens_to_ids("</s>"),
                       # With the default std 0.02 the answer position attends uniformly over ~90 tokens and the
                       # yes/no loss sat at ln 2 for 200+ steps (it could not even fit one fixed batch); std 0.15
                       # fits a fixed batch in 30 steps.
                       initializer_range=0.15)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=64,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    if clip is not None:
        tower = model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps the transformer in .vision_model
        tower.load_state_dict(clip.vision_model.state_dict(), strict=True)
    return model, LlavaProcessor.from_pretrained(folder)


class _YesNo:
    """Teacher-forced yes/no logits of the LLaVA proxy, through the same processor call as ``VlmYesScorer``."""

    def __init__(self, model: Any, processor: Any):
        from visalign.scorers.vlm_answer import answer_token_ids

        self.model, self.processor = model, processor
        processor.tokenizer.padding_side = "left"
        self.prefix = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\0"}]}],
            add_generation_prompt=True, tokenize=False)
        self.yes_ids = answer_token_ids(processor.tokenizer, ["Yes", "yes"])
        self.no_ids = answer_token_ids(processor.tokenizer, ["No", "no"])
        if not self.yes_ids or not self.no_ids:
            raise RuntimeError("The proxy tokenizer does not spell Yes/No as single tokens.")

    def log_probs(self, images: Tensor, captions: list[str]) -> Tensor:
        """Log-softmax over the vocabulary at the answer position: float32 ``[N, V]``."""
        texts = [self.prefix.replace("\0", VQA_TEMPLATE.format(prompt=c)) for c in captions]
        inputs = self.processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt",
                                do_rescale=False)
        return torch.log_softmax(self.model(**inputs, logits_to_keep=1).logits[:, -1].float(), dim=-1)

    def p_yes(self, images: Tensor, captions: list[str]) -> Tensor:
        return torch.logsumexp(self.log_probs(images, captions)[:, self.yes_ids], dim=-1).exp()


def vlm_yes_no_loss(yes_no: _YesNo, batch: ProxyBatch) -> Tensor:
    """Cross-entropy of "Yes" on (image, true caption) and "No" on (image, a false caption).

    Odd images get the *next* image's caption as their false caption (an easy, many-attribute mismatch, as in
    image-text matching with in-batch negatives), even images their first hard negative. With hard negatives only,
    two runs stayed at ln 2 for 350 steps: every pair differs in one word, so there is no easy signal to start from.
    """
    b = len(batch.captions)
    negatives = []
    for i, row in enumerate(batch.negatives):
        other = (i + 1) % b
        easy = i % 2 == 1 and batch.specs[other] != batch.specs[i]
        negatives.append(batch.captions[other] if easy else row[0][2])
    captions = batch.captions + negatives
    images = torch.cat([batch.images, batch.images])
    log_probs = yes_no.log_probs(images, captions)
    yes = torch.logsumexp(log_probs[:b, yes_no.yes_ids], dim=-1)
    no = torch.logsumexp(log_probs[b:, yes_no.no_ids], dim=-1)
    return -(yes.mean() + no.mean()) / 2


def build_vlm_proxy(out_dir: str | Path, minutes: float = 4.0, seed: int = 0, *, max_steps: int = 500,
                    batch_size: int = 32, lr: float = 1e-3, vae_dir: str | Path | None = None,
                    eval_images: int = 300, num_threads: int | None = 1,
                    vision_init: str | Path | None = None, order_share: float = ORDER_SHARE) -> dict[str, Any]:
    """Train the LLaVA-layout yes/no proxy and save it as a folder that ``VlmYesScorer`` loads.

    Args:
        out_dir: created; receives config.json, model.safetensors, tokenizer and processor files, metrics.json.
        minutes: wall-clock cap on training (evaluation comes on top).
        seed: seeds the weights and the data stream.
        max_steps: optimizer steps (the cosine schedule's length).
        batch_size: images per step; each is asked about its true caption (answer Yes) and one hard negative (No).
        lr: peak AdamW learning rate.
        vae_dir: optional ``AutoencoderKL`` folder; half of each batch goes through its round trip.
        eval_images: images per split for the hard-negative accuracy (P(Yes | true) > P(Yes | negative)).
        num_threads: torch intra-op threads while building; None keeps the setting.
        vision_init: a CLIP proxy folder whose vision tower initialises the VLM's (build the CLIP first).
        order_share: share of relation images whose negative is an order negative (``ORDER_KINDS``).

    Returns:
        Metrics: steps, seconds, final loss, ``heldin`` / ``heldout`` hard-negative accuracy on ground-truth renders.
    """
    with torch_threads(num_threads):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model, processor = _vlm_model(out, seed, vision_init)
        yes_no = _YesNo(model, processor)
        batches = iter_proxy_batches(seed + 1, batch_size, 1, Augment(_load_vae(vae_dir)), order_share=order_share)
        model.train()
        metrics: dict[str, Any] = _train(list(model.parameters()), lambda _: vlm_yes_no_loss(yes_no, next(batches)),
                                         max_steps, minutes, lr, "shapes VLM proxy")
        model.eval()
        model.save_pretrained(out, safe_serialization=True)
        with torch.no_grad():
            _evaluate_splits(metrics, yes_no.p_yes, eval_images)
    return _record(out, metrics, seed=seed, max_steps=max_steps, batch_size=batch_size, lr=lr,
                   order_share=order_share, vae=str(vae_dir) if vae_dir else None)


def _evaluate_splits(metrics: dict[str, Any], score: Any, eval_images: int) -> None:
    """Hard-negative accuracy of ``score`` on held-in (train compositions) and held-out renders, into ``metrics``."""
    for split, name in (("train", "heldin"), ("heldout", "heldout")):
        metrics[name] = hard_negative_accuracy(score, build_eval_set(split, eval_images))


def _record(out: Path, metrics: dict[str, Any], **how: Any) -> dict[str, Any]:
    """Add how the proxy was built to its metrics, write ``metrics.json`` beside the weights, return them."""
    metrics.update(how)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
