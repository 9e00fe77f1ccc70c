"""The optimizer and learning-rate schedule of a run, by name (``optim.optimizer``, ``optim.lr_scheduler``).

Optimizers: ``adamw`` (``torch.optim.AdamW``) and ``adamw-8bit`` (bitsandbytes' ``AdamW8bit``: 8-bit moments,
about a quarter of AdamW's optimizer memory; a GPU and ``pip install bitsandbytes`` needed). Schedules: null (the
default: linear warm-up over ``optim.warmup_steps``, then constant) or any name of
``diffusers.optimization.get_scheduler`` (linear, cosine, cosine_with_restarts, polynomial, constant,
constant_with_warmup, piecewise_constant), stepped once per optimizer step. Decaying schedules need their length,
``optim.lr_schedule_steps``, in optimizer steps.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from typing import Any

import torch


def _adamw(params: Iterable[torch.Tensor], o: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def _adamw_8bit(params: Iterable[torch.Tensor], o: Any) -> torch.optim.Optimizer:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("optim.optimizer=adamw-8bit needs bitsandbytes: pip install bitsandbytes (CUDA), or use "
                         "optim.optimizer=adamw.")
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


OPTIMIZERS: dict[str, Callable[[Iterable[torch.Tensor], Any], torch.optim.Optimizer]] = {
    "adamw": _adamw, "adamw-8bit": _adamw_8bit}
# Schedules of diffusers.optimization that decay over a known length.
NEEDS_LENGTH = frozenset({"linear", "cosine", "cosine_with_restarts", "polynomial"})


def build_optimizer(params: Iterable[torch.Tensor], o: Any) -> torch.optim.Optimizer:
    """The optimizer ``o.optimizer`` (an :class:`~visalign.train.config.OptimConfig`) over ``params``."""
    if o.optimizer not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer is {o.optimizer!r}; use one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[o.optimizer](params, o)


def build_scheduler(optimizer: torch.optim.Optimizer, o: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``o.lr_scheduler`` (null: linear warm-up then constant)."""
    warmup = max(o.warmup_steps, 0)
    if o.lr_scheduler is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    from diffusers.optimization import SchedulerType, get_scheduler

    names = [s.value for s in SchedulerType]
    if o.lr_scheduler not in names:
        raise ValueError(f"optim.lr_scheduler is {o.lr_scheduler!r}; use null or one of {names}.")
    if o.lr_scheduler in NEEDS_LENGTH and not o.lr_schedule_steps:
        raise ValueError(f"optim.lr_scheduler={o.lr_scheduler} decays over optim.lr_schedule_steps optimizer steps; "
                         "set it (an iteration takes as many optimizer steps as the objective's micro-batches × "
                         "inner epochs ÷ optim.grad_accumulation).")
    return get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=warmup,
                         num_training_steps=o.lr_schedule_steps)
