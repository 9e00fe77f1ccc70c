"""DPO on text preference pairs, with the SFT-regularised variant (RPO) and robust DPO (docs/methods.md#text-core).

For a pair ``(y_w, y_l)`` of one prompt ``x``, with sequence log-probs summed over each completion's tokens (EOS
included): ``h = β·[(logπ_θ(y_w|x) − logπ_ref(y_w|x)) − (logπ_θ(y_l|x) − logπ_ref(y_l|x))]``,
``L = −log σ(h)`` (``loss_type: sigmoid``, with optional label smoothing ε) or the robust form; RPO adds
``sft_weight · NLL(y_w|x)`` (mean over the chosen completion's tokens; TRL's ``rpo_alpha``). At θ = ref (a fresh
LoRA), ``h = 0`` and ``L = log 2``. The reference is the LoRA-disabled model, or a frozen copy of a full
fine-tune's weights (:class:`~visalign.objectives.common.ReferenceModel`), computed once per batch.
Metrics use TRL's names: ``rewards/chosen`` = ``β·(logπ_θ − logπ_ref)(y_w)``, ``rewards/margins``,
``rewards/accuracies``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from visalign.objectives.base import MetricMeans, UpdateContext, micro_batches
from visalign.objectives.common import PreferenceObjective
from visalign.text.batches import TextPairBatch
from visalign.text.losses import dpo_loss, sequence_log_probs, token_nll

REFERENCES = ("base", "old")


@dataclass
class TextDpoParams:
    beta: float = field(default=0.1, metadata={"help": "β of the DPO loss (TRL 0.1)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO, with label_smoothing: cDPO) or "
                                                                "robust (unbiased under label noise ε)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε: the assumed fraction of flipped labels, in "
                                                                  "[0, 0.5)."})
    sft_weight: float = field(default=0.0, metadata={"help": "RPO: weight of NLL(y_w|x) beside the DPO loss (TRL's "
                                                             "rpo_alpha; 0 = plain DPO)."})
    reference: str = field(default="base", metadata={"help": "'base': the model before training (LoRA off, or a "
                                                             "frozen copy of a full fine-tune); 'old': the weights at "
                                                             "the start of each update."})
    inner_steps: int = field(default=1, metadata={"help": "Passes over each batch of pairs."})
    micro_batch: int = field(default=0, metadata={"help": "Pairs per optimizer step; 0 = the whole batch."})

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"text-dpo reference must be one of {REFERENCES}; got {self.reference!r}.")
        if self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"text-dpo loss_type must be 'sigmoid' or 'robust'; got {self.loss_type!r}.")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or self.sft_weight < 0:
            raise ValueError("text-dpo needs beta > 0, 0 <= label_smoothing < 0.5 and sft_weight >= 0.")
        if self.inner_steps < 1 or self.micro_batch < 0:
            raise ValueError("text-dpo needs inner_steps >= 1 and micro_batch >= 0.")


def pair_log_probs(policy: object, batch: TextPairBatch, index: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(logπ(y_w) [N], logπ(y_l) [N], per-token logπ(y_w) [N, C])`` of the pairs ``index`` under the current
    weights and grad mode: chosen and rejected in one forward pass of ``2N`` rows."""
    n = len(index)
    prompt_ids = batch.prompt_ids[index].repeat(2, 1)
    prompt_mask = batch.prompt_mask[index].repeat(2, 1)
    ids = torch.cat([batch.chosen_ids[index], batch.rejected_ids[index]])
    mask = torch.cat([batch.chosen_mask[index], batch.rejected_mask[index]])
    lp = policy.token_log_probs(prompt_ids, prompt_mask, ids, mask).log_probs
    seq = sequence_log_probs(lp, mask)
    return seq[:n], seq[n:], lp[:n]


class TextDpoObjective(PreferenceObjective):
    """DPO / RPO on text pairs (``objective.name: text-dpo``), from the ``text-pairs`` source by default."""

    name = "text-dpo"
    Params = TextDpoParams
    consumes = TextPairBatch
    default_source = "text-pairs"

    def update(self, batch: TextPairBatch, ctx: UpdateContext) -> dict[str, float]:
        p: TextDpoParams = self.params
        everything = list(range(len(batch)))
        with torch.no_grad(), self.reference(ctx.adapter):
            ref_w, ref_l, _ = pair_log_probs(ctx.adapter, batch, everything)
        weights = batch.weights.to(ref_w)
        metrics = MetricMeans()
        for _ in range(p.inner_steps):
            order = torch.randperm(len(batch), generator=ctx.generator)
            for chunk in micro_batches(order.tolist(), p.micro_batch or len(batch)):
                chunk = sorted(chunk)
                pol_w, pol_l, tokens_w = pair_log_probs(ctx.adapter, batch, chunk)
                per_pair, h = dpo_loss(pol_w, pol_l, ref_w[chunk], ref_l[chunk], p.beta,
                                       label_smoothing=p.label_smoothing, loss_type=p.loss_type)
                loss = (per_pair * weights[chunk]).mean()
                if p.sft_weight > 0:
                    sft = (token_nll(tokens_w, batch.chosen_mask[chunk]) * weights[chunk]).mean()
                    loss = loss + p.sft_weight * sft
                    metrics.add(sft_loss=sft)
                loss.backward()
                chosen = p.beta * (pol_w.detach() - ref_w[chunk])
                rejected = p.beta * (pol_l.detach() - ref_l[chunk])
                metrics.add(loss=loss, **{"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                                          "rewards/margins": (chosen - rejected).mean(),
                                          "rewards/accuracies": (h.detach() > 0).float().mean(),
                                          "logps/chosen": pol_w.detach().mean(),
                                          "logps/rejected": pol_l.detach().mean()},
                            grad_norm=ctx.optimizer_step())
        out = metrics.means()
        out["pairs"] = float(len(batch))
        return out
