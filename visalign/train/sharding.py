"""Full fine-tunes sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``accelerate launch --use_fsdp
--fsdp_version 2`` (docs/architecture.md#fsdp).

A LoRA run keeps the all-reduce data-parallel path of ``visalign/train/distributed.py``: its trainable weights are a
few MB, and every process holds the frozen base anyway. A full fine-tune is where sharding pays: each block of the
denoiser (:func:`shard_blocks`: a UNet's down, mid and up blocks, a DiT's transformer blocks) and then the root are
``fully_shard``-ed, so each process stores 1/N of the weights, their gradients and the AdamW moments; a block's
weights are all-gathered for its forward and its gradient is reduce-scattered inside backward, instead of the loop's
own all-reduce.

The hazard: those collectives run inside every forward and backward of the denoiser, so every process must call it
the same number of times, in the same order. Rollouts and evaluation do (same sizes on every process; evaluation runs
on all of them here), but an objective's update depends on the data: a process whose groups all have zero
advantage, or whose NaN samples were dropped, has fewer micro-batches. :class:`ShardedGradientSync` makes them
agree: the objective hands its micro-batch plan to ``ctx.equal_micro_batches``, every process learns the longest plan
(one all-gather), and the shorter ones are padded with ``None`` entries on which the objective runs the same passes
with zero weight (an exactly zero gradient). Only objectives that declare ``Objective.uniform_passes`` are allowed.

Checkpoints and ``final/`` are written from full state dicts (``get_model_state_dict(full_state_dict=True,
cpu_offload=True)``), so they have the single-process format and ``final/`` loads in stock diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# accelerate's FSDP settings (environment variables its launcher sets) → (refused?, what to do instead). Settings
# not listed are FSDP1 knobs FSDP2 has no use for (use_orig_params, sync_module_states, min_num_params) or are
# honoured (reshard_after_forward, activation_checkpointing).
FSDP_SETTINGS: dict[str, tuple[Callable[[str], bool], str]] = {
    "FSDP_VERSION": (lambda v: v.strip() != "2", "use --fsdp_version 2 (FSDP1's flat parameters are not supported)"),
    "FSDP_OFFLOAD_PARAMS": (lambda v: v.lower() == "true", "CPU offload of the shards is not supported; launch "
                            "with --fsdp_offload_params false"),
    "FSDP_CPU_RAM_EFFICIENT_LOADING": (lambda v: v.lower() == "true", "every process loads the pretrained weights; "
                                       "launch with --fsdp_cpu_ram_efficient_loading false"),
    "FSDP_STATE_DICT_TYPE": (lambda v: v not in ("", "FULL_STATE_DICT"),
                             "checkpoints are always full state dicts (the single-process format); use "
                             "--fsdp_state_dict_type FULL_STATE_DICT"),
    "FSDP_AUTO_WRAP_POLICY": (lambda v: v not in ("", "TRANSFORMER_BASED_WRAP"),
                              "the loop shards each block of the denoiser itself; use --fsdp_auto_wrap_policy "
                              "TRANSFORMER_BASED_WRAP"),
    "FSDP_TRANSFORMER_CLS_TO_WRAP": (lambda v: v.strip() != "", "the sharded blocks are the denoiser's block "
                                     "lists; leave --fsdp_transformer_layer_cls_to_wrap unset"),
    "FSDP_IGNORED_MODULES": (lambda v: v.strip() != "", "every denoiser module is sharded; leave "
                             "--fsdp_ignored_modules unset"),
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": (lambda v: v.lower() == "true", "activation offload is not supported"),
    "FSDP_FORWARD_PREFETCH": (lambda v: v.lower() == "true", "FSDP2 prefetches the next block itself; launch with "
                              "--fsdp_forward_prefetch false"),
    "FSDP_SHARDING_STRATEGY": (lambda v: v not in ("", "FULL_SHARD", "1"),
                               "FSDP2 shards fully; choose resharding with --fsdp_reshard_after_forward"),
}


@dataclass(frozen=True)
class FsdpLaunch:
    """The FSDP2 settings of a launch the loop honours.

    Attributes:
        reshard_after_forward: free a block's gathered weights after its forward (less memory, one more
            all-gather in backward); accelerate's ``fsdp_reshard_after_forward``.
        activation_checkpointing: recompute activations in backward (the denoiser's gradient checkpointing).
    """

    reshard_after_forward: bool = True
    activation_checkpointing: bool = False


def fsdp_launch(env: Mapping[str, str], *, full_finetune: bool, objective: Any, mixed_precision: str
                ) -> FsdpLaunch | None:
    """The FSDP2 settings of ``accelerate launch --use_fsdp`` (None without it); raise ValueError naming every
    setting or combination the loop cannot honour.

    Args:
        env: the launcher's environment (``os.environ``).
        full_finetune: the run trains every denoiser weight (``model.lora_rank: 0`` and no ``model.init_lora``).
        objective: the run's :class:`~visalign.objectives.base.Objective`.
        mixed_precision: the resolved mode (``no``, ``bf16``, ``fp16``).
    """
    if env.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None
    bad = [f"{name}={env[name]!r}: {advice}" for name, (refused, advice) in FSDP_SETTINGS.items()
           if name in env and refused(env[name])]
    if "FSDP_VERSION" not in env:
        bad.append(f"FSDP_VERSION unset: {FSDP_SETTINGS['FSDP_VERSION'][1]}")
    if not full_finetune:
        bad.append("a LoRA run (model.lora_rank > 0 or model.init_lora) with FSDP: LoRA trains a few MB of weights "
                   "over a frozen base every process holds anyway, and keeps the all-reduce data-parallel path; "
                   "launch without --use_fsdp, or set model.lora_rank=0 for a sharded full fine-tune")
    if not getattr(objective, "uniform_passes", False):
        bad.append(f"objective {objective.name!r} with FSDP: its update runs a data-dependent number of denoiser "
                   "passes per process, and FSDP's collectives need the same number on every process; use "
                   "objective.name=grpo, or launch without --use_fsdp")
    if mixed_precision == "fp16":
        bad.append("fp16 loss scaling with FSDP: the scaler does not unscale sharded gradients here; use "
                   "--mixed_precision bf16 (or no)")
    if bad:
        raise ValueError("accelerate launch asked for an FSDP setup this training loop cannot do (refused rather "
                         "than ignored):\n  " + "\n  ".join(bad))
    return FsdpLaunch(reshard_after_forward=env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false",
                      activation_checkpointing=env.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true")


def shard_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules :func:`shard_denoiser` shards before the root, in forward order where the model has one:
    the elements of the root's own ``ModuleList`` children (a UNet's ``down_blocks`` / ``up_blocks``, a DiT's
    ``transformer_blocks``) and a child block that is not in a list (a UNet's ``mid_block``); a model whose
    block lists sit deeper (a causal LM's ``model.layers``) shards the elements of its shallowest lists."""
    blocks: list[torch.nn.Module] = []
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
        elif name.endswith("block"):
            blocks.append(child)
    if not blocks:
        lists = [(n.count("."), m) for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList)]
        shallowest = min((depth for depth, _ in lists), default=None)
        blocks = [b for depth, m in lists if depth == shallowest for b in m]
    # A block without trainable weights gains nothing from its own unit (and FSDP wants some parameters).
    return [b for b in blocks if any(p.requires_grad for p in b.parameters())]


