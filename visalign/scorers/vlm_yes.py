"""Yes-token scoring with a vision-language model: reward = P("Yes" | media, question) (VQAScore).

References: VQAScore, Lin et al., arXiv 2404.01291, whose template and P(Yes) we follow
(linzhiqiu/t2v_metrics ``t2v_metrics/models/vqascore_models/qwen2vl_model.py``); the renormalised
P(yes)/(P(yes)+P(no)) as in X-GenGroup/Flow-Factory ``src/flow_factory/rewards/vllm_evaluate.py``; the pairwise
"is A better than the reference B" form from RewardDance (arXiv 2509.08826). See docs/methods.md#vqascore.

How a batch is scored, in ONE teacher-forced forward pass (no ``generate`` loop):

1. Each sample becomes one or more *queries*: a chat conversation (optional system text and text-only in-context
   examples from the card, then a user turn with the image(s) and the question) rendered by the model's own chat
   template with ``add_generation_prompt=True``, so the next token is the answer.
2. All queries of the batch are left-padded together and run through the model; the logits at the last position
   (the answer position) are read. With right padding the last non-padded position is gathered instead, so the
   padding side and the batch composition do not change a score.
3. P(yes) = Σ softmax(logits)[v] over the distinct single-token "Yes" variants v of *this* tokenizer
   (``"Yes"``, ``" Yes"``, ``"yes"``, ``" yes"`` by default: chat templates differ in whether a space precedes the
   answer, and models differ in its case). P(no) likewise; the renormalised score is P(yes)/(P(yes)+P(no)).

Modes (``params.mode``): ``pointwise``; ``pairwise`` against ``batch.references`` with both image orders averaged,
s = ½(P(yes | a, b) + 1 − P(yes | b, a)); ``multi-question``, the mean over questions from
``metadata[i]["questions"]`` or the card's ``params.questions``. Videos are F uniformly sampled frames passed as
several images, or (``video_input: native``, Qwen2-VL) as one video input. Family differences (system turn, tensor
pixel preprocessing, placeholder token counts, video input) live in :mod:`visalign.scorers.vlm_families`.

Batched cost: token ids, pixels and (Qwen2-VL) M-RoPE positions and vision-tower index tensors are built with
batched tensor ops (:mod:`visalign.scorers.vlm_inputs`) rather than by the processor and upstream's per-row loops,
so a batch costs little more Python than one sample; the first query of each input shape is checked against the
processor, and families without a tensor path (Idefics3) keep the processor.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visalign.scorers.base import RawScore, ScoreBatch, Scorer, WeightsUnavailableError
from visalign.scorers.card import ScorerCard
from visalign.scorers.vlm_answer import answer_token_ids, uncertainty_head_for
from visalign.scorers.vlm_families import FAMILIES, VlmFamily, family_for
from visalign.scorers.vlm_inputs import expand_placeholders, mrope_position_ids, qwen2_vl_encode

DEFAULT_TEMPLATE = 'Does this figure show "{prompt}"? Please answer Yes or No.'
DEFAULT_PAIRWISE_TEMPLATE = (
    "Is the first image better than the second with respect to {criteria}? Please answer Yes or No."
)
MODES = ("pointwise", "pairwise", "multi-question")
SCORES = ("p_yes", "p_yes_renorm")
VIDEO_INPUTS = ("frames", "native")
_SENTINEL = "\u2063VISALIGN-QUESTION\u2063"  # invisible separators: never part of a real question


def sample_frames(video: Tensor, num_frames: int) -> Tensor:
    """``num_frames`` frames spread uniformly over a clip (first and last included); all of them if fewer.

    Args:
        video: float in [0, 1], ``[T, 3, H, W]``.

    Returns:
        float ``[min(T, num_frames), 3, H, W]``, differentiable with respect to ``video``.
    """
    total = video.shape[0]
    if total <= num_frames:
        return video
    index = torch.linspace(0, total - 1, num_frames, device=video.device).round().long()
    return video[index]


class VlmYesScorer(Scorer):
    """P("Yes") of a transformers vision-language model (Qwen2-VL / Qwen2.5-VL, LLaVA, Idefics3 / SmolVLM).

    Card ``weights``: ``hub_id`` or ``local_dir`` (a folder with ``config.json``, safetensors weights and the
    processor files); optional ``processor_id``. Card ``params``:

    * ``mode``: ``pointwise`` | ``pairwise`` | ``multi-question`` (default ``pointwise``).
    * ``template``: the question, formatted with ``{prompt}`` (and ``{criteria}`` in pairwise mode).
    * ``criteria``: pairwise criteria, formatted with ``{prompt}``.
    * ``swap_average``: pairwise only; also ask with the images swapped and average (default true).
    * ``questions``: multi-question templates with ``{prompt}``, used when ``metadata[i]`` has no ``questions``.
    * ``question_template``: wraps each multi-question question (default ``"{question} Please answer Yes or No."``).
    * ``score``: which value is ``raw``, ``p_yes`` or ``p_yes_renorm``; the other is in ``extras``.
    * ``yes_words`` / ``no_words``: answer words (default ``["Yes", "yes"]`` / ``["No", "no"]``).
    * ``system``: instructions placed before the conversation; ``examples``: text-only in-context turns,
      ``[{prompt: ..., answer: Yes}]`` (or ``question:`` instead of ``prompt:``).
    * ``num_frames``: frames sampled from a video (default 8). ``family``: force a family from vlm_families.
    * ``video_input``: ``frames`` (default: the sampled frames are separate images) or ``native`` (one video input,
      ``pixel_values_videos`` + ``video_grid_thw``, for families that take video: Qwen2-VL).
    * ``uncertainty_head``: a safetensors file (relative to ``local_dir``) of a linear head on the answer-position
      hidden state giving log σ of the yes/no log-odds (``visalign rm train --loss gaussian-bt``); pointwise mode
      only. Extras then carry ``log_sigma`` and ``weight = exp(−σ²/τ)``, rescaled to mean 1 over the batch, which
      ``RewardSpec(uncertainty_weights=True)`` multiplies into the update (docs/methods.md#reward-models);
      ``uncertainty_tau``: τ (default 1).
    * ``fast_inputs``: build token ids, pixels and (Qwen2-VL) positions with batched tensor ops, checked once per
      input shape against the processor (default true); false always runs the processor.
    * ``trust_remote_code``: let transformers run code shipped with the weights (default false; only for
      checkpoints you trust).

    Example (tiny random model; real cards point at hub ids):

    >>> from tests.tiny import build_tiny_scorer  # doctest: +SKIP
    >>> scorer = build_tiny_scorer("vqascore-qwen2-vl-2b", tmp)  # doctest: +SKIP
    >>> out = scorer(ScoreBatch(prompts=["a red circle"], media=torch.rand(1, 3, 32, 32)))  # doctest: +SKIP
    >>> out.reward.shape, sorted(out.extras)  # doctest: +SKIP
    (torch.Size([1]), ['p_yes', 'p_yes_renorm'])
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        p = card.params
        self.mode = str(p.get("mode", "pointwise"))
        self.score_name = str(p.get("score", "p_yes"))
        where = f"in card {card.id!r}"
        if self.mode not in MODES:
            raise ValueError(f"params.mode {self.mode!r} {where} must be one of {MODES}.")
        if self.score_name not in SCORES:
            raise ValueError(f"params.score {self.score_name!r} {where} must be one of {SCORES}.")
        default = DEFAULT_PAIRWISE_TEMPLATE if self.mode == "pairwise" else DEFAULT_TEMPLATE
        self.template = str(p.get("template", default))
        self.criteria = str(p.get("criteria", 'how well it matches the prompt "{prompt}"'))
        self.swap_average = bool(p.get("swap_average", True))
        self.questions = [str(q) for q in p.get("questions", [])]
        self.question_template = str(p.get("question_template", "{question} Please answer Yes or No."))
        self.yes_words = [str(w) for w in p.get("yes_words", ["Yes", "yes"])]
        self.no_words = [str(w) for w in p.get("no_words", ["No", "no"])]
        self.system = p.get("system")
        self.examples = list(p.get("examples", []))
        self.num_frames = int(p.get("num_frames", 8))
        if self.num_frames < 1:
            raise ValueError(f"params.num_frames {self.num_frames} {where} must be >= 1.")
        self.video_input = str(p.get("video_input", "frames"))
        if self.video_input not in VIDEO_INPUTS:
            raise ValueError(f"params.video_input {self.video_input!r} {where} must be one of {VIDEO_INPUTS}.")
        self.fast_inputs = bool(p.get("fast_inputs", True))
        self.uncertainty_file = p.get("uncertainty_head")
        self.uncertainty_tau = float(p.get("uncertainty_tau", 1.0))
        if self.uncertainty_file and self.mode != "pointwise":
            raise ValueError(f"params.uncertainty_head {where} needs mode pointwise; got {self.mode!r}.")
        if self.uncertainty_tau <= 0:
            raise ValueError(f"params.uncertainty_tau {self.uncertainty_tau} {where} must be > 0.")
        self.uncertainty_head: torch.nn.Module | None = None

    # ------------------------------------------------------------------ loading
    def _source(self) -> str:
        w = self.card.weights
        if w.get("local_dir"):
            try:  # a card's relative folder (the shipped shapes proxy) means the repository's
                folder = self.card.resolve_path(str(w["local_dir"]))
            except FileNotFoundError:
                folder = Path(str(w["local_dir"])).expanduser()
            if not (folder / "config.json").is_file():
                raise WeightsUnavailableError(
                    f"Scorer {self.id!r}: local_dir {str(folder)!r} has no config.json; point it at a folder saved "
                    "with model.save_pretrained() and processor.save_pretrained().")
            return str(folder)
        if w.get("hub_id"):
            return str(w["hub_id"])
        raise ValueError(f"Card {self.id!r} names no weights; set weights.hub_id or weights.local_dir.")

    def load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = self._source()
        processor_source = str(self.card.weights.get("processor_id") or source)
        trust = bool(self.card.params.get("trust_remote_code", False))
        try:
            processor = AutoProcessor.from_pretrained(processor_source, trust_remote_code=trust)
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=self.dtype, use_safetensors=True,
                                                                trust_remote_code=trust)
        except (OSError, ValueError) as err:
            raise WeightsUnavailableError(
                f"Scorer {self.id!r} could not load {source!r}: the weights are not in the local Hugging Face cache "
                "and the hub is unreachable or disabled (HF_HUB_OFFLINE). Download them once on a machine with "
                f"network (`hf download {source}`), or pass a local folder: get_scorer({self.id!r}, "
                f"weights='/path/to/folder'). Cause: {type(err).__name__}: {err}") from err
        model.to(self.device).eval()
        model.requires_grad_(False)  # gradients are for the pixels, never the judge
        self.family: VlmFamily = family_for(model.config.model_type, self.card.params.get("family"))
        # Left padding puts every row's answer position at index -1, so only that position's logits are computed.
        processor.tokenizer.padding_side = "left"
        tokenizer = processor.tokenizer
        self.yes_ids = answer_token_ids(tokenizer, self.yes_words)
        self.no_ids = answer_token_ids(tokenizer, self.no_words)
        for words, ids in ((self.yes_words, self.yes_ids), (self.no_words, self.no_ids)):
            if not ids:
                raise ValueError(f"Scorer {self.id!r}: no variant of {words} is a single token for the tokenizer of "
                                 f"{source!r}; set params.yes_words/no_words to words it spells in one token.")
        shared = set(self.yes_ids) & set(self.no_ids)
        if shared:
            raise ValueError(f"Scorer {self.id!r}: yes and no answers share token ids {sorted(shared)}.")
        if self.video_input == "native" and self.family.video_pixels is None:
            native = sorted(f.name for f in FAMILIES.values() if f.video_pixels is not None)
            raise ValueError(f"Scorer {self.id!r}: params.video_input 'native' needs a family that takes video "
                             f"input ({native}); family {self.family.name!r} does not. Use video_input: frames.")
        self.processor, self.model = processor, model
        if self.uncertainty_file:
            self.uncertainty_head = self._load_uncertainty_head(Path(source) / str(self.uncertainty_file))
        self._render_cache: dict[tuple[str, int], str | None] = {}
        self._fast_checked: dict[tuple, bool] = {}
        self._splice_cache: dict[tuple[str, int], tuple[str, str, list[int], list[int]] | None] = {}

    def _load_uncertainty_head(self, path: Path) -> torch.nn.Module:
        from safetensors.torch import load_file

        if not path.is_file():
            raise WeightsUnavailableError(f"Scorer {self.id!r}: uncertainty head {str(path)!r} does not exist; "
                                          "retrain with visalign rm train --loss gaussian-bt or drop the param.")
        head = uncertainty_head_for(self.model)
        head.load_state_dict(load_file(str(path)), strict=True)
        return head.to(self.device).eval().requires_grad_(False)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("processor", "model", "family", "yes_ids", "no_ids", "_render_cache", "_fast_checked",
                    "_splice_cache"):
            state.pop(key, None)  # reloaded lazily in the worker, like the weights
        return state

    # ------------------------------------------------------------------ conversation
    def render(self, question: str, num_images: int, kind: str = "image") -> str:
        """The chat-template text of one query, ending where the model's answer starts.

        The template is rendered once per (kind, count) with a sentinel in place of the question, and the question
        is substituted into that text: Jinja rendering per sample was a visible share of the per-image cost. A
        template that transforms the question text (the sentinel does not come back verbatim, exactly once) is
        rendered in full for every query instead.

        Args:
            question: the final user question.
            num_images: how many image (or video) placeholders precede it in the user turn.
            kind: ``"image"`` or ``"video"`` (native video input).
        """
        cache = self.__dict__.setdefault("_render_cache", {})
        key = (kind, num_images)
        if key not in cache:
            text = self._render_full(_SENTINEL, num_images, kind)
            cache[key] = text if text.count(_SENTINEL) == 1 else None
        if cache[key] is None:
            return self._render_full(question, num_images, kind)
        return cache[key].replace(_SENTINEL, question)

    def _render_full(self, question: str, num_images: int, kind: str = "image") -> str:
        system = str(self.system) if self.system else ""
        messages: list[dict[str, Any]] = []
        if system and self.family.system_turn:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        for example in self.examples:
            asked = example.get("question") or self.template.format(prompt=example.get("prompt", ""),
                                                                    criteria=example.get("criteria", ""))
            messages.append({"role": "user", "content": [{"type": "text", "text": str(asked)}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": str(example["answer"])}]})
        user = [{"type": kind}] * num_images + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": user})
        if system and not self.family.system_turn:
            # A template without a system turn (LLaVA-1.5) would drop the instructions; fold them into the first
            # user text instead.
            first = messages[0]["content"]
            text_part = next(c for c in first if c["type"] == "text")
            text_part["text"] = f"{system}\n{text_part['text']}"
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # ------------------------------------------------------------------ the forward pass
    def answer_probs(self, images: list[list[Tensor]], questions: list[str],
                     kind: str = "image") -> tuple[Tensor, Tensor]:
        """P(yes) and P(yes)/(P(yes)+P(no)) for N queries, in one forward pass (see :meth:`answer_log_probs`).

        Returns:
            ``(p_yes, p_yes_renorm)``, each float32 ``[N]`` in [0, 1]; differentiable in ``images`` when grad is
            enabled and the family has a tensor preprocessing path.
        """
        logp = self.answer_log_probs(images, questions, kind)
        lse_yes = torch.logsumexp(logp[:, self.yes_ids], dim=-1)
        lse_no = torch.logsumexp(logp[:, self.no_ids], dim=-1)
        return lse_yes.exp(), torch.sigmoid(lse_yes - lse_no)

    def answer_log_probs(self, images: list[list[Tensor]], questions: list[str], kind: str = "image",
                         with_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Log-softmax over the vocabulary at the answer position of N queries, in one forward pass; also what a
        reward-model trainer differentiates (visalign/rm/yes_token.py).

        Args:
            images: per query, its visual inputs, all the same size: images float in [0, 1] ``[3, H, W]``, or for
                ``kind="video"`` clips ``[F, 3, H, W]``.
            questions: per query, the user question.
            kind: ``"image"`` or ``"video"`` (native video input).
            with_hidden: also return the last layer's hidden state at the answer position (the uncertainty head's
                input), float32 ``[N, D]``.

        Returns:
            float32 ``[N, V]`` (and the hidden state); differentiable in ``images`` (and in the model's weights when
            they require grad) when grad is enabled and the family has a tensor preprocessing path.
        """
        texts = [self.render(q, len(ims), kind) for q, ims in zip(questions, images, strict=True)]
        inputs = self.model_inputs(texts, images, kind)
        inputs = {k: v.to(self.device, self.dtype if v.is_floating_point() else None) if isinstance(v, Tensor) else v
                  for k, v in inputs.items()}
        inputs = self._precompute_mrope(inputs)
        mask = inputs["attention_mask"]
        # use_cache=False: one pass, no decoding, so building a KV cache is pure overhead.
        if bool(mask[:, -1].all()):
            out = self.model(**inputs, use_cache=False, logits_to_keep=1, output_hidden_states=with_hidden)
            logits = out.logits[:, -1]
            hidden = out.hidden_states[-1][:, -1] if with_hidden else None
        else:  # right padding: gather each row's last real position
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
            rows = torch.arange(mask.shape[0], device=mask.device)
            out = self.model(**inputs, use_cache=False, output_hidden_states=with_hidden)
            logits = out.logits[rows, last]
            hidden = out.hidden_states[-1][rows, last] if with_hidden else None
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return (log_probs, hidden.float()) if with_hidden else log_probs

    def model_inputs(self, texts: list[str], images: list[list[Tensor]], kind: str = "image") -> dict[str, Any]:
        """The model's inputs for rendered ``texts`` and their visual inputs (see :meth:`answer_probs`).

        Built with batched tensor ops (:meth:`tensor_inputs`) when the family supports it and the result was
        checked equal to the processor's on the first query of this input shape; otherwise by the processor, with
        the pixels replaced by the tensor path when gradients must reach them.
        """
        flat = [im for ims in images for im in ims]
        # Qwen2.5-VL video positions need the processor's second_per_grid_ts and mm_token_type_ids.
        upstream_video = kind == "video" and self.model.config.model_type != "qwen2_vl"
        if self.fast_inputs and self.family.token_counts is not None and not upstream_video:
            key = (kind, len(images[0]), tuple(flat[0].shape), self.processor.tokenizer.padding_side)
            if key not in self._fast_checked:
                self._fast_checked[key] = self._fast_matches_processor(texts[:1], images[:1], kind)
            if self._fast_checked[key]:
                fast = self.tensor_inputs(texts, flat, kind)
                if fast is not None:
                    return fast
        inputs = self.processor_inputs(texts, images, kind)
        if torch.is_grad_enabled() and any(im.requires_grad for im in flat):
            inputs.update(self._tensor_pixels(torch.stack(flat), inputs, kind))
        return inputs

    def processor_inputs(self, texts: list[str], images: list[list[Tensor]], kind: str = "image") -> dict[str, Any]:
        """The processor's inputs (pixels detached): the reference :meth:`tensor_inputs` is checked against."""
        detached = [[im.detach().float().cpu() for im in ims] for ims in images]
        # Pixels arrive as floats already in [0, 1]: the processor must not divide them by 255 again.
        if kind == "video":
            # cap_pixels_per_frame=False: every frame keeps the image size limits, as the tensor path does.
            return dict(self.processor(text=texts, videos=[v for vs in detached for v in vs], padding=True,
                                       return_tensors="pt", do_rescale=False, cap_pixels_per_frame=False))
        return dict(self.processor(text=texts, images=detached, padding=True, return_tensors="pt", do_rescale=False))

    def tensor_inputs(self, texts: list[str], flat: list[Tensor], kind: str = "image") -> dict[str, Tensor] | None:
        """Token ids, attention mask and pixels built with batched tensor ops (no per-sample processor work).

        Args:
            texts: rendered chat texts, one placeholder per visual input.
            flat: the visual inputs of all queries in order, images ``[3, H, W]`` or clips ``[F, 3, H, W]``.

        Returns:
            The processor's keys (``input_ids``, ``attention_mask``, pixel keys) without ``mm_token_type_ids``;
            None when the family cannot build them for this processor (the processor path is used).
        """
        stacked = torch.stack(flat).float()
        try:
            if kind == "video":
                pixels = self.family.video_pixels(self.processor.video_processor, stacked)
            else:
                pixels = self.family.tensor_pixels(self.processor.image_processor, stacked)
        except ValueError:  # a processor config the tensor path refuses to imitate (LLaVA's do_pad)
            return None
        counts = self.family.token_counts(self.processor, pixels)
        if counts is None:
            return None
        token_id = self.processor.video_token_id if kind == "video" else self.processor.image_token_id
        tokenizer = self.processor.tokenizer
        rows = self._token_rows(texts, kind, len(flat) // len(texts))
        ids, mask = expand_placeholders(rows, token_id, counts, tokenizer.pad_token_id,
                                        tokenizer.padding_side == "left")
        return {"input_ids": ids, "attention_mask": mask, **pixels}

    def _token_rows(self, texts: list[str], kind: str, count: int) -> list[list[int]]:
        """Token ids of rendered texts: the template's cached ids around each question's, where that is exact.

        Tokenising only the questions roughly halves the tokenizer's work per sample. Splicing is exact when the
        question sits between two added tokens (Qwen2-VL: ``<|vision_end|>`` … ``<|im_end|>``), because tokenizers
        split added tokens out before pre-tokenisation, so the question's text is tokenised on its own either way;
        it is also checked once per template on a probe question. Otherwise whole texts are tokenised.
        """
        tokenizer = self.processor.tokenizer
        if (kind, count) not in self._splice_cache:
            self._splice_cache[(kind, count)] = self._template_splice(kind, count)
        splice = self._splice_cache[(kind, count)]
        if splice is not None:
            prefix, suffix, head, tail = splice
            if all(t.startswith(prefix) and t.endswith(suffix) for t in texts):
                questions = [t[len(prefix):len(t) - len(suffix)] for t in texts]
                return [head + body + tail for body in tokenizer(questions, add_special_tokens=False)["input_ids"]]
        return tokenizer(texts)["input_ids"]

    def _template_splice(self, kind: str, count: int) -> tuple[str, str, list[int], list[int]] | None:
        """(prefix, suffix, prefix ids, suffix ids) of the cached template, or None where splicing is not exact."""
        self.render("", count, kind)  # fills the render cache
        template = self._render_cache.get((kind, count))
        if template is None:
            return None
        prefix, suffix = template.split(_SENTINEL)
        tokenizer = self.processor.tokenizer
        added = list(tokenizer.get_added_vocab())
        if not (any(prefix.endswith(t) for t in added) and any(suffix.startswith(t) for t in added)):
            return None
        head = tokenizer(prefix)["input_ids"]
        tail = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        probe = 'Does this "x, y."? Yes or No.'
        spliced = head + tokenizer(probe, add_special_tokens=False)["input_ids"] + tail
        return (prefix, suffix, head, tail) if spliced == tokenizer(prefix + probe + suffix)["input_ids"] else None

    def _fast_matches_processor(self, texts: list[str], images: list[list[Tensor]], kind: str) -> bool:
        """Whether :meth:`tensor_inputs` reproduces the processor on one query (tokens exactly, pixels to 1e-5)."""
        fast = self.tensor_inputs(texts, [im for ims in images for im in ims], kind)
        if fast is None:
            return False
        reference = self.processor_inputs(texts, images, kind)
        for key, value in fast.items():
            other = reference.get(key)
            if other is None or value.shape != other.shape or not torch.allclose(
                    value.detach().cpu().to(other.dtype), other, atol=1e-5, rtol=0):
                warnings.warn(f"Scorer {self.id!r}: batched tensor inputs differ from the processor's in {key!r} "
                              f"for {kind} inputs of shape {tuple(images[0][0].shape)}; using the processor.",
                              stacklevel=3)
                return False
        return True

    def _precompute_mrope(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """For Qwen2-VL models: run the vision tower and build the 3-D positions here, with tensor ops.

        Upstream computes both with per-row and per-image Python loops (``get_rope_index``,
        ``get_vision_position_ids``); passing ``position_ids`` and ``mm_encoder_outputs`` skips them.
        """
        config = self.model.config
        video = "pixel_values_videos" in inputs
        if not self.family.mrope or (video and config.model_type != "qwen2_vl"):
            return inputs  # Qwen2.5-VL spaces video positions by seconds per grid: left to upstream
        inputs = dict(inputs)
        pixels = inputs.pop("pixel_values_videos" if video else "pixel_values", None)
        grid = inputs.pop("video_grid_thw" if video else "image_grid_thw", None)
        if pixels is None:
            return inputs
        inputs.pop("mm_token_type_ids", None)
        visual = self.model.model.visual
        encoded = qwen2_vl_encode(visual, pixels.to(visual.dtype), grid)
        encoded.pooler_output = (encoded.pooler_output,)  # the model concatenates a per-input sequence
        inputs["mm_encoder_outputs"] = {"video" if video else "image": encoded}
        inputs["position_ids"] = mrope_position_ids(inputs["input_ids"], inputs["attention_mask"],
                                                    (config.image_token_id, config.video_token_id), grid,
                                                    config.vision_config.spatial_merge_size)
        return inputs

    def _tensor_pixels(self, stacked: Tensor, inputs: dict[str, Any], kind: str = "image") -> dict[str, Tensor]:
        make = self.family.video_pixels if kind == "video" else self.family.tensor_pixels
        if make is None:
            raise ValueError(f"Scorer {self.id!r}: family {self.family.name!r} has no differentiable pixel path; "
                             "its card must say differentiable: false.")
        processor = self.processor.video_processor if kind == "video" else self.processor.image_processor
        pixels = make(processor, stacked.float())
        for key in pixels:
            if tuple(pixels[key].shape) != tuple(inputs[key].shape):
                raise RuntimeError(f"Scorer {self.id!r}: tensor preprocessing gave {key} {tuple(pixels[key].shape)} "
                                   f"but the processor gave {tuple(inputs[key].shape)}; the processor config is not "
                                   "one the differentiable path reproduces.")
        return pixels

    # ------------------------------------------------------------------ modes
    def _visuals(self, media: Tensor) -> list[list[Tensor]]:
        """Per sample, what the model sees: ``[B, 3, H, W]`` → one image each; ``[B, T, 3, H, W]`` → F sampled
        frames as F images, or (``video_input: native``) as one ``[F, 3, H, W]`` clip."""
        if media.ndim == 4:
            return [[m] for m in media]
        if self.video_input == "native":
            return [[sample_frames(v, self.num_frames)] for v in media]
        return [list(sample_frames(v, self.num_frames)) for v in media]

    def _kind(self, media: Tensor) -> str:
        return "video" if media.ndim == 5 and self.video_input == "native" else "image"

    def _reference_visuals(self, references: Tensor, media_ndim: int) -> list[list[list[Tensor]]]:
        """Per sample, a list of K references (each a list of images)."""
        if references.ndim == media_ndim:
            return [[v] for v in self._visuals(references)]
        if references.ndim == 5 and media_ndim == 4:  # [B, K, 3, H, W]: K still references per sample
            return [[[r] for r in refs] for refs in references]
        raise ValueError(f"Scorer {self.id!r}: references of shape {tuple(references.shape)} do not fit media with "
                         f"{media_ndim} dims; pass [B, 3, H, W] or [B, K, 3, H, W] for images, [B, T, 3, H, W] for "
                         "videos.")

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        visuals = self._visuals(batch.media)
        if self.mode == "pairwise":
            p_yes, p_renorm, extras = self._pairwise(batch, visuals)
        elif self.mode == "multi-question":
            p_yes, p_renorm, extras = self._multi_question(batch, visuals)
        elif self.uncertainty_head is not None:
            p_yes, p_renorm, extras = self._with_uncertainty(batch, visuals)
        else:
            questions = [self.template.format(prompt=p) for p in batch.prompts]
            p_yes, p_renorm = self.answer_probs(visuals, questions, self._kind(batch.media))
            extras = {}
        extras.update(p_yes=p_yes, p_yes_renorm=p_renorm)
        return RawScore(p_yes if self.score_name == "p_yes" else p_renorm, extras)

    def _with_uncertainty(self, batch: ScoreBatch, visuals: list[list[Tensor]]
                          ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Pointwise P(yes) plus the head's log σ and the weight ``exp(−σ²/τ)`` (mean 1 over the batch)."""
        assert self.uncertainty_head is not None
        questions = [self.template.format(prompt=p) for p in batch.prompts]
        log_probs, hidden = self.answer_log_probs(visuals, questions, self._kind(batch.media), with_hidden=True)
        lse_yes = torch.logsumexp(log_probs[:, self.yes_ids], dim=-1)
        lse_no = torch.logsumexp(log_probs[:, self.no_ids], dim=-1)
        log_sigma = self.uncertainty_head(hidden).squeeze(-1).detach()
        weight = torch.exp(-torch.exp(2 * log_sigma) / self.uncertainty_tau)
        # Mean 1, as visalign.scorers.uncertainty does: re-weighting must not rescale the whole update.
        weight = weight / weight.mean().clamp_min(1e-12)
        return lse_yes.exp(), torch.sigmoid(lse_yes - lse_no), {"log_sigma": log_sigma, "weight": weight}

    def _pairwise(self, batch: ScoreBatch, visuals: list[list[Tensor]]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if batch.references is None:
            raise ValueError(f"Scorer {self.id!r} compares against references; pass ScoreBatch(references=...).")
        refs = self._reference_visuals(batch.references, batch.media.ndim)
        images, questions, owner = [], [], []
        for i, prompt in enumerate(batch.prompts):
            question = self.template.format(prompt=prompt, criteria=self.criteria.format(prompt=prompt))
            for ref in refs[i]:
                orders = [visuals[i] + ref, ref + visuals[i]] if self.swap_average else [visuals[i] + ref]
                images += orders
                questions += [question] * len(orders)
                owner.append(i)
        p_yes, p_renorm = self.answer_probs(images, questions, self._kind(batch.media))
        per_order = len(images) // len(owner)
        owner_t = torch.tensor(owner, device=p_yes.device)

        def combine(p: Tensor) -> tuple[Tensor, Tensor]:
            p = p.view(len(owner), per_order)
            # Averaging the two orders cancels position bias: s(a, b) = 1 − s(b, a) by construction.
            s = 0.5 * (p[:, 0] + 1.0 - p[:, 1]) if self.swap_average else p[:, 0]
            mean = torch.zeros(len(batch), device=p.device).index_add(0, owner_t, s)
            counts = torch.bincount(owner_t, minlength=len(batch)).to(p.dtype)
            return mean / counts, p

        yes, yes_orders = combine(p_yes)
        renorm, _ = combine(p_renorm)
        extras = {"p_yes_forward": yes_orders[:, 0].detach()}
        if self.swap_average:
            extras["p_yes_swapped"] = yes_orders[:, 1].detach()
        return yes, renorm, extras

    def _multi_question(self, batch: ScoreBatch,
                        visuals: list[list[Tensor]]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        per_sample: list[list[str]] = []
        for i, prompt in enumerate(batch.prompts):
            meta = batch.metadata[i] if batch.metadata is not None else {}
            asked = meta.get("questions") if meta else None
            asked = list(asked) if asked else [q.format(prompt=prompt) for q in self.questions]
            if not asked:
                raise ValueError(f"Scorer {self.id!r}: sample {i} has no questions; pass metadata[i]['questions'] or "
                                 "set params.questions in the card.")
            per_sample.append([self.question_template.format(question=q) for q in asked])
        width = max(len(qs) for qs in per_sample)
        images = [visuals[i] for i, qs in enumerate(per_sample) for _ in qs]
        questions = [q for qs in per_sample for q in qs]
        rows = torch.tensor([i for i, qs in enumerate(per_sample) for _ in qs])
        cols = torch.tensor([j for qs in per_sample for j in range(len(qs))])
        p_yes, p_renorm = self.answer_probs(images, questions, self._kind(batch.media))

        def grid(p: Tensor) -> Tensor:
            # NaN marks "this sample has fewer questions"; means skip it.
            out = torch.full((len(batch), width), float("nan"), device=p.device, dtype=p.dtype)
            return out.index_put((rows.to(p.device), cols.to(p.device)), p)

        yes_grid, renorm_grid = grid(p_yes), grid(p_renorm)
        chosen = yes_grid if self.score_name == "p_yes" else renorm_grid
        return yes_grid.nanmean(dim=1), renorm_grid.nanmean(dim=1), {"per_question": chosen.detach()}
