"""Data-parallel training over processes (``accelerate launch``), and gradient accumulation, for the loop.

RL fine-tuning is data parallel in the DDPO / flow_grpo manner: every process samples its own prompts and noise,
scores its own samples (a prompt group never straddles processes, so group advantages stay local), and the
trainable weights' gradients are averaged across processes before every optimizer step, so all replicas take the
same step and stay identical. The process group comes from HF accelerate (gloo on CPU, NCCL on GPUs).

Why an explicit all-reduce of ``.grad`` instead of wrapping the denoiser in ``DistributedDataParallel``: the
adapters call their denoiser directly (rollouts, ``recompute_step``, the LoRA-disabled reference pass) and save it
by parameter name, and the objectives run a variable number of backward passes per optimizer step (one per trained
step and micro-batch). DDP's hooks fire per backward and expect every process to run the same number of them;
here a process whose prompt groups all have zero advantage takes no backward pass at all. One all-reduce per
optimizer step, driven by :class:`GradientSync`, is correct for every objective and needs no change to the adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

# Gradients are all-reduced in float32 buckets of at most this many elements: float32 so a bf16 model's sum over
# processes does not lose precision, buckets so a full fine-tune does not need a second full-size gradient copy.
_BUCKET_ELEMENTS = 1 << 24


def build_accelerator(device: str) -> Any:
    """An :class:`accelerate.Accelerator` for ``model.device``: ``cpu=True`` for ``"cpu"`` (gloo between processes).

    The accelerate state is a per-process singleton; a single-process session (a notebook, the test suite) that
    builds trainers for different devices gets a fresh state instead of accelerate's "cannot be changed" error.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    cpu = device == "cpu"
    try:
        return Accelerator(cpu=cpu)
    except ValueError as err:
        if "already been initialized" not in str(err) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=cpu)


