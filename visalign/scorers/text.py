"""Text scorers (modality ``text``): a sequence-classification reward model, regex format rules and length rules.

``ScoreBatch.texts`` holds the completions and ``ScoreBatch.prompts`` the prompts they answer.

* :class:`SequenceClassificationScorer` runs a transformers ``AutoModelForSequenceClassification`` reward model,
  e.g. OpenAssistant's DeBERTa RM, which reads (question, answer) as a text pair and returns one logit
  (huggingface.co/OpenAssistant/reward-model-deberta-v3-large-v2 model card), or a chat-template RM.
* :class:`RegexScorer` is the "format" reward of TRL's GRPO examples and DeepSeek-R1-style recipes: does the
  completion match ``<think>...</think><answer>...</answer>``? Several weighted patterns give partial credit.
* :class:`LengthScorer` measures length; the card's named normalisation rule (``target``) turns it into a reward.

Plain TRL-style callables ``(prompts, completions, **kwargs) -> list[float | None]`` need no class here:
``get_scorer(fn, modality="text")`` wraps them (visalign/scorers/wrap.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from visalign.scorers.base import RawScore, ScoreBatch, Scorer, WeightsUnavailableError
from visalign.scorers.card import ScorerCard

# ---------------------------------------------------------------- reward model


class SequenceClassificationScorer(Scorer):
    """A reward model with a sequence-classification head; raw = the logit of one label.

    Card weights:
        hub_id: the model on the Hugging Face hub (read from the local cache when offline).
        local_dir: a folder with ``config.json``, ``model.safetensors`` and the tokenizer; wins over ``hub_id``.
        tokenizer_id: optional separate tokenizer source (hub id or folder).

    Card params:
        label: index (int) or name (str, looked up in ``config.label2id``) of the logit to read; default 0,
            the single output of scalar reward models.
        chat_template: if true, format ``[user: prompt, assistant: completion]`` with the tokenizer's chat
            template; otherwise feed (prompt, completion) as a text pair. Default false.
        max_length: truncate to this many tokens; default the smaller of the tokenizer's and the model's limit.
        batch_size: texts per forward pass (default 16).
        trust_remote_code: run Python code shipped in the checkpoint's repository. Default false; turn it on only
            for a repository you have read, since that code runs with your permissions.

    Returns (from ``__call__``):
        ``ScoreOutput`` with ``raw [B]`` float32 = the label's logit (unbounded); the card usually maps it with
        a sigmoid.

    >>> import tempfile
    >>> from tests.tiny.text import write_tiny_text_rm  # a random-init BERT RM; pass a real checkpoint's folder
    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> folder = write_tiny_text_rm(tempfile.mkdtemp())
    >>> scorer = get_scorer("text-rm-deberta", weights=str(folder))
    >>> out = scorer(ScoreBatch(prompts=["what colour is it ?", "what shape"], texts=["red", "a circle"]))
    >>> out.raw.shape, bool(((out.reward > 0) & (out.reward < 1)).all())
    (torch.Size([2]), True)
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        if not (card.weights.get("local_dir") or card.weights.get("hub_id")):
            raise ValueError(f"Card {card.source or card.id} must set weights.hub_id or weights.local_dir.")
        self.model: Any = None
        self.tokenizer: Any = None
        self.label_index = 0
        self.max_length = 0

    def _source(self) -> str:
        local = self.card.weights.get("local_dir")
        if local:
            if not Path(local).is_dir():
                raise WeightsUnavailableError(
                    f"Scorer {self.id!r}: weights folder {local!r} does not exist. Pass a folder holding config.json, "
                    f"model.safetensors and the tokenizer files.")
            return str(local)
        return str(self.card.weights["hub_id"])

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = self._source()
        tokenizer_source = str(self.card.weights.get("tokenizer_id") or source)
        trust = bool(self.card.params.get("trust_remote_code", False))
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust)
            model = AutoModelForSequenceClassification.from_pretrained(
                source, use_safetensors=True, trust_remote_code=trust, dtype=self.dtype)
        except OSError as err:  # transformers reports "offline / not cached / no safetensors file" as OSError
            hub_id = self.card.weights.get("hub_id", "(none)")
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WeightsUnavailableError(
                f"Scorer {self.id!r} could not load its reward model from {source!r} (hub id {hub_id!r}): "
                f"{first_line} Download it once where the hub is reachable (safetensors weights are required), "
                f"then pass the folder: get_scorer({self.id!r}, weights='/path/to/folder') in Python, or "
                f"--weights {self.id}=/path/to/folder on the command line.") from None
        # Right padding always, whatever the tokenizer was saved with: encoder RMs pool the first token and
        # absolute-position models number positions from the left, so left padding would move both and change
        # the score; decoder RMs find their last real token from pad_token_id either way.
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.label_index = self._label_index(model.config)
        limits = [int(n) for n in (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 0))
                  if n and n < 1_000_000]  # tokenizers without a limit report a huge sentinel
        self.max_length = int(self.card.params.get("max_length") or min(limits, default=512))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    def _label_index(self, config: Any) -> int:
        label = self.card.params.get("label", 0)
        if isinstance(label, str):
            if label not in config.label2id:
                raise ValueError(f"Scorer {self.id!r}: label {label!r} is not among the model's labels "
                                 f"{sorted(config.label2id)}; set params.label to one of them or to an index.")
            label = config.label2id[label]
        if not 0 <= int(label) < config.num_labels:
            raise ValueError(f"Scorer {self.id!r}: label index {label} is out of range for a model with "
                             f"{config.num_labels} labels.")
        return int(label)

    def _encode(self, prompts: list[str], completions: list[str]) -> dict[str, torch.Tensor]:
        common = {"padding": True, "truncation": True, "max_length": self.max_length, "return_tensors": "pt"}
        if self.card.params.get("chat_template", False):
            texts = [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False)
                for p, c in zip(prompts, completions, strict=True)]
            # The template already writes any BOS/special tokens; adding them again would change the score.
            return self.tokenizer(texts, add_special_tokens=False, **common)
        return self.tokenizer(prompts, completions, **common)

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        batch_size = int(self.card.params.get("batch_size", 16))
        scores = []
        for start in range(0, len(batch), batch_size):
            stop = start + batch_size
            inputs = self._encode(batch.prompts[start:stop], batch.texts[start:stop])
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits
            scores.append(logits[:, self.label_index].float())
        return RawScore(torch.cat(scores))


