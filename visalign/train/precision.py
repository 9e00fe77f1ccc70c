"""Mixed precision of the trained network, and the ``accelerate launch`` settings the loop honours or refuses
(docs/architecture.md#scale).

``model.mixed_precision`` (or ``accelerate launch --mixed_precision``, read from the environment the launcher
sets) selects how the denoiser computes while its trainable weights stay float32:

- ``bf16``: the denoiser's forward runs under ``torch.autocast(dtype=bfloat16)``;
- ``fp16``: the same with float16, plus dynamic loss scaling (``torch.amp.GradScaler``). A ``model.dtype:
  float16`` recipe (an fp16 base with float32 LoRA weights) gets the loss scaling too.

Only the denoiser is autocast: it is where the compute and the activations are, and it is the network that is
trained. The VAE and text encoders run in ``model.dtype`` and the scorers in ``reward.dtype``.

Why the loss is scaled at the denoiser's output and not at the loss: the objectives call ``backward`` themselves, up
to several times per optimizer step. :meth:`Precision.wrap` makes the denoiser return a float32 output whose
gradient is multiplied by the current scale on its way back into the float16 network, so every objective's
backward (and PRDP's second pass) is scaled, and :meth:`Precision.step` unscales before clipping, skips a step whose
gradient overflowed, and adapts the scale. The float32 cast of the output is exact, so the values are unchanged.

A launch setting the loop cannot honour is refused with a message, never ignored (:data:`LAUNCH_SETTINGS`; FSDP's
settings in ``visalign/train/sharding.py``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

PRECISIONS: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# accelerate launch setting (an environment variable the launcher sets) → (is it set to something the loop
# cannot honour?, what to do instead).
LAUNCH_SETTINGS: dict[str, tuple[Callable[[str], bool], str]] = {
    "ACCELERATE_USE_DEEPSPEED": (lambda v: v.lower() == "true",
                                 "DeepSpeed is not used by this loop (it synchronises gradients itself); launch "
                                 "without --use_deepspeed"),
    "ACCELERATE_USE_MEGATRON_LM": (lambda v: v.lower() == "true", "Megatron-LM is not supported; launch without it"),
    "ACCELERATE_USE_PARALLELISM_CONFIG": (lambda v: v.lower() == "true",
                                          "tensor/context parallelism is not supported; launch without it"),
    "ACCELERATE_DYNAMO_BACKEND": (lambda v: v.lower() not in ("", "no"),
                                  "torch.compile through accelerate is not applied to the adapters' denoiser calls; "
                                  "launch with --dynamo_backend no"),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": (lambda v: v.strip() not in ("", "1"),
                                               "set optim.grad_accumulation in the recipe instead of "
                                               "--gradient_accumulation_steps"),
    "ACCELERATE_GRADIENT_CLIPPING": (lambda v: v.strip() != "",
                                     "set optim.max_grad_norm in the recipe instead of --gradient_clipping"),
    "ACCELERATE_MIXED_PRECISION": (lambda v: v.lower() not in ("", *PRECISIONS),
                                   "use --mixed_precision no, bf16 or fp16 (fp8 is not supported)"),
}


def check_launch_settings(env: Mapping[str, str] | None = None) -> None:
    """Raise ValueError naming every launch setting in ``env`` (default ``os.environ``) the loop cannot honour."""
    env = os.environ if env is None else env
    bad = [f"{name}={env[name]!r}: {advice}" for name, (refused, advice) in LAUNCH_SETTINGS.items()
           if name in env and refused(env[name])]
    if bad:
        raise ValueError("accelerate launch asked for what this training loop cannot do (refused rather than "
                         "ignored):\n  " + "\n  ".join(bad))


def resolve_precision(configured: str | None, model_dtype: str, full_finetune: bool,
                      env: Mapping[str, str] | None = None) -> str:
    """The mixed-precision mode of a run: ``no``, ``bf16`` or ``fp16``.

    ``configured`` is ``model.mixed_precision`` (None: take ``accelerate launch --mixed_precision``); a recipe and a
    launch that disagree are refused, as are combinations that cannot train (float16 master weights).
    """
    env = os.environ if env is None else env
    launched = env.get("ACCELERATE_MIXED_PRECISION", "").lower() or "no"
    if configured is not None and configured not in PRECISIONS:
        raise ValueError(f"model.mixed_precision is {configured!r}; use one of {sorted(PRECISIONS)} or null.")
    if configured is not None and launched not in ("no", configured):
        raise ValueError(f"model.mixed_precision is {configured!r} but accelerate launch asked for {launched!r}; "
                         "make them agree (or set model.mixed_precision=null to follow the launcher).")
    mode = configured or launched
    if model_dtype == "float16":
        if full_finetune:
            raise ValueError("model.dtype=float16 with a full fine-tune keeps float16 master weights, whose Adam "
                             "updates underflow; use model.dtype=float32 with model.mixed_precision=fp16.")
        if mode == "bf16":
            raise ValueError("model.mixed_precision=bf16 with model.dtype=float16: pick one half type (e.g. "
                             "model.dtype=bfloat16).")
        mode = "fp16"  # an fp16 base trains with loss scaling
    if model_dtype == "bfloat16" and mode == "fp16":
        raise ValueError("model.mixed_precision=fp16 with model.dtype=bfloat16: pick one half type.")
    return mode


class _ScaleGrad(torch.autograd.Function):
    """Identity (cast to float32) forward; backward multiplies the gradient by ``scale`` and casts it back."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        ctx.in_dtype = x.dtype
        return x.float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors
        return (grad.float() * scale.to(grad.device)).to(ctx.in_dtype), None


