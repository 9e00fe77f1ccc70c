"""Helpers shared by the pairwise and supervised objectives (PRDP, DRAGON, RAFT): pairs within prompt groups,
micro-batches of whole groups, per-step log-densities computed in two passes, and the denoising-loss call.

Two-pass backward (PRDP). A loss that is a non-linear function of the *sum* of per-step log-densities (PRDP's
squared error) cannot be backpropagated one step at a time directly, and keeping every step's graph costs
``len(train_steps)`` forward passes of activation memory. Because the loss depends on θ only through the values
``l_t = logp_θ(step t)``, ``∇θ L = Σ_t (∂L/∂l_t)·∇θ l_t``: compute the ``l_t`` without a graph, get ``∂L/∂l_t`` from
autograd on that small ``[B, S]`` tensor, then redo each step with a graph and backpropagate ``Σ_b (∂L/∂l_bt)·l_bt``.
Memory stays one step's worth, exactly as GRPO's per-step backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from visalign.generators.base import GeneratorAdapter, Rollout
from visalign.objectives.base import Objective


def within_group_pairs(group_ids: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """All unordered pairs ``(a, b)``, ``a < b``, of samples in the same prompt group.

    Pairs never cross prompts: the partition function ``Z(c)`` of the KL-regularised optimum cancels only between two
    samples of the same prompt (docs/methods.md#prdp Checks).

    Args:
        group_ids: int64 ``[B]``, the prompt group of each sample.
        weights: optional float ``[B]``; samples with weight 0 (dropped by Pareto filtering) are left out.

    Returns:
        ``(a, b)``: int64 ``[P]`` index tensors, in row-major order of ``(a, b)``.
    """
    same = group_ids[:, None] == group_ids[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    valid = same & upper
    if weights is not None:
        alive = weights > 0
        valid &= alive[:, None] & alive[None, :]
    a, b = torch.nonzero(valid, as_tuple=True)
    return a, b


def group_micro_batches(group_ids: Tensor, active: Tensor, groups_per_step: int,
                        generator: torch.Generator) -> list[list[int]]:
    """Shuffle the prompt groups and cut them into micro-batches of whole groups (pairs stay inside one batch).

    Args:
        group_ids: int64 ``[B]``.
        active: int64 ``[N]`` indices of the samples that take part.
        groups_per_step: groups per micro-batch; 0 = all groups in one.
        generator: CPU generator for the shuffle (seeded by the loop, so resumes replay it).

    Returns:
        Lists of sample indices, each sorted (the rollout's own order within a micro-batch).
    """
    groups = torch.unique(group_ids[active])
    groups = groups[torch.randperm(groups.numel(), generator=generator)]
    size = groups_per_step or max(int(groups.numel()), 1)
    chunks = []
    for start in range(0, int(groups.numel()), size):
        chosen = groups[start:start + size]
        members = active[torch.isin(group_ids[active], chosen)]
        chunks.append(sorted(members.tolist()))
    return chunks


def step_log_densities(adapter: GeneratorAdapter, rollout: Rollout, steps: Sequence[int]) -> Tensor:
    """True per-step log-densities (``logp_sum``) of the rollout's transitions, without a graph.

    Each step's graph is dropped as soon as its value is read, so memory is one step's worth.

    Returns:
        float32 ``[B, len(steps)]``, detached.
    """
    columns = []
    for j in steps:
        columns.append(adapter.recompute_step(rollout, j).log_prob_sum.detach())
    return torch.stack(columns, dim=1)


def backward_through_steps(adapter: GeneratorAdapter, rollout: Rollout, steps: Sequence[int],
                           grad_log_densities: Tensor) -> None:
    """Second pass of the two-pass backward: accumulate ``∇θ Σ_{b,t} g_bt · logp_sum_θ(b, t)`` into ``.grad``.

    Args:
        grad_log_densities: float ``[B, len(steps)]``, ``∂L/∂logp_sum`` from the first pass (constants).
    """
    for column, j in enumerate(steps):
        coef = grad_log_densities[:, column]
        if not torch.any(coef != 0):
            continue  # this step carries no gradient (e.g. every pair's proximal branch is clipped there)
        out = adapter.recompute_step(rollout, j)
        (coef.to(out.log_prob_sum.device) * out.log_prob_sum).sum().backward()


def denoising_loss(adapter: GeneratorAdapter, latents_x0: Tensor, rollout: Rollout, index: Sequence[int], *,
                   timesteps: Tensor | None = None, noise: Tensor | None = None,
                   generator: torch.Generator | None = None):
    """The adapter's per-sample denoising loss on clean latents, conditioned on the rows ``index`` of the rollout.

    Args:
        latents_x0: clean latents ``[N, ...]`` (e.g. ``rollout.latents[index, -1]``).
        rollout: where the condition (prompt embeddings) comes from.
        index: N sample indices into the rollout, one per row of ``latents_x0``.
        timesteps, noise: shared draws (Diffusion-DPO pairs); None draws them from the model's training distribution.
        generator: CPU generator for those draws.

    Returns:
        The adapter's ``DenoisingLoss``: ``loss`` float32 ``[N]`` (mean-over-elements MSE, differentiable),
        ``timesteps [N]`` and ``noise [N, ...]`` that were used.
    """
    return adapter.denoising_loss(latents_x0, rollout.condition.select(list(index)), timesteps=timesteps,
                                  noise=noise, generator=generator)


class ReferenceModel:
    """The frozen reference of preference objectives (Diffusion-DPO, DRAGON, RPO), entered as a context.

    ``reference = "base"``: the model before training — the LoRA-disabled model, or for a full fine-tune a frozen copy
    of the trainable weights taken the first time the reference is entered (before this process's first optimizer
    step), as Diffusion-DPO keeps a frozen reference UNet; checkpoints carry the copy through :meth:`state_tensors`.
    ``reference = "old"``: the current weights (θ_old at the start of an update).
    """

    def __init__(self, reference: str = "base") -> None:
        self.reference = reference
        self.frozen: FrozenWeights | None = None

    def __call__(self, adapter: GeneratorAdapter) -> contextlib.AbstractContextManager:
        if self.reference == "old":
            return contextlib.nullcontext()
        if adapter.lora is not None:
            return adapter.lora_disabled()
        if self.frozen is None:
            self.frozen = FrozenWeights(adapter.denoiser)
        return self.frozen.swapped_in()

    def state_tensors(self) -> dict[str, Tensor]:
        # The full fine-tune's frozen reference: without it a resumed run would freeze the resumed weights instead.
        return {} if self.frozen is None else {f"frozen.{n}": t for n, t in self.frozen.weights.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], adapter: GeneratorAdapter) -> None:
        frozen = {k.removeprefix("frozen."): t for k, t in tensors.items() if k.startswith("frozen.")}
        self.frozen = FrozenWeights(adapter.denoiser, frozen) if frozen else None


class PreferenceObjective(Objective):
    """Base of the objectives that compare the policy with a frozen reference (Diffusion-DPO, RPO, DRAGON): the
    reference (``params.reference``: ``base`` or ``old``) is built once, and a full fine-tune's frozen copy of it
    travels in checkpoints."""

    needs = frozenset({"reference"})

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.reference = ReferenceModel(self.params.reference)

    def state_tensors(self) -> dict[str, Tensor]:
        return self.reference.state_tensors()

    def load_state_tensors(self, tensors: dict[str, Tensor], adapter: GeneratorAdapter) -> None:
        self.reference.load_state_tensors(tensors, adapter)


class FrozenWeights:
    """A frozen copy of a module's trainable weights, swapped in for reference passes of full fine-tunes.

    LoRA gives an exact reference for free (adapters off). A full fine-tune has none, so Diffusion-DPO keeps a second,
    frozen UNet; this keeps only the trainable tensors (one extra copy of them) and swaps storage pointers in and
    out, so a reference pass costs no weight copy.

    Args:
        module: the denoiser; its parameters with ``requires_grad`` are copied now, as they are at this moment.
    """

    def __init__(self, module: torch.nn.Module, weights: dict[str, Tensor] | None = None) -> None:
        self.module = module
        if weights is None:
            weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        else:  # restored from a checkpoint: the copy must fit the module it stands in for
            params = dict(module.named_parameters())
            bad = sorted(n for n, t in weights.items() if n not in params or params[n].shape != t.shape)
            if bad:
                raise ValueError(f"Frozen reference weights do not fit the model (e.g. {bad[0]}); the checkpoint was "
                                 "written for another model.")
            weights = {n: t.to(params[n].device, params[n].dtype) for n, t in weights.items()}
        self.weights = weights

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the module computes with the frozen weights; its own are restored on exit."""
        params = dict(self.module.named_parameters())
        current = {n: params[n].data for n in self.weights}
        for name, frozen in self.weights.items():
            params[name].data = frozen
        try:
            yield
        finally:
            for name, data in current.items():
                params[name].data = data


# ---------------------------------------------------------------- the KTO surrogate on denoising errors
# (Diffusion-DPO's pairwise surrogate lives in visalign/objectives/diffusion_dpo.py.)


def diffusion_kto_loss(model: Tensor, ref: Tensor, desirable: Tensor, beta: float, *, lambda_desirable: float = 1.0,
                       lambda_undesirable: float = 1.0, z0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Diffusion-KTO per sample (docs/methods.md#dragon; jacklishufan/diffusion-kto train_kto_sd_v1.5.py).

    ``g = ℓ_ref − ℓ_θ`` (how much better θ denoises than the reference), reference point
    ``z0 = sg(clamp(mean(g), min=0))`` over the batch, ``h = σ(sign·β·(g − z0))`` with sign +1 on D+ and −1 on D−,
    ``L = w·(1 − h)`` with ``w = λ_D`` on D+ and ``λ_U`` on D−.

    Args:
        model: float ``[N]`` denoising MSEs under θ (with gradients).
        ref: float ``[N]`` the reference's MSEs at the same (t, ε) per sample (constants).
        desirable: bool ``[N]``, True for D+.
        beta: β (as for Diffusion-DPO, calibrated to mean-over-elements MSE).
        lambda_desirable, lambda_undesirable: λ_D, λ_U.
        z0: the reference point computed over the whole batch when ``model`` is one micro-batch of it (see
            :func:`kto_reference_point`); None computes it over these N samples.

    Returns:
        ``(loss [N], z0)``: per-sample losses in [0, max λ], and the scalar reference point (detached).
    """
    g = ref - model
    z0 = kto_reference_point(model, ref) if z0 is None else z0.detach()
    sign = desirable.to(g.dtype) * 2 - 1
    h = torch.sigmoid(sign * beta * (g - z0))
    weight = torch.where(desirable, torch.full_like(g, lambda_desirable), torch.full_like(g, lambda_undesirable))
    return weight * (1 - h), z0


def kto_reference_point(model: Tensor, ref: Tensor) -> Tensor:
    """Diffusion-KTO's reference point ``z0 = sg(clamp(mean(ℓ_ref − ℓ_θ), min=0))`` over float ``[N]`` MSEs."""
    return (ref - model).detach().mean().clamp(min=0)