class Distributed:
    """The process group as the loop sees it: rank, world size and the few collectives the loop needs.

    Every method is a no-op (or the identity) in a single process, so a run without ``accelerate launch`` does
    exactly what it did before this class existed.

    Args:
        accelerator: an ``accelerate.Accelerator`` (or None: one process).
    """

    def __init__(self, accelerator: Any | None = None) -> None:
        self.accelerator = accelerator
        self.num_processes = accelerator.num_processes if accelerator is not None else 1
        self.process_index = accelerator.process_index if accelerator is not None else 0
        self.is_main = self.process_index == 0
        self.device = torch.device(accelerator.device) if accelerator is not None else torch.device("cpu")

    @property
    def multi(self) -> bool:
        return self.num_processes > 1

    def wait(self) -> None:
        """Barrier: every process waits until all reach this point (main writes files, others wait)."""
        if self.multi:
            self.accelerator.wait_for_everyone()

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order, on every process (small Python values: metrics, states)."""
        if not self.multi:
            return [obj]
        out: list[Any] = [None] * self.num_processes
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        if not self.multi:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_parameters(self, params: Iterable[Tensor]) -> None:
        """Copy the main process's values of ``params`` into every process's (the replicas start identical)."""
        if not self.multi:
            return
        with torch.no_grad():
            for p in params:
                buf = p.detach().to(self._comm_device(p)).contiguous()
                torch.distributed.broadcast(buf, src=0)
                p.copy_(buf.to(p.device))

    def sum_(self, values: Tensor) -> Tensor:
        """All-reduce (sum) a small tensor in place across processes; returns it."""
        if self.multi:
            moved = values.to(self.device)
            torch.distributed.all_reduce(moved)
            values.copy_(moved.to(values.device))
        return values

    def sum_gradients_(self, params: Sequence[Tensor]) -> None:
        """Sum ``p.grad`` of every param across processes, in place (``None`` grads count as zeros and become
        zero tensors), in float32 buckets."""
        bucket: list[Tensor] = []
        size = 0
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p)
            size += p.numel()
            if size >= _BUCKET_ELEMENTS:
                self._sum_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, bucket: list[Tensor]) -> None:
        device = self._comm_device(bucket[0])
        flat = torch.cat([p.grad.detach().to(device, torch.float32).flatten() for p in bucket])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def _comm_device(self, tensor: Tensor) -> torch.device:
        # NCCL reduces CUDA tensors only, gloo CPU ones; the process's own accelerator device is right for both.
        return self.device if self.device.type != "cpu" else torch.device("cpu")


class GradientSync:
    """``ctx.optimizer_step`` with gradient accumulation and cross-process averaging.

    The objective calls :meth:`micro_step` after each backward pass. Every ``accumulation`` calls, the gradient
    accumulated in ``.grad`` (a sum over micro-steps) is summed over processes and divided by the number of
    micro-steps that went into it, so the optimizer sees the MEAN micro-step gradient, and ``apply_step`` (clip,
    optimizer, schedule, EMA, zero grad) runs on every process with identical gradients. :meth:`flush` ends an
    update: leftover micro-steps are stepped, so no gradient is carried into the next iteration.

    Processes may call :meth:`micro_step` a different number of times per update (their micro-batch counts
    depend on how many of their samples have a non-zero advantage). Each optimizer step is therefore a *round*:
    a small header all-reduce (``[micro-steps pending, processes still inside update, per-param has-grad]``)
    followed, when any micro-step is pending, by the gradient all-reduce. A process that has finished its update
    keeps joining rounds from :meth:`flush`, contributing its leftovers and then zeros, until a round finds no
    process still inside its update. Parameters that got no gradient on any process keep ``.grad = None``, so
    AdamW skips them exactly as it does in one process.

    Args:
        params: the trainable parameters, in the same order on every process.
        dist: the process group.
        accumulation: micro-steps per optimizer step (``optim.grad_accumulation``), ≥ 1.
        apply_step: clips, steps the optimizer/schedule/EMA and zeros the gradients; returns the pre-clip norm.
    """

    def __init__(self, params: Sequence[Tensor], dist: Distributed, accumulation: int,
                 apply_step: Callable[[], float]) -> None:
        if accumulation < 1:
            raise ValueError(f"optim.grad_accumulation must be >= 1; got {accumulation}.")
        self.params = list(params)
        self.dist = dist
        self.accumulation = accumulation
        self.apply_step = apply_step
        self.pending = 0
        self.norms: list[float] = []

    @staticmethod
    def equal_micro_batches(chunks: Sequence[Any]) -> list[Any]:
        """The objective's micro-batch plan as is: the all-reduce path lets processes run different numbers of
        micro-steps (:class:`~visalign.train.sharding.ShardedGradientSync` is the one that pads)."""
        return list(chunks)

    def micro_step(self) -> float:
        """Called by the objective after a backward pass.

        Returns:
            The pre-clip global grad norm of the optimizer step taken on this call; NaN on a call that only
            accumulates (the loop logs the mean norm of the steps actually taken, from :attr:`norms`).
        """
        self.pending += 1
        if self.pending < self.accumulation:
            return float("nan")
        if not self.dist.multi:
            return self._local_step()
        self._round(inside_update=True)
        return self.norms[-1]

    def flush(self) -> None:
        """End of an update: step what is still accumulated (on every process, matching the others' rounds)."""
        if not self.dist.multi:
            if self.pending:
                self._local_step()
            return
        while self._round(inside_update=False):
            pass

    def _local_step(self) -> float:
        if self.pending > 1:  # a mean over micro-steps; with one micro-step .grad is already it (bit-identical)
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(self.pending)
        self.pending = 0
        norm = self.apply_step()
        self.norms.append(norm)
        return norm

    def _round(self, *, inside_update: bool) -> int:
        """One synchronised optimizer step; returns how many processes are still inside their update."""
        header = torch.tensor([float(self.pending), float(inside_update)]
                              + [float(p.grad is not None) for p in self.params], dtype=torch.float64)
        self.dist.sum_(header)
        total, still_inside = int(header[0]), int(header[1])
        if total > 0:
            self.dist.sum_gradients_(self.params)
            for p, has_grad in zip(self.params, header[2:].tolist(), strict=True):
                if has_grad:
                    p.grad.div_(total)
                else:
                    p.grad = None
            self.pending = 0
            self.norms.append(self.apply_step())
        return still_inside


def gather_reward_metrics(reward: Any, dist: Distributed) -> dict[str, float]:
    """``RewardOutput.metrics()`` over the samples of every process, as if one process had scored them all.

    Per-sample tensors (``total``, ``raw``, ``group_std``/``zero_std``) are gathered and concatenated: groups never
    straddle processes, so per-group statistics concatenate exactly. Scalar extras are averaged over processes.

    Args:
        reward: this process's :class:`~visalign.rewards.spec.RewardOutput` (``total`` float32 ``[B]``).

    Returns:
        The metric names of ``RewardOutput.metrics()`` (``reward``, ``reward_std``, ``reward/{name}/mean``, ...).
    """
    if not dist.multi:
        return reward.metrics()
    from visalign.rewards.spec import RewardOutput

    size = reward.total.shape[0]
    local = {"total": reward.total.detach().float().cpu(),
             "raw": {k: v.detach().float().cpu() for k, v in reward.raw.items()},
             "extras": {k: v.detach().cpu() for k, v in reward.extras.items()
                        if k in ("group_std", "zero_std") and v.shape[:1] == (size,)},
             "scalars": {k: float(v) for k, v in reward.extras.items() if v.ndim == 0}}
    rows = dist.gather_objects(local)
    merged = RewardOutput(total=torch.cat([r["total"] for r in rows]), per_scorer={},
                          raw={k: torch.cat([r["raw"][k] for r in rows]) for k in local["raw"]},
                          extras={k: torch.cat([r["extras"][k] for r in rows]) for k in local["extras"]})
    out = merged.metrics()
    out.update(mean_over_processes([r["scalars"] for r in rows]))
    return out


# Metrics that add up over processes rather than average (counts and throughputs).
SUMMED_METRICS = frozenset({"nan_dropped", "samples_per_second"})


def mean_over_processes(rows: list[dict[str, float]]) -> dict[str, float]:
    """Combine one metrics dict per process: the mean of the finite values of each key (NaN when none is
    finite), or the sum for :data:`SUMMED_METRICS`. Keys missing on some processes (an objective that skipped its
    update there) average over the processes that have them."""
    out: dict[str, float] = {}
    keys = list(dict.fromkeys(k for row in rows for k in row))
    for key in keys:
        values = [float(row[key]) for row in rows if key in row and row[key] is not None]
        finite = [v for v in values if math.isfinite(v)]
        if key in SUMMED_METRICS:
            out[key] = sum(finite)
        else:
            out[key] = sum(finite) / len(finite) if finite else float("nan")
    return out
