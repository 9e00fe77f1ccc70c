"""The training engine: parameters, optimizer and schedule, EMA, gradient sync, checkpoints, logs and eval hooks.

The engine knows nothing about where experience comes from. Per iteration it asks its experience source
(``visalign/train/sources/``: ``online`` samples and scores the model, ``pairs`` reads preference pairs) for one
batch and hands it to the objective (docs/architecture.md)::

    batch = source.next()
    metrics = objective.update(batch, ctx)      # ctx: adapter, optimizer_step, seeded generator, scorers...

Everything random in an iteration (prompts, noise, step subsets, pair order, the objective's shuffles) is derived
from ``(run.seed, iteration, process)``, so a run resumed from a checkpoint replays exactly what an uninterrupted
run would have done.

Under ``accelerate launch`` the loop is data parallel (``visalign/train/distributed.py``): each process makes its own
batches, gradients are averaged across processes before every optimizer step, metrics are gathered for logging, and
only the main process writes logs, grids, checkpoints and the final weights. Process 0 draws exactly what a
single-process run draws, so one process behaves as it always has.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from visalign.config import to_dict
from visalign.generators import LoraSpec
from visalign.objectives.base import UpdateContext, build_objective
from visalign.rewards import RewardSpec
from visalign.scorers import ScoreBatch, get_scorer
from visalign.train import sharding
from visalign.train.checkpoint import latest_checkpoint
from visalign.train.config import TrainConfig
from visalign.train.deployments import resolve_terms
from visalign.train.distributed import Distributed, GradientSync, build_accelerator, mean_over_processes
from visalign.train.evaluate import Evaluator
from visalign.train.faults import StepSkipped, StopRequest, stop_on_signals
from visalign.train.logging import RunLogger
from visalign.train.optim import build_optimizer, build_scheduler
from visalign.train.precision import Precision, check_launch_settings, resolve_precision
from visalign.train.resuming import CheckpointingMixin, truncate_metrics
from visalign.train.sources import SourceContext, check_compatible, source_class
from visalign.train.sources.online import TrainingError, stochastic_steps

__all__ = ["Trainer", "TrainingError", "stochastic_steps", "truncate_metrics"]


class Trainer(CheckpointingMixin):
    """Builds every component from a :class:`TrainConfig` and runs the loop.

    Everything that can be checked without the model is checked first (objective params and its compatibility with
    the source, prompt and pair files, scorer ids, reward gradients), so a bad recipe fails in a second.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        check_launch_settings()  # before accelerate reads them: a setting the loop cannot honour is refused
        m = config.model
        precision = resolve_precision(m.mixed_precision, m.dtype, full_finetune=m.lora_rank == 0)
        self.dist = Distributed(build_accelerator(config.model.device))
        self.run_dir = Path(config.run.output_dir)
        _check_writable(self.run_dir)
        self.trackers = trackers(config.run)
        if "wandb" in self.trackers and importlib.util.find_spec("wandb") is None:
            raise TrainingError("wandb is asked for but not installed: pip install wandb, or set run.wandb=false and "
                                "leave it out of run.report_to (metrics.jsonl and TensorBoard are written anyway).")
        # A bare "cuda" means this process's own GPU under accelerate launch (cuda:LOCAL_RANK).
        device = str(self.dist.device) if m.device == "cuda" else m.device
        self.objective = build_objective(config.objective.name, config.objective.params)
        # FSDP2 for a full fine-tune (docs/architecture.md#fsdp); None: the all-reduce path (or one process).
        self.fsdp = sharding.fsdp_launch(os.environ, full_finetune=m.lora_rank == 0 and m.init_lora is None,
                                         objective=self.objective, mixed_precision=precision)
        if self.fsdp is not None and not self.dist.multi:
            raise ValueError("accelerate launch --use_fsdp with one process: there is nothing to shard over; launch "
                             "with --num_processes 2 or more, or without --use_fsdp.")
        source_cls = source_class(config.source.name or self.objective.default_source)
        check_compatible(source_cls, type(self.objective))
        r = config.reward
        terms = resolve_terms(r.terms, r.deployments, device=device, dtype=getattr(torch, r.dtype))
        self.reward = (RewardSpec.from_config({"terms": terms, "aggregation": r.aggregation,
                                               "advantage": r.advantage, "device": device, "pareto": r.pareto,
                                               "uncertainty_weights": r.uncertainty_weights, "dtype": r.dtype,
                                               "modality": source_cls.modality})
                       if r.terms else None)
        self.eval_reward = (RewardSpec.from_config({"terms": config.eval.scorers, "device": device,
                                                    "modality": source_cls.modality})
                            if config.eval.scorers else self.reward)
        self.scorers = self._objective_scorers(device)
        self._check_reward_grad()
        self.iteration = 0
        self.source = source_cls(SourceContext(config=config, dist=self.dist, seed=self._seed, reward=self.reward,
                                               write=self._write, iteration=lambda: self.iteration),
                                 self.objective.needs)
        self.evaluator = Evaluator(config, self.reward, self.eval_reward)
        torch.manual_seed(config.run.seed)  # the same on every process: LoRA initialises identically
        self.adapter = source_cls.load_model(m, device)  # a diffusers generator, or a causal LM for text sources
        self.source.attach(self.adapter)
        self.precision = Precision(precision, torch.device(device))
        self.evaluator.sampler = self.source.eval_sampler()
        self._setup_training(m)
        self.precision.wrap(self.adapter.denoiser)
        self.optimizer_steps = 0
        self.logger: RunLogger | None = None
        self.history: list[dict[str, float]] = []
        self.first_eval: dict[str, float] = {}
        self.early_stop = {"best": None, "since_best": 0, "stopped": False}
        self.best_params: dict[str, torch.Tensor] | None = None
        self.skipped_steps = 0  # iterations skipped because their scorer kept failing (docs/architecture.md#faults)
        self.stopped_by = ""  # the signal that ended the run early, if one did

    # ------------------------------------------------------------ building

    def _objective_scorers(self, device: str) -> dict[str, Any]:
        """The scorers the objective names (:meth:`Objective.scorer_specs`), built here so objectives never build
        their own; weights still load on first call."""
        scorers = {}
        for key, spec in self.objective.scorer_specs().items():
            scorer = get_scorer(spec, device=device)
            if not scorer.differentiable:
                raise ValueError(f"objective.params.{key} is {spec!r}, which cannot return gradients to the pixels; "
                                 "pick a differentiable scorer (`visalign scorers list` shows which).")
            scorers[key] = scorer
        return scorers

    def _check_reward_grad(self) -> None:
        if "reward_grad" not in self.objective.needs:
            return
        if self.reward is None:
            raise ValueError(f"objective {self.config.objective.name!r} backpropagates the reward, but reward.terms "
                             "is empty.")
        blocking = self.reward.blocking_terms()
        if blocking:
            raise ValueError(f"objective {self.config.objective.name!r} backpropagates the reward, but reward term(s) "
                             f"{blocking} cannot return gradients to the pixels; use "
                             "differentiable scorers (CLIP, embedding heads; `visalign scorers` lists them) or give "
                             "those terms weight 0.")

    def _setup_training(self, m: Any) -> None:
        """LoRA or full fine-tune, the trainable parameters, optimizer, schedule, EMA and gradient sync."""
        if m.init_lora is not None:
            self.adapter.load(m.init_lora)  # a stage that continues an earlier run's adapter
        elif m.lora_rank > 0:
            self.adapter.add_lora(LoraSpec(rank=m.lora_rank, alpha=m.lora_alpha, target_modules=list(m.lora_targets)))
        else:
            self.adapter.train_full()
        if m.gradient_checkpointing or (self.fsdp is not None and self.fsdp.activation_checkpointing):
            self.adapter.set_gradient_checkpointing(True)
        self.dist.broadcast_parameters(p for p in self.adapter.denoiser.parameters() if p.requires_grad)
        if self.fsdp is not None:  # after the broadcast: every process shards the same weights
            sharding.shard_denoiser(self.adapter.denoiser, self.fsdp)
        self.params = {n: p for n, p in self.adapter.denoiser.named_parameters() if p.requires_grad}
        o = self.config.optim
        self.optimizer = build_optimizer(self.params.values(), o)
        self.scheduler = build_scheduler(self.optimizer, o)
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if o.ema_decay else None
        sync = sharding.ShardedGradientSync if self.fsdp is not None else GradientSync
        self.grad_sync = sync(list(self.params.values()), self.dist, o.grad_accumulation, self._optimizer_step)

    # ------------------------------------------------------------ one update

    def _seed(self, salt: int) -> int:
        # Process 0 keeps the single-process seeds; other processes are offset by a large prime, so per-sample
        # seeds (seed + i) of different processes and iterations do not collide for batches up to ~3,700.
        offset = self.dist.process_index * 15_485_863
        return (self.config.run.seed * 1_000_003 + self.iteration * 7919 + salt + offset) % (2**31 - 1)

    def update(self, batch: Any) -> dict[str, float]:
        """The objective's gradient steps on one batch; returns its metrics (loss, clipfrac, grad_norm...)."""
        self.adapter.denoiser.train(False)  # dropout stays off: it would break the ratio-1 invariant
        ctx = UpdateContext(self.adapter, self.source.train_steps(batch), self.grad_sync.micro_step,
                            torch.Generator().manual_seed(self._seed(3)),
                            reward=self.reward_with_grad if "reward_grad" in self.objective.needs else None,
                            scorers=self.scorers, equal_micro_batches=self.grad_sync.equal_micro_batches)
        self.grad_sync.norms = []
        metrics = self.objective.update(batch, ctx)
        self.grad_sync.flush()
        norms = self.grad_sync.norms
        if norms:  # the steps actually taken (accumulating calls return NaN to the objective)
            metrics["grad_norm"] = sum(norms) / len(norms)
        return metrics

    def reward_with_grad(self, media: torch.Tensor, prompts: list[str], metadata: list[Any] | None = None
                         ) -> torch.Tensor:
        """The training reward's total ``[B]`` with the graph back to ``media`` (reward backprop). Running
        transform statistics are left as the rollout's scoring set them: this re-scores the same samples."""
        with self.reward.frozen_transforms():
            return self.reward(ScoreBatch(prompts=list(prompts), media=media, metadata=metadata), grad=True).total

    def _optimizer_step(self) -> float:
        """Clip, step the optimizer, LR schedule and EMA, zero the gradients (called by :class:`GradientSync` with
        the mean, cross-process gradient in ``.grad``); returns the pre-clip global grad norm."""
        norm = self.precision.step(self.optimizer, list(self.params.values()), self.config.optim.max_grad_norm)
        if not self.precision.last_skipped:  # an fp16 overflow skipped the step: the schedule waits too
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.ema is not None:
            decay = self.config.optim.ema_decay
            with torch.no_grad():
                for name, p in self.params.items():
                    self.ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
        return norm

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Score fixed-seed samples of the eval prompts (EMA weights when on) with the held-out eval scorers and
        with the training proxy (:class:`~visalign.train.evaluate.Evaluator`); write the eval grid.

        Returns:
            ``eval/reward...`` and, with separate eval scorers, ``eval/proxy/reward...``; empty without eval prompts
            and on processes other than the main one (the replicas hold the same weights, so one evaluation serves
            all).
        """
        # Sharded, every process takes part in the sampling (each denoiser call gathers weights) and all but
        # the main one drop the result.
        if not self.evaluator.active or not (self.dist.is_main or self.fsdp is not None):
            return {}
        with self._ema_weights():
            metrics, media = self.evaluator(self.adapter)
        if not self.dist.is_main:
            return {}
        if self.logger is not None and media is not None:  # text evaluations have no grid
            self.logger.grid(self.iteration, media, columns=min(8, len(self.evaluator.prompts)))
        return metrics

    def _track_early_stop(self, metrics: dict[str, float]) -> None:
        """Keep the best weights by ``eval.early_stop_metric`` (higher is better) and stop after
        ``eval.early_stop_patience`` evaluations without improvement; every process gets the main one's verdict."""
        key = self.config.eval.early_stop_metric
        if key is None:
            return
        state = self.early_stop
        value = metrics.get(key) if self.dist.is_main else None
        if self.dist.is_main and value is None:
            raise TrainingError(f"eval.early_stop_metric {key!r} is not among the eval metrics "
                                f"{sorted(k for k in metrics if k.startswith('eval/'))}.")
        improved = False
        if self.dist.is_main:
            improved = state["best"] is None or value > state["best"]
            if improved:
                state["best"], state["since_best"] = float(value), 0
            else:
                state["since_best"] += 1
            state["stopped"] = state["since_best"] >= self.config.eval.early_stop_patience
        self.early_stop, improved = self.dist.broadcast_object((dict(state), improved))
        if improved and (self.dist.is_main or self.fsdp is not None):  # sharded: each process keeps its shard
            with self._ema_weights():
                self.best_params = {n: p.detach().clone() for n, p in self.params.items()}

    @contextlib.contextmanager
    def _ema_weights(self) -> Iterator[None]:
        """Inside the block the trainable weights are the EMA's (a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        with self._swapped(self.ema):
            yield

    @contextlib.contextmanager
    def _sampling_weights(self) -> Iterator[None]:
        """Inside the block the trainable weights are the objective's sampling policy
        (:meth:`~visalign.objectives.base.Objective.sampling_weights`; a no-op for on-policy objectives)."""
        weights = self.objective.sampling_weights()
        if weights is None:
            yield
            return
        with self._swapped(weights):
            yield

    @contextlib.contextmanager
    def _swapped(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside the block the trainable weights are ``weights`` (copied in); the current ones come back on exit."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    # ------------------------------------------------------------ the loop

    def run(self, resume: bool = True, resume_changed: bool = False) -> dict[str, Any]:
        """Train for ``run.iterations`` iterations (continuing a checkpoint when ``resume``); return the summary.

        SIGTERM / SIGINT end the run after the iteration in flight, at a checkpoint (docs/architecture.md#faults):
        the summary then has ``stopped_by`` set and no final weights are written; running again resumes.
        """
        with stop_on_signals() as stop:
            return self._run(resume, resume_changed, stop)

    def _run(self, resume: bool, resume_changed: bool, stop: StopRequest) -> dict[str, Any]:
        from tqdm import tqdm

        r = self.config.run
        main = self.dist.is_main
        resumed = self.resume(resume_changed) if resume else False
        if main:  # one writer: the other processes log nothing and save nothing
            if not resumed:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=1))
            wandb_init = {k: v for k, v in (("project", r.wandb_project), ("name", r.wandb_name),
                                            ("id", r.wandb_resume_id)) if v is not None}
            if r.wandb_resume_id is not None:
                wandb_init["resume"] = "allow"
            self.logger = RunLogger(self.run_dir, tensorboard="tensorboard" in self.trackers,
                                    wandb="wandb" in self.trackers, config=to_dict(self.config),
                                    wandb_init=wandb_init)
        if not resumed:
            self.first_eval = self.evaluate()
            if self.first_eval:
                self.logger.log(self.iteration, self.first_eval)
            if self.evaluator.active:  # on every process: the main one broadcasts its verdict
                self._track_early_stop(self.first_eval)
        self.bar = tqdm(total=r.iterations, initial=self.iteration, disable=not (r.progress and main), unit="it",
                        dynamic_ncols=True)
        try:
            while self.iteration < r.iterations and not self.early_stop["stopped"]:
                metrics = self.one_iteration()
                self.history.append(metrics)
                self.bar.update(1)
                shown = metrics.get("reward", metrics.get("loss"))
                if shown is not None:
                    self.bar.set_postfix(reward=f"{shown:.4f}", refresh=False)
                signalled = self._stop_requested(stop)
                if (self.iteration % r.checkpoint_every == 0 or self.iteration == r.iterations
                        or self.early_stop["stopped"] or signalled):
                    self.save_checkpoint()
                if signalled:
                    self.stopped_by = signalled
                    break
        finally:
            self.bar.close()
        if self.stopped_by:
            return self._stopped_summary()
        if self.early_stop["stopped"] and main:
            self._write(f"early stop at iteration {self.iteration}: {self.config.eval.early_stop_metric} has not "
                        f"improved on {self.early_stop['best']:.4f} for {self.early_stop['since_best']} evaluations.")
        self._check_replicas()
        final_eval = self.evaluate()
        summary = self._summary(self.history, self.first_eval, final_eval)
        self._save_final()
        if main:
            if final_eval:
                self.logger.log(self.iteration, final_eval)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            self.logger.close()
        self.dist.wait()
        return summary

    def _stop_requested(self, stop: StopRequest) -> str:
        """The name of the stop signal any process got ("" when none): every process stops at the same step."""
        names = self.dist.gather_objects(stop.name)
        return next((n for n in names if n), "")

    def _stopped_summary(self) -> dict[str, Any]:
        """The summary of a run stopped by a signal at a checkpoint (no final evaluation or weights)."""
        summary = self._summary(self.history, self.first_eval, {})
        summary.update(stopped_by=self.stopped_by, final_weights=None,
                       checkpoint=str(latest_checkpoint(self.run_dir)))
        if self.dist.is_main:
            self._write(f"{self.stopped_by}: stopped after iteration {self.iteration} at checkpoint "
                        f"{summary['checkpoint']}; run the same command again to resume.")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            self.logger.close()
        self.dist.wait()
        return summary

    @contextlib.contextmanager
    def _final_weights(self) -> Iterator[None]:
        """The weights final/ is saved with: the best by the early-stop metric when it is tracked, else the EMA's
        (or the current ones without EMA)."""
        if self.best_params is None:
            with self._ema_weights():
                yield
            return
        with self._swapped(self.best_params):
            yield

    def _save_final(self) -> None:
        """Write ``final/`` from the main process (sharded: from the full weights every process gathers)."""
        with self._final_weights():
            if self.fsdp is not None:
                full = sharding.full_model_state(self.adapter.denoiser, list(self.params))
                if self.dist.is_main:
                    sharding.save_full_pipeline(self.adapter, full, self.run_dir / "final")
            elif self.dist.is_main:
                self.adapter.save(self.run_dir / "final")

    def _check_replicas(self) -> None:
        """Raise when the processes' trainable weights differ (gradients were not synchronised): the main
        process saves its own copy, and a silent divergence would make that copy one of several models.
        Sharded weights have no replicas to compare."""
        if not self.dist.multi or self.fsdp is not None:
            return
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in self.params.values()]).cpu()
        rows = self.dist.gather_objects(sums)
        for rank, other in enumerate(rows[1:], start=1):
            if not torch.equal(other, rows[0]):
                bad = list(self.params)[int((other != rows[0]).nonzero()[0])]
                raise TrainingError(f"The weights of process {rank} differ from process 0's (first: {bad}); "
                                    "gradients were not synchronised across processes.")

    def one_iteration(self) -> dict[str, float]:
        """Source → update once; log and return the iteration's metrics."""
        t0 = time.perf_counter()
        failure = ""
        with self._sampling_weights():
            try:
                batch = self.source.next()
            except StepSkipped as err:
                failure = str(err)
        failures = self.dist.gather_objects(failure)  # a step skipped on one process is skipped on all
        if any(failures):
            return self._skip_iteration(next(f for f in failures if f))
        t1 = time.perf_counter()
        update = self.update(batch)
        t2 = time.perf_counter()
        self.iteration += 1
        metrics: dict[str, float] = {**update, **self.source.local_metrics(batch), **self.precision.metrics()}
        metrics.update({"lr": self.scheduler.get_last_lr()[0], "time/update": t2 - t1, "time/iteration": t2 - t0,
                        "samples_per_second": len(batch) / (t2 - t0)})
        if self.dist.multi:  # every process gets the same combined metrics (the collapse monitor stays in sync)
            metrics = mean_over_processes(self.dist.gather_objects(metrics))
        metrics = self.source.global_metrics(batch, metrics)
        e = self.config.eval
        if self.evaluator.active and e.every and self.iteration % e.every == 0:
            evaluated = self.evaluate()
            metrics.update(evaluated)
            if self.dist.is_main:  # of the main process's batch, beside its evaluation
                metrics.update(self.source.eval_metrics(batch))
            self._track_early_stop(evaluated)
        if self.logger is not None:
            grid = self.source.grid(batch)
            if self.config.run.grid_every and self.iteration % self.config.run.grid_every == 0 and grid is not None:
                self.logger.grid(self.iteration, grid[0], columns=grid[1], tag="train")
            self.logger.log(self.iteration, metrics)
        return metrics

    def _skip_iteration(self, failure: str) -> dict[str, float]:
        """Skip an iteration whose scoring kept failing: no update; the iteration number (hence every seed) still
        advances, so the steps after it are those an uninterrupted run would make."""
        self.iteration += 1
        self.skipped_steps += 1
        if self.dist.is_main:
            self._write(f"warning: iteration {self.iteration} skipped, scoring failed after "
                        f"{self.config.reward.retries} retries ({failure}); {self.skipped_steps} skipped so far.")
        metrics = {"step_skipped": 1.0, "skipped_steps": float(self.skipped_steps),
                   "lr": self.scheduler.get_last_lr()[0]}
        if self.logger is not None:
            self.logger.log(self.iteration, metrics)
        return metrics

    def _write(self, message: str) -> None:
        """Print above the progress bar without breaking it."""
        bar = getattr(self, "bar", None)
        if bar is not None and not bar.disable:
            bar.write(message)
        else:
            print(message)

    def _summary(self, history: list[dict[str, float]], first: dict[str, float], last: dict[str, float]
                 ) -> dict[str, Any]:
        def mean_of(rows: list[dict[str, float]], key: str) -> float:
            vals = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
            return sum(vals) / len(vals) if vals else float("nan")

        k = max(1, len(history) // 5)
        summary = {"iterations": self.iteration, "train_reward_first": mean_of(history[:k], "reward"),
                   "train_reward_last": mean_of(history[-k:], "reward"),
                   "reward_std_first": mean_of(history[:k], "reward_std"),
                   "reward_std_last": mean_of(history[-k:], "reward_std"),
                   "diversity_first": mean_of(history[:k], "diversity"),
                   "diversity_last": mean_of(history[-k:], "diversity"),
                   "path_kl_last": mean_of([r for r in history if r.get("path_kl") is not None][-1:], "path_kl"),
                   "nan_dropped": int(sum(r.get("nan_dropped") or 0 for r in history)),
                   "eval_before": first, "eval_after": last,
                   "collapse_warnings": int(sum(r.get("collapse_warning") or 0 for r in history)),
                   "skipped_steps": self.skipped_steps,
                   "final_weights": str(self.run_dir / "final")}
        if self.config.eval.early_stop_metric is not None:
            summary["early_stop"] = dict(self.early_stop)
        return summary


TRACKERS = ("tensorboard", "wandb")


def trackers(run: Any) -> set[str]:
    """The trackers of ``run.report_to`` (or of the run.tensorboard / run.wandb switches when it is null)."""
    if run.report_to is None:
        return {name for name, on in (("tensorboard", run.tensorboard), ("wandb", run.wandb)) if on}
    unknown = sorted(set(run.report_to) - set(TRACKERS))
    if unknown:
        raise TrainingError(f"run.report_to names {unknown}; the trackers are {list(TRACKERS)} (metrics.jsonl is "
                            "always written).")
    return set(run.report_to)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"Cannot write to run.output_dir {folder} ({err.strerror or err}); choose a writable "
                              "folder with run.output_dir=PATH.") from None