# ---------------------------------------------------------------- rules

# Names a card may use; a table, so the YAML reads "DOTALL" rather than a magic integer.
REGEX_FLAGS = {"DOTALL": re.DOTALL, "IGNORECASE": re.IGNORECASE, "MULTILINE": re.MULTILINE, "ASCII": re.ASCII}
# fullmatch: the whole completion must have the format; search: the pattern occurs somewhere in it.
REGEX_MODES = ("fullmatch", "search")


class RegexScorer(Scorer):
    """Format rules: raw = weighted fraction of patterns the completion satisfies (1/0 for one pattern).

    Card params:
        patterns: list of ``{pattern: str, mode: fullmatch | search, weight: float > 0}`` (mode defaults to
            ``fullmatch`` and weight to 1).
        flags: names from ``re`` applied to every pattern, e.g. ``[DOTALL]`` so ``.`` spans lines.

    Returns (from ``__call__``):
        ``ScoreOutput`` with ``raw [B]`` float32 in [0, 1] = ``Σ_i w_i·[pattern i holds] / Σ_i w_i``.

    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> scorer = get_scorer("text-format-think-answer")
    >>> scorer(ScoreBatch(prompts=["", ""], texts=["<think>hm</think> <answer>4</answer>", "4"])).raw
    tensor([1., 0.])
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        where = f"card {card.source or card.id}"
        flag_names = card.params.get("flags", [])
        bad = [f for f in flag_names if f not in REGEX_FLAGS]
        if bad:
            raise ValueError(f"Unknown regex flag(s) {bad} in {where}; use any of {sorted(REGEX_FLAGS)}.")
        flags = 0
        for name in flag_names:
            flags |= REGEX_FLAGS[name]
        specs = card.params.get("patterns")
        if not specs:
            raise ValueError(f"{where} must list params.patterns: [{{pattern: ..., mode: fullmatch, weight: 1}}].")
        # (compiled pattern, mode, weight); compiled here so a broken pattern fails when the scorer is built.
        self.rules: list[tuple[re.Pattern[str], str, float]] = []
        for spec in specs:
            spec = {"pattern": spec} if isinstance(spec, str) else dict(spec)
            mode, weight = spec.get("mode", "fullmatch"), float(spec.get("weight", 1.0))
            if mode not in REGEX_MODES:
                raise ValueError(f"Pattern mode {mode!r} in {where} must be one of {REGEX_MODES}.")
            if weight <= 0:
                raise ValueError(f"Pattern weight {weight} in {where} must be > 0.")
            try:
                compiled = re.compile(spec["pattern"], flags)
            except (KeyError, re.error) as err:
                raise ValueError(f"Bad regex pattern entry {spec} in {where}: {err!r}.") from None
            self.rules.append((compiled, mode, weight))

    def score_one(self, completion: str) -> float:
        """Weighted fraction in [0, 1] of the rules that ``completion`` satisfies."""
        total = sum(w for _, _, w in self.rules)
        hits = sum(w for pattern, mode, w in self.rules if getattr(pattern, mode)(completion) is not None)
        return hits / total

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        return RawScore(torch.tensor([self.score_one(t) for t in batch.texts], dtype=torch.float32))


def count_characters(text: str) -> int:
    return len(text)


def count_words(text: str) -> int:
    """Whitespace-separated tokens: tokenizer-free, so the same completion has the same length under every model."""
    return len(text.split())


# unit name → counting function (module-level functions so the scorer pickles by name).
LENGTH_UNITS = {"characters": count_characters, "words": count_words}


class LengthScorer(Scorer):
    """raw = the completion's length; the card's normalisation (e.g. ``target``) decides the reward.

    Card params:
        unit: ``characters`` or ``words`` (whitespace-separated tokens).

    Returns (from ``__call__``):
        ``ScoreOutput`` with ``raw [B]`` float32 ≥ 0 = length in ``unit``.

    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> scorer = get_scorer("text-length-target", params={"unit": "characters"})
    >>> scorer(ScoreBatch(prompts=["", ""], texts=["four", ""])).raw
    tensor([4., 0.])
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        unit = card.params.get("unit", "words")
        if unit not in LENGTH_UNITS:
            raise ValueError(f"Unknown length unit {unit!r} in card {card.source or card.id}; "
                             f"use one of {sorted(LENGTH_UNITS)}.")
        self.unit = unit

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        count = LENGTH_UNITS[self.unit]
        return RawScore(torch.tensor([float(count(t)) for t in batch.texts], dtype=torch.float32))
