"""The batch types of the text side: what text experience sources produce and text objectives consume.

- :class:`TextOnlineBatch`: a scored rollout of the policy being trained (GRPO, RLOO, best-of-N);
- :class:`TextPairBatch`: preference pairs as token tensors (DPO, RPO), from a pair file.

They mirror :class:`visalign.objectives.batches.OnlineBatch` and ``PairBatch`` field for field where the meaning is
the same, so the reward post-processing (``RewardSpec.for_update``) fills both sides alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from visalign.text.rollout import TextRollout


@dataclass
class TextOnlineBatch:
    """One scored text rollout, ready for an update.

    Attributes:
        rollout: the completions, their tokens and sampling log-probs (no graph).
        rewards: float32 ``[B]``, the aggregated reward (NaN samples set to 0 and dropped through ``keep``).
        per_scorer: name → float32 ``[B]`` per-term rewards after their transforms.
        advantages: float32 ``[B]``, the reward spec's group advantages (0 for zero-variance groups).
        group_ids: int64 ``[B]``, the prompt group of each sample.
        weights: float32 ``[B]`` per-sample loss weights (uncertainty ``exp(−U)``, mean 1), else ones.
        keep: bool ``[B]``, samples allowed to carry the update (finite reward, Pareto front when on).
    """

    rollout: TextRollout
    rewards: Tensor
    per_scorer: dict[str, Tensor]
    advantages: Tensor
    group_ids: Tensor
    weights: Tensor
    keep: Tensor

    def __len__(self) -> int:
        return len(self.rollout)

    @property
    def effective_weights(self) -> Tensor:
        """``weights`` with dropped samples (``keep`` false) set to 0."""
        return self.weights * self.keep.float()


@dataclass
class TextPairBatch:
    """P preference pairs sharing their prompt, tokenised for the policy.

    Attributes:
        prompts: P prompt strings.
        prompt_ids, prompt_mask: int64 ``[P, L]``, the formatted prompts, left-padded.
        chosen_ids, rejected_ids: int64 ``[P, C]``, the preferred and rejected completions (EOS appended),
            right-padded to one width.
        chosen_mask, rejected_mask: float32 ``[P, C]``, 1 on completion tokens.
        weights: float32 ``[P]`` per-pair loss weights.
        metadata: one dict per pair (the file's other columns).
    """

    prompts: list[str]
    prompt_ids: Tensor
    prompt_mask: Tensor
    chosen_ids: Tensor
    chosen_mask: Tensor
    rejected_ids: Tensor
    rejected_mask: Tensor
    weights: Tensor
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        p = len(self.prompts)
        shapes = {"prompt_ids": self.prompt_ids.shape[0], "chosen_ids": self.chosen_ids.shape[0],
                  "rejected_ids": self.rejected_ids.shape[0], "weights": self.weights.shape[0]}
        bad = {k: v for k, v in shapes.items() if v != p}
        if bad:
            raise ValueError(f"TextPairBatch: {p} prompts but rows {bad}; pass one row per pair.")
        if self.chosen_ids.shape != self.rejected_ids.shape:
            raise ValueError(f"TextPairBatch: chosen {tuple(self.chosen_ids.shape)} and rejected "
                             f"{tuple(self.rejected_ids.shape)} must be padded to one width.")

    def __len__(self) -> int:
        return len(self.prompts)