def shard_denoiser(module: torch.nn.Module, launch: FsdpLaunch) -> None:
    """``fully_shard`` each block of ``module`` (:func:`shard_blocks`), then the root, over all processes.

    Gradients are reduce-scattered as SUMS (divide factor 1): :class:`ShardedGradientSync` divides by the number
    of real micro-steps over all processes, as the all-reduce path does, and padded micro-steps must not count.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for block in shard_blocks(module):
        fully_shard(block, mesh=mesh, reshard_after_forward=launch.reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=launch.reshard_after_forward)
    for sub in module.modules():
        if hasattr(sub, "set_gradient_divide_factor"):
            # A plain SUM reduce-scatter: gloo has neither AVG nor PREMUL_SUM, and the sum is what we divide.
            sub.set_gradient_divide_factor(1.0)
            sub.set_force_sum_reduction_for_comms(True)


class ShardedGradientSync:
    """``ctx.optimizer_step`` for a sharded denoiser: the same interface and the same arithmetic as
    :class:`~visalign.train.distributed.GradientSync`, with FSDP doing the reduction inside backward.

    Every process runs the agreed plan (:meth:`equal_micro_batches`), so optimizer steps fall on the same
    micro-step on every process: one every ``accumulation`` micro-steps, and the rest at :meth:`flush`. At a step,
    ``.grad`` (sharded) holds the SUM over processes and micro-steps since the last step; it is divided by the
    number of real (unpadded) micro-steps among them, known from the plan without further communication, so the
    optimizer sees the mean micro-step gradient, exactly as in the all-reduce path.

    Args:
        params: the trainable (sharded ``DTensor``) parameters.
        dist: the process group (:class:`~visalign.train.distributed.Distributed`).
        accumulation: ``optim.grad_accumulation``.
        apply_step: clip, optimizer, schedule, EMA, zero grad; returns the pre-clip grad norm.
    """

    def __init__(self, params: Sequence[Tensor], dist: Any, accumulation: int, apply_step: Callable[[], float]
                 ) -> None:
        if accumulation < 1:
            raise ValueError(f"optim.grad_accumulation must be >= 1; got {accumulation}.")
        self.params = list(params)
        self.dist = dist
        self.accumulation = accumulation
        self.apply_step = apply_step
        self.pending = 0
        self.done = 0  # micro-steps (real or padding) of the current plan run so far
        self.counts: list[int] | None = None  # every process's number of real micro-steps in the current plan
        self.norms: list[float] = []

    def equal_micro_batches(self, chunks: Sequence[Any]) -> list[Any]:
        """The objective's micro-batch plan padded with ``None`` to the longest plan of any process (an all-gather;
        every process must call this once per update before its first backward)."""
        if self.counts is not None:
            raise RuntimeError("equal_micro_batches was called twice in one update; plan all micro-batches at once.")
        self.counts = [int(c) for c in self.dist.gather_objects(len(chunks))]
        self.done = 0
        return [*chunks, *[None] * (max(self.counts) - len(chunks))]

    def micro_step(self) -> float:
        """Called by the objective after each backward pass (real or padding); NaN when it only accumulates."""
        if self.counts is None:
            raise RuntimeError("Under FSDP an objective must plan its micro-batches with ctx.equal_micro_batches "
                               "before its first backward (every process runs the same passes).")
        self.done += 1
        self.pending += 1
        if self.done > max(self.counts):
            raise RuntimeError(f"the objective ran micro-step {self.done} of a plan of {max(self.counts)}.")
        if self.pending < self.accumulation:
            return float("nan")
        return self._step()

    def flush(self) -> None:
        """End of an update: step what is still accumulated and check that the whole plan ran."""
        if self.pending:
            self._step()
        if self.counts is not None and self.done != max(self.counts):
            raise RuntimeError(f"the objective ran {self.done} of the {max(self.counts)} planned micro-steps; "
                               "under FSDP every process must run the whole padded plan.")
        self.counts = None
        self.done = 0

    def _step(self) -> float:
        start = self.done - self.pending
        real = sum(max(0, min(count, self.done) - start) for count in self.counts)  # > 0: the longest plan's
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(real)
        self.pending = 0
        norm = self.apply_step()
        self.norms.append(norm)
        return norm


def is_sharded(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gather_full(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Full CPU copies of ``tensors`` (sharded ones all-gathered; a collective every process must call with the
    same names in the same order)."""
    return {name: (t.full_tensor() if is_sharded(t) else t).detach().cpu() for name, t in tensors.items()}


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This process's shard of ``full`` placed as ``like`` (no communication: every process holds ``full``), or
    ``full`` itself when ``like`` is not sharded."""
    if not is_sharded(like):
        return full.to(like.device, like.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device_mesh.device_type).to(like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(module: torch.nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """``names`` of ``module``'s full state dict, on the main process (empty elsewhere; a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options())
    return {n: state[n] for n in names if n in state}


