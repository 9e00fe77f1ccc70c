"""A causal-LM policy for the training engine: prompts → G completions with per-token log-probs (transformers).

It stands where a diffusion generator adapter stands in :class:`visalign.train.loop.Trainer` (``load``/``save``,
``add_lora``/``train_full``, ``lora_disabled``, ``denoiser`` = the trained module), so the engine's optimizer, EMA,
checkpoints and evaluation serve text unchanged. Sampling is a small seeded loop over the model's KV cache rather than
``model.generate``: sample ``i`` of a call seeded ``s`` draws from its own ``torch.Generator(s + i)``, so a rollout
does not depend on the batch it is drawn in, and a resumed run replays it.

Log-prob exactness (the ratio-1 check of docs/methods.md#text-core): the rollout's ``log_probs`` are recomputed after
sampling by :meth:`CausalLMPolicy.token_log_probs`, the very function the objectives call with gradients, on the same
padded tensors, so an on-policy update sees a ratio of exactly 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visalign.generators.rollout import LoraSpec, resolve_dtype
from visalign.text.config import TextConfig
from visalign.text.rollout import TextRollout

__all__ = ["CausalLMPolicy", "ChatTemplateError", "TokenLogProbs"]


class ChatTemplateError(ValueError):
    """The run asks for a chat template that the tokenizer does not have."""


@dataclass
class TokenLogProbs:
    """Per-token quantities of completions under the current weights.

    Attributes:
        log_probs: float32 ``[B, C]``, ``log π(o_t | prompt, o_<t)`` of logits / temperature, 0 on padding; keeps
            the graph when computed with gradients.
        entropy: float32 ``[B, C]``, the entropy of each next-token distribution (no graph), 0 on padding.
    """

    log_probs: Tensor
    entropy: Tensor


class CausalLMPolicy:
    """A transformers causal LM and its tokenizer, as a trainable policy.

    Args:
        model: an ``AutoModelForCausalLM`` model.
        tokenizer: its tokenizer (a pad token is set to EOS when it has none; padding is on the left).
        device: where the model runs.
        dtype: compute dtype (log-prob arithmetic is float32).
        source: the folder or hub id it was loaded from (for messages).
    """

    family = "causal-lm"
    modality = "text"

    def __init__(self, model: Any, tokenizer: Any, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, source: str | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.lora: LoraSpec | None = None
        self.full_finetune = False
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError(f"The tokenizer of {source!r} has neither a pad nor an EOS token; completions need "
                                 "one to end and to pad with. Add an eos_token to its tokenizer_config.json.")
            tokenizer.pad_token = tokenizer.eos_token
        # Left padding: every prompt ends at the same column, so all completions start together.
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"  # a prompt cut to max_prompt_tokens keeps its end (the question)
        self.tokenizer = tokenizer
        self.model = model.to(self.device, dtype)
        self.model.requires_grad_(False)
        self.model.eval()  # dropout off: it would break the ratio-1 invariant

    @classmethod
    def from_pretrained(cls, model_id_or_dir: str | Path, *, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", lora: str | Path | None = None,
                        trust_remote_code: bool = False) -> CausalLMPolicy:
        """Load a causal LM and its tokenizer (hub id or folder, safetensors only); optionally a LoRA folder."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = resolve_dtype(dtype)
        source = str(model_id_or_dir)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
        policy = cls(model, tokenizer, device=device, dtype=dtype, source=source)
        if lora is not None:
            policy.load(lora)
        return policy

    # ------------------------------------------------------------ the engine's adapter surface

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained module (the engine's name for it on every generator)."""
        return self.model

    def add_lora(self, spec: LoraSpec | None = None) -> list[torch.nn.Parameter]:
        """Attach fresh LoRA adapters (peft, through transformers' integration); only they become trainable."""
        from peft import LoraConfig

        spec = spec or LoraSpec()
        if self.lora is not None or self.full_finetune:
            raise RuntimeError("This policy already has trainable weights (LoRA or full); load a fresh one.")
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                            lora_dropout=spec.dropout, init_lora_weights=spec.init)
        try:
            self.model.add_adapter(config)
        except ValueError as err:
            raise ValueError(f"LoRA target_modules {list(spec.target_modules)} do not fit this causal LM ({err}); "
                             f"name layers it has, e.g. {self.linear_layer_names()[:6]}.") from None
        self.lora = spec
        self._mark_lora_trainable()
        return self.trainable_parameters()

    def _mark_lora_trainable(self) -> None:
        for name, param in self.model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
                param.data = param.data.float()  # optimizer updates must not be lost to bf16 rounding

    def linear_layer_names(self) -> list[str]:
        """Distinct last-name parts of the model's linear layers (what ``lora_targets`` may name)."""
        names = {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)}
        return sorted(names)

    def train_full(self) -> list[torch.nn.Parameter]:
        """Make every model parameter trainable (full fine-tune)."""
        if self.lora is not None:
            raise RuntimeError("This policy has LoRA adapters; full fine-tuning is for a policy without them.")
        self.full_finetune = True
        self.model.requires_grad_(True)
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """Run the base model (the KL and DPO reference) by switching the LoRA adapters off inside the block."""
        if self.lora is None:
            raise RuntimeError("lora_disabled() needs LoRA adapters; this policy has none.")
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()

    def save(self, directory: str | Path) -> Path:
        """LoRA → ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's layout, which
        ``model.load_adapter`` reads); full fine-tune → a complete model folder with its tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.lora is None and not self.full_finetune:
            raise RuntimeError("Nothing to save: this policy has no LoRA and no full fine-tune. Call add_lora() or "
                               "train_full() first.")
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        return directory

    def load(self, directory: str | Path) -> None:
        """Load a LoRA folder written by :meth:`save` and make it trainable."""
        directory = Path(directory)
        if not (directory / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{directory} has no adapter_config.json; point at a LoRA folder written by "
                                    "CausalLMPolicy.save() (a full model folder is loaded as model.model instead).")
        if self.lora is not None:
            raise RuntimeError("This policy already has LoRA adapters; load the LoRA into a fresh policy.")
        self.model.load_adapter(str(directory), adapter_name="default")
        config = self.model.peft_config["default"]
        self.lora = LoraSpec(rank=config.r, alpha=config.lora_alpha, target_modules=sorted(config.target_modules),
                             dropout=config.lora_dropout)
        self._mark_lora_trainable()

    # ------------------------------------------------------------ prompts

    def format_prompts(self, prompts: Sequence[str], config: TextConfig) -> list[str]:
        """The text the model is conditioned on: the chat template's user turn (and generation prompt) when it is
        used (``config.chat_template``), else the prompt itself.

        Raises:
            ChatTemplateError: ``chat_template`` is true and the tokenizer has none.
        """
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        use = has_template if config.chat_template is None else config.chat_template
        if use and not has_template:
            raise ChatTemplateError(
                f"text.chat_template is true, but the tokenizer of {self.source!r} has no chat_template. Set "
                "text.chat_template=false to feed raw prompts, or use a tokenizer that ships one.")
        if not use:
            return list(prompts)
        system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
        return [self.tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts]

    def encode_prompts(self, texts: Sequence[str], config: TextConfig, *, templated: bool) -> tuple[Tensor, Tensor]:
        """Left-padded prompt tokens ``(ids, mask)``, int64 ``[B, P]`` each, cut to ``config.max_prompt_tokens``.

        Raises:
            ValueError: a prompt has no tokens (nothing to condition the first completion token on).
        """
        # A chat template writes BOS and role markers itself; adding special tokens again would double them.
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=config.max_prompt_tokens,
                             add_special_tokens=not templated, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        empty = [i for i in range(len(texts)) if int(mask[i].sum()) == 0]
        if empty:
            raise ValueError(f"Prompt(s) at {empty[:5]} have no tokens (the tokenizer adds no BOS to an empty "
                             "prompt), so there is nothing to condition a completion on; drop empty prompts.")
        return ids.to(self.device), mask.to(self.device)

    def uses_chat_template(self, config: TextConfig) -> bool:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        return has_template if config.chat_template is None else bool(config.chat_template)

    # ------------------------------------------------------------ log-probs

    def token_log_probs(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, temperature: float = 1.0) -> TokenLogProbs:
        """Per-token log-probs of completions (with gradients under the caller's grad mode).

        Args:
            prompt_ids, prompt_mask: int64 ``[B, P]``, left-padded.
            completion_ids: int64 ``[B, C]``, right-padded; completion_mask: float ``[B, C]``.
            temperature: logits are divided by it before the softmax (the sampling distribution's log-probs).

        Returns:
            :class:`TokenLogProbs` with float32 ``[B, C]`` tensors, 0 where ``completion_mask`` is 0.
        """
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        # Padding after a completion's end is attended to only by later padding: causal attention keeps it out of
        # every trained position, so one all-ones completion mask serves every row.
        attention = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        logits = self.model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        logits = logits[:, prompt_ids.shape[1] - 1:-1].float() / temperature
        log_softmax = torch.log_softmax(logits, dim=-1)
        picked = log_softmax.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        mask = completion_mask.to(picked.dtype)
        with torch.no_grad():
            entropy = -(log_softmax.exp() * log_softmax).sum(-1) * mask
        return TokenLogProbs(log_probs=picked * mask, entropy=entropy)

    def rollout_log_probs(self, rollout: TextRollout) -> TokenLogProbs:
        """:meth:`token_log_probs` of a rollout's own tokens at its temperature."""
        return self.token_log_probs(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                    rollout.completion_mask, rollout.temperature)

    # ------------------------------------------------------------ sampling

    def generate(self, prompts: Sequence[str], config: TextConfig, *, completions_per_prompt: int = 1,
                 seed: int = 0, temperature: float | None = None) -> TextRollout:
        """Sample ``len(prompts) · completions_per_prompt`` completions (each prompt's G consecutively: a group).

        Args:
            prompts: the prompts, as the scorers will see them.
            config: generation settings (length, stop strings, chat template, top-k).
            completions_per_prompt: G.
            seed: sample ``i`` draws from ``torch.Generator().manual_seed(seed + i)``.
            temperature: None = ``config.temperature``; 0 = greedy (log-probs then at temperature 1).

        Returns:
            A :class:`TextRollout` (no graph) whose ``log_probs`` are exact under the current weights.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string; wrap it: [prompt].")
        if not prompts:
            raise ValueError("The prompt list is empty; pass at least one prompt.")
        if completions_per_prompt < 1:
            raise ValueError(f"completions_per_prompt must be >= 1; got {completions_per_prompt}.")
        temperature = config.temperature if temperature is None else temperature
        expanded = [p for p in prompts for _ in range(completions_per_prompt)]
        templated = self.uses_chat_template(config)
        prompt_ids, prompt_mask = self.encode_prompts(self.format_prompts(expanded, config), config,
                                                      templated=templated)
        seeds = [seed + i for i in range(len(expanded))]
        with torch.no_grad():
            completion_ids, completion_mask, ended = self._sample(prompt_ids, prompt_mask, config, temperature,
                                                                  seeds)
        texts = [self._text(row, row_mask, config.stop) for row, row_mask in zip(completion_ids, completion_mask,
                                                                                 strict=True)]
        rollout = TextRollout(prompts=expanded, texts=texts, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                              completion_ids=completion_ids, completion_mask=completion_mask,
                              log_probs=torch.zeros(completion_ids.shape, device=self.device), ended=ended,
                              temperature=temperature if temperature > 0 else 1.0, seeds=seeds,
                              extras={"max_new_tokens": config.max_new_tokens})
        with torch.no_grad():
            rollout.log_probs = self.rollout_log_probs(rollout).log_probs.detach()
        return rollout

    def _sample(self, prompt_ids: Tensor, prompt_mask: Tensor, config: TextConfig, temperature: float,
                seeds: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """The token loop over the KV cache; returns ``(completion_ids [B, C], completion_mask [B, C], ended [B])``."""
        batch = prompt_ids.shape[0]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        attention = prompt_mask
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        next_position = positions[:, -1:] + 1
        done = torch.zeros(batch, dtype=torch.bool)
        # The column of the token that ended each completion (EOS or a completed stop string); -1 = not ended.
        end_at = torch.full((batch,), -1, dtype=torch.long)
        tokens: list[Tensor] = []
        for step in range(config.max_new_tokens):
            picked = self._pick(out.logits[:, -1].float().cpu(), temperature, config.top_k, generators)
            picked = torch.where(done, torch.full_like(picked, pad), picked)
            tokens.append(picked)
            live = ~done
            ended = live & (picked == eos) if eos is not None else torch.zeros_like(live)
            if config.stop:
                for i in torch.nonzero(live & ~ended).flatten().tolist():
                    text = self.tokenizer.decode([int(t[i]) for t in tokens], skip_special_tokens=True)
                    ended[i] = any(s in text for s in config.stop)
            end_at[ended] = step
            done |= ended
            if bool(done.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            out = self.model(input_ids=picked[:, None].to(self.device), attention_mask=attention,
                             position_ids=next_position, past_key_values=out.past_key_values, use_cache=True)
            next_position = next_position + 1
        ids = torch.stack(tokens, dim=1)
        # Trained tokens: up to and including the one that ended the completion; all of them at the length limit.
        columns = torch.arange(ids.shape[1])
        last = torch.where(end_at >= 0, end_at, torch.full_like(end_at, ids.shape[1] - 1))
        mask = (columns[None, :] <= last[:, None]).float()
        return ids.to(self.device), mask.to(self.device), end_at >= 0

    @staticmethod
    def _pick(logits: Tensor, temperature: float, top_k: int, generators: list[torch.Generator]) -> Tensor:
        """One next token per row: argmax at temperature 0, else a draw from row i's own generator."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])

    def _text(self, ids: Tensor, mask: Tensor, stop: list[str]) -> str:
        """The completion's text: its trained tokens decoded, special tokens skipped, cut before a stop string."""
        text = self.tokenizer.decode(ids[mask > 0].tolist(), skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        return text[: min(cuts)] if cuts else text

