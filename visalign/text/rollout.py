"""What a text rollout carries: prompt and completion tokens, masks, per-token log-probs, decoded texts.

Layout (TRL's): prompts are **left**-padded so every completion starts at the same column, completions are
**right**-padded. ``completion_mask`` covers the generated tokens up to and including the one that ended the
completion (EOS or the token that completed a stop string), so an "empty" completion (EOS first) still has one
trained token: the decision to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class TextRollout:
    """B completions with what is needed to recompute their log-probs exactly.

    Attributes:
        prompts: B prompt strings as the user gave them (what scorers see).
        texts: B completion strings (special tokens skipped; cut before a stop string).
        prompt_ids: int64 ``[B, P]``, the formatted prompts (chat template applied), left-padded.
        prompt_mask: int64 ``[B, P]``, 1 on real prompt tokens.
        completion_ids: int64 ``[B, C]``, right-padded with the pad token.
        completion_mask: float32 ``[B, C]``, 1 on trained completion tokens.
        log_probs: float32 ``[B, C]``, per-token log-probs under the sampling policy (0 on padding); no graph.
        ended: bool ``[B]``, true where the completion ended (EOS or a stop string) before ``max_new_tokens``.
        temperature: the temperature the log-probs are of.
        seeds: B per-sample seeds (sample i of a call seeded ``s`` uses ``s + i``).
        extras: per-rollout extras, e.g. ``metadata`` (one dict per sample for the scorers).
    """

    prompts: list[str]
    texts: list[str]
    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    log_probs: Tensor
    ended: Tensor
    temperature: float = 1.0
    seeds: list[int] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> Tensor:
        """float32 ``[B]``, trained tokens per completion."""
        return self.completion_mask.sum(dim=1)

    def select(self, index: Sequence[int]) -> TextRollout:
        """The samples at ``index`` (micro-batches)."""
        idx = list(index)
        extras = {k: [v[i] for i in idx] if isinstance(v, list) and len(v) == len(self) else v
                  for k, v in self.extras.items()}
        return TextRollout([self.prompts[i] for i in idx], [self.texts[i] for i in idx], self.prompt_ids[idx],
                           self.prompt_mask[idx], self.completion_ids[idx], self.completion_mask[idx],
                           self.log_probs[idx], self.ended[idx], self.temperature, [self.seeds[i] for i in idx] if
                           self.seeds else [], extras)