def load_full_model_state(module: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Shard a full state dict (held by every process) into ``module``'s parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str]
                         ) -> dict[str, Any]:
    """The optimizer's full state on the main process in ``optimizer.state_dict()``'s own layout (parameters
    numbered in ``names`` order), so a sharded run's checkpoint is the single-process one; a collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(module, optimizer, options=_options())
    if not state:  # processes other than the main one get nothing
        return {}
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any],
                              names: Sequence[str]) -> None:
    """Shard a checkpoint's optimizer state (:func:`full_optimizer_state`'s layout, held by every process) into
    ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    named = {"state": {names[int(i)]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, named, options=StateDictOptions(full_state_dict=True))


def save_full_pipeline(adapter: Any, full_state: Mapping[str, Tensor], directory: str | Path) -> Path:
    """Write ``adapter``'s pipeline with its denoiser's weights set to ``full_state``: the folder a single-process
    full fine-tune writes (``GeneratorAdapter.save``), loadable by stock ``DiffusionPipeline.from_pretrained``.

    The sharded module cannot be serialised (its weights are ``DTensor`` shards), so an unsharded twin of the
    denoiser's own class takes its place in the pipeline while it is saved.
    """
    from torch.distributed.fsdp import FSDPModule

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sharded = adapter.denoiser
    # fully_shard swaps the module's class for a subclass of (FSDPModule, the class); the twin is the latter.
    cls = next(c for c in type(sharded).__mro__ if not issubclass(c, FSDPModule))
    twin = cls.from_config(sharded.config)
    missing, unexpected = twin.load_state_dict(dict(full_state), strict=False)
    if unexpected or any(n in dict(sharded.named_parameters()) for n in missing):
        raise RuntimeError(f"the gathered weights do not fit {cls.__name__} (missing {missing[:2]}, unexpected "
                           f"{unexpected[:2]}).")
    pipeline, name = adapter.pipeline, adapter.denoiser_name
    entry = pipeline.config[name]
    setattr(pipeline, name, twin)
    try:
        pipeline.save_pretrained(directory, safe_serialization=True)
    finally:
        # object.__setattr__: the pipeline's own __setattr__ would record the FSDP class name in model_index.json.
        object.__setattr__(pipeline, name, sharded)
        pipeline.register_to_config(**{name: entry})
    return directory