class Precision:
    """Autocast and loss scaling of one run (``mode`` from :func:`resolve_precision`) on ``device``."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.dtype = PRECISIONS[mode]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None
        if self.scaler is not None:
            self.scaler.scale(torch.zeros((), device=device))  # initialises the scale tensor on the device
        self.skipped = 0  # optimizer steps skipped because the scaled gradient overflowed
        self.last_skipped = False  # was the last step skipped? (the LR schedule then does not advance either)

    def wrap(self, module: torch.nn.Module) -> None:
        """Make ``module``'s forward autocast (and, with fp16, scale its gradient); no-op for ``no``."""
        if self.dtype is None:
            return
        original = module.forward
        dtype, device_type, precision = self.dtype, self.device_type, self

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device_type, dtype=dtype):
                out = original(*args, **kwargs)
            if precision.scaler is None or not torch.is_grad_enabled():
                return out
            return _map_first_tensor(out, lambda t: _ScaleGrad.apply(t, precision.scaler._scale))

        module.forward = forward

    def autocast(self) -> Any:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def step(self, optimizer: torch.optim.Optimizer, params: list[Tensor], max_norm: float) -> float:
        """Unscale (fp16), clip to ``max_norm`` (0 = off), step unless the gradient overflowed; the pre-clip norm."""
        limit = max_norm if max_norm > 0 else float("inf")
        if self.scaler is None:
            norm = _clip(params, limit)
            optimizer.step()
            return norm
        self.scaler.unscale_(optimizer)
        norm = _clip(params, limit)
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # skipped when an unscaled gradient is inf/NaN
        self.scaler.update()
        self.last_skipped = self.scaler.get_scale() < before
        self.skipped += int(self.last_skipped)
        return norm

    def metrics(self) -> dict[str, float]:
        if self.scaler is None:
            return {}
        return {"loss_scale": float(self.scaler.get_scale()), "overflow_skipped_steps": float(self.skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else {**self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            state = dict(state)
            self.skipped = int(state.pop("skipped", 0))
            self.scaler.load_state_dict(state)


def _clip(params: list[Tensor], limit: float) -> float:
    """Clip the gradients of ``params`` to a global norm of ``limit``; the pre-clip norm.

    Sharded (FSDP ``DTensor``) gradients give a partial norm per process: it is reduced to the global one
    (``full_tensor``) before the clip coefficient is taken, so every process scales its shard alike.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not hasattr(grads[0], "full_tensor"):
        return float(torch.nn.utils.clip_grad_norm_(params, limit))
    norm = torch.nn.utils.get_total_norm(grads)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
    return float(norm)


def _map_first_tensor(out: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to a forward's output: a tensor, the first item of a tuple, or ``.sample`` of a ModelOutput."""
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return (fn(out[0]), *out[1:])
    if isinstance(getattr(out, "sample", None), Tensor):
        out.sample = fn(out.sample)
        return out
    raise TypeError(f"cannot apply loss scaling to a denoiser output of type {type(out).__name__}.")
