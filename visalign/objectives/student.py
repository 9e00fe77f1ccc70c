"""Pieces the few-step student objectives share (``rg-lcm``, ``r0``; docs/methods.md#distillation): the
consistency loss, the weight-space distance to the teacher and a kernel distribution distance."""

from __future__ import annotations

import torch
from torch import Tensor

from visalign.generators.base import GeneratorAdapter

# consistency loss name → per-element distance of two float tensors (LCM's choices).
CONSISTENCY_LOSSES = ("huber", "l2")


def consistency_distance(student: Tensor, target: Tensor, kind: str, huber_c: float) -> Tensor:
    """Per-sample mean distance float32 ``[B]``: pseudo-Huber ``sqrt(d² + c²) − c`` (LCM's ``huber``) or ``d²``."""
    diff = (student.float() - target.float()).flatten(1)
    if kind == "huber":
        return (torch.sqrt(diff ** 2 + huber_c ** 2) - huber_c).mean(1)
    return (diff ** 2).mean(1)


def lora_weight_distance(denoiser: torch.nn.Module) -> Tensor:
    """``Σ_layers ||scale·B·A||²_F``: the squared Frobenius distance of the LoRA-merged weights to the teacher's
    (a conv LoRA's kernels are flattened, ``B [out, r, 1, 1]``, ``A [r, in, k, k]``); 0-d float32 with the graph."""
    total = torch.zeros(())
    for module in denoiser.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or "default" not in lora_a:
            continue
        a = lora_a["default"].weight.flatten(1)
        b = lora_b["default"].weight.flatten(1)
        delta = module.scaling["default"] * (b.float() @ a.float())
        total = total.to(delta.device) + (delta ** 2).sum()
    return total


def full_weight_distance(params: dict[str, torch.nn.Parameter], teacher: dict[str, Tensor]) -> Tensor:
    """``Σ ||θ − θ_teacher||²`` over the trainable parameters (a full fine-tune), 0-d float32 with the graph."""
    total = torch.zeros(())
    for name, p in params.items():
        total = total.to(p.device) + ((p.float() - teacher[name].float()) ** 2).sum()
    return total


def weight_distance(adapter: GeneratorAdapter, teacher: dict[str, Tensor] | None) -> Tensor:
    """The squared weight-space distance of the student to the teacher: LoRA's merged update, or the full
    fine-tune's distance to ``teacher`` (its frozen weights by parameter name)."""
    if adapter.lora is not None:
        return lora_weight_distance(adapter.denoiser)
    if teacher is None:
        raise ValueError("A full fine-tune's weight distance needs the teacher's weights.")
    params = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    return full_weight_distance(params, teacher)


def mmd_rbf(x: Tensor, y: Tensor, scales: tuple[float, ...] = (0.5, 1.0, 2.0)) -> Tensor:
    """Biased squared MMD between samples ``x [B, D]`` and ``y [M, D]`` with a sum of Gaussian kernels.

    Bandwidths: ``scales`` × the median pairwise squared distance of the pooled samples (detached), so the term is
    scale-free. 0 when the two sets are equal; differentiable in both.
    """
    z = torch.cat([x.float(), y.float()])
    d2 = torch.cdist(z, z) ** 2
    median = d2.detach()[~torch.eye(len(z), dtype=torch.bool, device=z.device)].median().clamp_min(1e-8)
    kernel = sum(torch.exp(-d2 / (s * median)) for s in scales)
    b = x.shape[0]
    return kernel[:b, :b].mean() + kernel[b:, b:].mean() - 2 * kernel[:b, b:].mean()
