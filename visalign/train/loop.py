"""The online training loop: rollout → score → advantages → objective update, with checkpoints and logs.

Each stage is its own method (STYLE.md §2.2). Everything random in an iteration (prompts, noise, step subsets,
the objective's shuffles) is derived from ``(run.seed, iteration, process)``, so a run resumed from a checkpoint
replays exactly what an uninterrupted run would have done.

Under ``accelerate launch`` the loop is data parallel (``visalign/train/distributed.py``): each process samples and
scores its own prompt groups, gradients are averaged across processes before every optimizer step, metrics are
gathered for logging, and only the main process writes logs, grids, checkpoints and the final weights. Process 0
draws exactly what a single-process run draws, so one process behaves as it always has.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visalign.config import to_dict
from visalign.generators import LoraSpec, load_generator, select_train_steps
from visalign.objectives.base import UpdateBatch, UpdateContext, build_objective
from visalign.scorers import ScoreBatch
from visalign.scorers.aggregate import pareto_mask
from visalign.scorers.compose import RewardOutput, RewardSpec
from visalign.train.advantages import group_index
from visalign.train.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from visalign.train.config import TrainConfig
from visalign.train.diagnostics import CollapseMonitor, group_diversity
from visalign.train.distributed import (
    Distributed,
    GradientSync,
    build_accelerator,
    gather_reward_metrics,
    mean_over_processes,
)
from visalign.train.logging import RunLogger
from visalign.train.prompts import PromptStream, read_prompt_file, read_prompt_table


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. every sample's reward is NaN); the message says what to check."""


@dataclass
class Scored:
    """One iteration's rollout with its rewards, after NaN samples were dropped."""

    batch: UpdateBatch
    reward: RewardOutput
    dropped: int


class Trainer:
    """Builds every component from a :class:`TrainConfig` and runs the loop."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.dist = Distributed(build_accelerator(config.model.device))
        self.run_dir = Path(config.run.output_dir)
        _check_writable(self.run_dir)
        if config.run.wandb and importlib.util.find_spec("wandb") is None:
            raise TrainingError("run.wandb is true but wandb is not installed: pip install wandb, or set "
                                "run.wandb=false (metrics.jsonl and TensorBoard are written either way).")
        # Prompt files are checked before the (slow) model load, so a bad file fails in a second.
        prompts, metadata = read_prompt_table(config.sample.prompts)
        self.prompts = PromptStream(prompts, seed=config.run.seed, metadata=metadata)
        if config.sample.prompts_per_step > len(self.prompts.prompts):
            raise ValueError(f"sample.prompts_per_step is {config.sample.prompts_per_step} but {config.sample.prompts}"
                             f" has only {len(self.prompts.prompts)} distinct prompts (a step draws distinct prompts, "
                             "one group each); lower sample.prompts_per_step or add prompts.")
        self.eval_prompts = (read_prompt_file(config.eval.prompts)[: config.eval.max_prompts]
                             if config.eval.prompts else [])
        m = config.model
        # A bare "cuda" means this process's own GPU under accelerate launch (cuda:LOCAL_RANK).
        device = str(self.dist.device) if m.device == "cuda" else m.device
        # Objective params and scorer ids are checked before the model load too (scorer weights load lazily).
        self.objective = build_objective(config.objective.name, config.objective.params)
        self.reward = RewardSpec.from_config({"terms": config.reward.terms, "aggregation": config.reward.aggregation,
                                              "advantage": config.reward.advantage, "device": device})
        self.eval_reward = (RewardSpec.from_config({"terms": config.eval.scorers, "device": device})
                            if config.eval.scorers else self.reward)
        blocking = self.reward.blocking_terms() if self.objective.needs_reward_grad else []
        if blocking:
            raise ValueError(f"objective {config.objective.name!r} backpropagates the reward, but reward term(s) "
                             f"{blocking} cannot return gradients to the pixels; use "
                             "differentiable scorers (CLIP, embedding heads; `visalign scorers` lists them) or give "
                             "those terms weight 0.")
        torch.manual_seed(config.run.seed)  # the same on every process: LoRA initialises identically
        self.adapter = load_generator(m.model, dtype=m.dtype, device=device)
        if config.sample.sde_window is not None:
            if not hasattr(self.adapter, "configure_sde"):
                raise ValueError(f"sample.sde_window needs a generator with SDE windows (DDIM UNet or flow "
                                 f"families); {type(self.adapter).__name__} has none.")
            self.adapter.configure_sde(window=tuple(config.sample.sde_window))
        if m.init_lora is not None:
            self.adapter.load(m.init_lora)  # a stage that continues an earlier run's adapter
        elif m.lora_rank > 0:
            self.adapter.add_lora(LoraSpec(rank=m.lora_rank, alpha=m.lora_alpha, target_modules=list(m.lora_targets)))
        else:
            self.adapter.train_full()
        if m.gradient_checkpointing:
            self.adapter.set_gradient_checkpointing(True)
        self.params = {n: p for n, p in self.adapter.denoiser.named_parameters() if p.requires_grad}
        self.dist.broadcast_parameters(self.params.values())
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        warmup = max(o.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if o.ema_decay else None
        self.grad_sync = GradientSync(list(self.params.values()), self.dist, o.grad_accumulation, self._optimizer_step)
        self.iteration = 0
        self.optimizer_steps = 0
        self.collapse = CollapseMonitor()
        self.logger: RunLogger | None = None
        self.history: list[dict[str, float]] = []
        self.first_eval: dict[str, float] = {}

    # ------------------------------------------------------------ stages

    def _seed(self, salt: int) -> int:
        # Process 0 keeps the single-process seeds; other processes are offset by a large prime, so per-sample
        # seeds (seed + i) of different processes and iterations do not collide for batches up to ~3,700.
        offset = self.dist.process_index * 15_485_863
        return (self.config.run.seed * 1_000_003 + self.iteration * 7919 + salt + offset) % (2**31 - 1)

    def sample(self) -> Any:
        """Roll out ``prompts_per_step`` prompts × ``images_per_prompt`` samples (a :class:`Rollout`, no graph)."""
        s = self.config.sample
        res = self.config.model.resolution
        # Every process advances the shared stream by all processes' draws and keeps its own, so the stream's
        # position is the same everywhere (one checkpointed state) and processes get different prompts.
        for rank in range(self.dist.num_processes):
            drawn = self.prompts.take_with_metadata(s.prompts_per_step)
            if rank == self.dist.process_index:
                prompts, metadata = drawn
        rollout = self.adapter.rollout(prompts, images_per_prompt=s.images_per_prompt, steps=s.steps,
                                       guidance=s.guidance, eta=s.eta, seed=self._seed(1),
                                       negative_prompt=s.negative_prompt, height=res, width=res)
        if any(metadata):  # the prompt table's other columns, one dict per sample, for the scorers
            rollout.extras["metadata"] = [m for m in metadata for _ in range(s.images_per_prompt)]
        return rollout

    def score(self, rollout: Any) -> Scored:
        """Rewards, advantages, Pareto/NaN masks and uncertainty weights of a rollout, as an :class:`UpdateBatch`.

        Raises:
            TrainingError: when no sample has a finite reward.
        """
        batch = ScoreBatch(prompts=rollout.prompts, media=rollout.media, metadata=rollout.extras.get("metadata"))
        reward = self.reward(batch, group_ids=rollout.prompts)
        finite = torch.isfinite(reward.total)
        if not finite.any():
            raise TrainingError(f"Every sample's reward is NaN at iteration {self.iteration} (terms "
                                f"{self.reward.names}); a scorer abstains on all of them — check its inputs.")
        groups = group_index(rollout.prompts, len(rollout))
        keep = finite.clone()
        if self.config.objective.pareto:
            stacked = torch.stack([reward.per_scorer[n] for n in self.reward.names], dim=1)
            keep &= pareto_mask(torch.nan_to_num(stacked, nan=-math.inf))
        weights = torch.ones(len(rollout))
        if self.config.objective.uncertainty_weights:
            for key, value in reward.extras.items():
                if key.endswith("/weight") and value.shape == weights.shape:
                    weights = weights * torch.nan_to_num(value.detach().float().cpu(), nan=0.0)
            # Mean 1 over the samples that carry the update (UpdateBatch's contract): the weights re-balance samples
            # without rescaling the learning rate.
            kept_mean = weights[keep].mean() if keep.any() else torch.tensor(0.0)
            if kept_mean > 0:
                weights = weights / kept_mean
        advantages = torch.nan_to_num(reward.advantages.detach().float().cpu(), nan=0.0)
        batch = UpdateBatch(rollout=rollout, rewards=torch.nan_to_num(reward.total.detach().float().cpu(), nan=0.0),
                            per_scorer={k: v.detach().cpu() for k, v in reward.per_scorer.items()},
                            advantages=torch.where(keep, advantages, torch.zeros_like(advantages)),
                            group_ids=groups, weights=weights, keep=keep)
        return Scored(batch, reward, int((~finite).sum()))

    def train_steps(self, rollout: Any) -> list[int]:
        """Rollout steps to train on: the configured fraction, without deterministic steps, optionally subsampled.

        A step whose log-prob is not finite for some sample has no density (zero noise: DDIM's last step lands on
        ᾱ = 1, CPS's last step, an ODE step outside an SDE window); training on it would turn the weights into NaN.
        """
        s = self.config.sample
        if not self.objective.needs_log_probs:  # reward backprop picks its own steps and may sample with η = 0
            return select_train_steps(rollout.num_steps, fraction=s.train_fraction)
        stochastic = set(stochastic_steps(rollout))
        steps = [j for j in select_train_steps(rollout.num_steps, fraction=s.train_fraction) if j in stochastic]
        if not steps:
            raise TrainingError(f"None of the trained steps has a finite log-prob (sample.eta = {s.eta}); rollouts "
                                "need noise (eta > 0) on the trained steps.")
        if s.train_steps_per_update and s.train_steps_per_update < len(steps):
            g = torch.Generator().manual_seed(self._seed(2))
            pick = torch.randperm(len(steps), generator=g)[: s.train_steps_per_update]
            steps = sorted(steps[i] for i in pick.tolist())
        return steps

    def update(self, scored: Scored) -> dict[str, float]:
        """The objective's gradient steps on one scored rollout; returns its metrics (loss, clipfrac, grad_norm...)."""
        self.adapter.denoiser.train(False)  # dropout stays off: it would break the ratio-1 invariant
        ctx = UpdateContext(self.adapter, self.train_steps(scored.batch.rollout), self.grad_sync.micro_step,
                            torch.Generator().manual_seed(self._seed(3)),
                            reward=self.reward_with_grad if self.objective.needs_reward_grad else None)
        self.grad_sync.norms = []
        metrics = self.objective.update(scored.batch, ctx)
        self.grad_sync.flush()
        norms = self.grad_sync.norms
        if norms:  # the steps actually taken (accumulating calls return NaN to the objective)
            metrics["grad_norm"] = sum(norms) / len(norms)
        return metrics

    def reward_with_grad(self, media: torch.Tensor, prompts: list[str], metadata: list[Any] | None = None
                         ) -> torch.Tensor:
        """The training reward's total ``[B]`` with the graph back to ``media`` (reward backprop). Running
        transform statistics are left as the rollout's scoring set them: this re-scores the same samples."""
        with _frozen_transforms(self.reward):
            return self.reward(ScoreBatch(prompts=list(prompts), media=media, metadata=metadata), grad=True).total

    def _optimizer_step(self) -> float:
        """Clip, step the optimizer, LR schedule and EMA, zero the gradients (called by :class:`GradientSync` with
        the mean, cross-process gradient in ``.grad``); returns the pre-clip global grad norm."""
        params = list(self.params.values())
        max_norm = self.config.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.ema is not None:
            decay = self.config.optim.ema_decay
            with torch.no_grad():
                for name, p in self.params.items():
                    self.ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
        return float(norm)

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Score fixed-seed samples of the eval prompts (EMA weights when on) with the held-out eval scorers and
        with the training proxy, so the two curves can be compared (METHODS §15, proxy vs gold).

        Returns:
            ``eval/reward...`` (held-out scorers; the proxy's own when ``eval.scorers`` is empty) and, with separate
            eval scorers, ``eval/proxy/reward...``; empty without eval prompts and on processes other than the main
            one (the replicas hold the same weights, so one evaluation serves all).
        """
        if not self.eval_prompts or not self.dist.is_main:
            return {}
        e = self.config.eval
        res = self.config.model.resolution
        with self._ema_weights():
            rollout = self.adapter.rollout(self.eval_prompts, images_per_prompt=1, steps=e.steps or
                                           self.config.sample.steps, guidance=self.config.sample.guidance, eta=e.eta,
                                           seed=e.seed, negative_prompt=self.config.sample.negative_prompt,
                                           height=res, width=res)
        batch = ScoreBatch(prompts=rollout.prompts, media=rollout.media)
        with _frozen_transforms(self.eval_reward):
            held_out = self.eval_reward(batch)
        metrics = {f"eval/{k}": v for k, v in held_out.metrics().items() if k.startswith("reward")}
        if self.eval_reward is not self.reward:
            with _frozen_transforms(self.reward):  # eval samples must not move the training reward's statistics
                proxy = self.reward(batch)
            metrics.update({f"eval/proxy/{k}": v for k, v in proxy.metrics().items() if k.startswith("reward")})
        if self.logger is not None:
            self.logger.grid(self.iteration, rollout.media, columns=min(8, len(self.eval_prompts)))
        return metrics

    def path_kl(self, rollout: Any, num_steps: int = 2) -> float:
        """Path KL to the reference (LoRA-off) model, ``E Σ_t ||mu_θ − mu_ref||² / (2σ_t²)`` summed over latent
        elements (METHODS §15), estimated on this iteration's own SDE rollout from ``num_steps`` evenly spaced
        stochastic steps, scaled by ``S / num_steps``. NaN without LoRA (no reference to switch to) or for a
        deterministic sampler."""
        if self.adapter.lora is None or rollout.eta <= 0:
            return float("nan")
        total_steps = rollout.num_steps
        stochastic = stochastic_steps(rollout)  # a zero-noise step has std 0: its KL term would be inf/NaN
        if not stochastic:
            return float("nan")
        picks = sorted({stochastic[round(i * (len(stochastic) - 1) / max(num_steps - 1, 1))]
                        for i in range(num_steps)})
        per_step = []
        with torch.no_grad():
            for j in picks:
                ours = self.adapter.recompute_step(rollout, j)
                with self.adapter.lora_disabled():
                    ref = self.adapter.recompute_step(rollout, j)
                kl = ((ours.mean.float() - ref.mean.float()) ** 2 / (2 * ours.std.float() ** 2)).flatten(1).sum(1)
                per_step.append(kl.mean())
        return float(torch.stack(per_step).mean() * total_steps)

    @contextlib.contextmanager
    def _ema_weights(self) -> Iterator[None]:
        """Inside the block the trainable weights are the EMA's (a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write a checkpoint (the main process writes; every process must call this, since each one's RNG and
        reward-transform state is gathered into it). Weights, optimizer, EMA, schedule and prompt position are the
        same on every process and saved once."""
        # Only RNG and stateful reward transforms differ between processes (each sees its own samples).
        own = (torch.get_rng_state(), self.reward.state_dict())
        gathered = self.dist.gather_objects(own)
        path = checkpoint_dir(self.run_dir) / f"step-{self.iteration:06d}"
        if self.dist.is_main:
            extra = {"torch_rng": gathered[0][0]}
            extra.update({f"torch_rng.rank{r}": g[0] for r, g in enumerate(gathered) if r > 0})
            if self.ema is not None:
                extra.update({f"ema.{n}": t for n, t in self.ema.items()})
            # The objective's own state (e.g. DRAGON's frozen reference of a full fine-tune), the same everywhere.
            extra.update({f"objective.{k}": t for k, t in self.objective.state_tensors().items()})
            state = {"iteration": self.iteration, "optimizer_steps": self.optimizer_steps,
                     "scheduler": self.scheduler.state_dict(), "prompts": self.prompts.state_dict(),
                     "reward": self.reward.state_dict(), "eval_reward": self.eval_reward.state_dict(),
                     "collapse": self.collapse.state_dict(), "first_eval": self.first_eval}
            if self.dist.multi:
                state["num_processes"] = self.dist.num_processes
                state["reward_other_ranks"] = [g[1] for g in gathered[1:]]
            path = save_checkpoint(self.run_dir, self.iteration, params=self.params, optimizer=self.optimizer,
                                   extra_tensors=extra, state=state, keep_last=self.config.run.keep_last)
        self.dist.wait()
        return path

    def resume(self) -> bool:
        """Restore the newest complete checkpoint of ``run.output_dir``; False when there is none.

        Restores weights, optimizer (AdamW moments and step counts), LR schedule, EMA, RNG state, prompt-stream
        position, stateful reward transforms and the diagnostics' baselines; metrics rows logged after the
        checkpoint (by a run that was killed later) are dropped, since the resumed run logs those steps again.
        Every process loads the checkpoint the main process picked, and its own RNG and reward-transform state.
        """
        path = self.dist.broadcast_object(latest_checkpoint(self.run_dir))
        if path is None:
            return False
        params, optimizer, extra, state = load_checkpoint(path)
        missing = sorted(set(self.params) - set(params))
        reshaped = sorted(n for n in set(self.params) & set(params) if params[n].shape != self.params[n].shape)
        if missing or reshaped:
            example = (f"missing {missing[:2]}" if missing else
                       f"{reshaped[0]} has shape {tuple(params[reshaped[0]].shape)}")
            raise TrainingError(f"Checkpoint {path} does not fit this model ({example}); it was written by a "
                                "different model or LoRA configuration (e.g. model.lora_rank). Start over with "
                                "--no-resume or pick another run.output_dir.")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(params[name])
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.prompts.load_state_dict(state["prompts"])
        self._load_process_state(state, extra)
        if self.eval_reward is not self.reward:
            self.eval_reward.load_state_dict(state.get("eval_reward", {}))
        if self.ema is not None:
            self.ema = {n: extra[f"ema.{n}"].clone() for n in self.params}
        self.objective.load_state_tensors({k.removeprefix("objective."): t for k, t in extra.items()
                                           if k.startswith("objective.")}, self.adapter)
        self.iteration = int(state["iteration"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.collapse.load_state_dict(state.get("collapse", {}))
        self.first_eval = dict(state.get("first_eval", {}))
        rows = truncate_metrics(self.run_dir, self.iteration) if self.dist.is_main else None
        rows = self.dist.broadcast_object(rows)
        self.history = [r for r in rows if "reward" in r and r["reward"] is not None]
        return True

    def _load_process_state(self, state: dict[str, Any], extra: dict[str, torch.Tensor]) -> None:
        """This process's RNG and reward-transform state from a checkpoint (process 0's when it was written by
        fewer processes: the run goes on, but no longer replays what an uninterrupted run would have done)."""
        rank = self.dist.process_index
        saved_by = int(state.get("num_processes", 1))
        if saved_by != self.dist.num_processes and self.dist.is_main:
            self._write(f"warning: the checkpoint was written by {saved_by} process(es) and is resumed by "
                        f"{self.dist.num_processes}; sampling differs from an uninterrupted run from here on.")
        others = state.get("reward_other_ranks", [])
        reward_state = others[rank - 1] if 0 < rank <= len(others) else state["reward"]
        self.reward.load_state_dict(reward_state)
        torch.set_rng_state(extra.get(f"torch_rng.rank{rank}", extra["torch_rng"]))

    # ------------------------------------------------------------ the loop

    def run(self, resume: bool = True) -> dict[str, Any]:
        """Train for ``run.iterations`` iterations (continuing a checkpoint when ``resume``); return the summary."""
        from tqdm import tqdm

        r = self.config.run
        main = self.dist.is_main
        resumed = self.resume() if resume else False
        if main:  # one writer: the other processes log nothing and save nothing
            if not resumed:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=1))
            self.logger = RunLogger(self.run_dir, tensorboard=r.tensorboard, wandb=r.wandb,
                                    config=to_dict(self.config))
        if not resumed:
            self.first_eval = self.evaluate()
            if self.first_eval:
                self.logger.log(self.iteration, self.first_eval)
        self.bar = tqdm(total=r.iterations, initial=self.iteration, disable=not (r.progress and main), unit="it",
                        dynamic_ncols=True)
        try:
            while self.iteration < r.iterations:
                metrics = self.one_iteration()
                self.history.append(metrics)
                self.bar.update(1)
                self.bar.set_postfix(reward=f"{metrics['reward']:.4f}", refresh=False)
                if self.iteration % r.checkpoint_every == 0 or self.iteration == r.iterations:
                    self.save_checkpoint()
        finally:
            self.bar.close()
        self._check_replicas()
        final_eval = self.evaluate()
        summary = self._summary(self.history, self.first_eval, final_eval)
        if main:
            if final_eval:
                self.logger.log(self.iteration, final_eval)
            with self._ema_weights():
                self.adapter.save(self.run_dir / "final")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            self.logger.close()
        self.dist.wait()
        return summary

    def _check_replicas(self) -> None:
        """Raise when the processes' trainable weights differ (gradients were not synchronised): the main
        process saves its own copy, and a silent divergence would make that copy one of several models."""
        if not self.dist.multi:
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
        """Sample → score → update once; log and return the iteration's metrics."""
        t0 = time.perf_counter()
        rollout = self.sample()
        t1 = time.perf_counter()
        scored = self.score(rollout)
        t2 = time.perf_counter()
        update = self.update(scored)
        t3 = time.perf_counter()
        self.iteration += 1
        adv = scored.batch.advantages[scored.batch.keep]
        metrics: dict[str, float] = {**update}
        metrics.update({"nan_dropped": float(scored.dropped), "lr": self.scheduler.get_last_lr()[0],
                        "time/sample": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
                        "time/iteration": t3 - t0, "samples_per_second": len(rollout) / (t3 - t0),
                        "advantage_abs_mean": float(adv.abs().mean()) if adv.numel() else 0.0,
                        "advantage_std": float(adv.std()) if adv.numel() > 1 else 0.0,
                        "diversity": group_diversity(rollout.media.cpu(), scored.batch.group_ids)})
        if self.dist.multi:  # every process gets the same combined metrics (the collapse monitor stays in sync)
            metrics = mean_over_processes(self.dist.gather_objects(metrics))
        metrics = {**gather_reward_metrics(scored.reward, self.dist), **metrics}
        warning = self.collapse.check(metrics.get("reward_std", float("nan")))
        if warning:
            metrics["collapse_warning"] = 1.0
            if self.collapse.warned == 1 and self.dist.is_main:  # printed once per run; the metric keeps counting
                self._write(f"warning: {warning}")
        e = self.config.eval
        if self.eval_prompts and e.every and self.iteration % e.every == 0:
            metrics.update(self.evaluate())
            if self.dist.is_main:  # of the main process's rollout, beside its evaluation
                metrics["path_kl"] = self.path_kl(rollout)
        if self.logger is not None:
            if self.config.run.grid_every and self.iteration % self.config.run.grid_every == 0:
                self.logger.grid(self.iteration, rollout.media, columns=self.config.sample.images_per_prompt,
                                 tag="train")
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
        return {"iterations": self.iteration, "train_reward_first": mean_of(history[:k], "reward"),
                "train_reward_last": mean_of(history[-k:], "reward"),
                "reward_std_first": mean_of(history[:k], "reward_std"),
                "reward_std_last": mean_of(history[-k:], "reward_std"),
                "diversity_first": mean_of(history[:k], "diversity"),
                "diversity_last": mean_of(history[-k:], "diversity"),
                "path_kl_last": mean_of([r for r in history if r.get("path_kl") is not None][-1:], "path_kl"),
                "nan_dropped": int(sum(r.get("nan_dropped") or 0 for r in history)),
                "eval_before": first, "eval_after": last,
                "collapse_warnings": int(sum(r.get("collapse_warning") or 0 for r in history)),
                "final_weights": str(self.run_dir / "final")}


def stochastic_steps(rollout: Any) -> list[int]:
    """Indices of the rollout's steps whose log-prob is finite for every sample, i.e. that have a density (not
    DDIM's last step onto ᾱ = 1, CPS's last step, or an ODE step outside an SDE window)."""
    finite = torch.isfinite(rollout.log_probs).all(dim=0)
    return [j for j in range(rollout.num_steps) if bool(finite[j])]


@contextlib.contextmanager
def _frozen_transforms(spec: RewardSpec) -> Iterator[None]:
    """Running reward statistics (``running-zscore``) stay untouched inside the block: evaluation reads them."""
    frozen = [t for t in spec.transforms.values() if getattr(t, "update", False)]
    for t in frozen:
        t.update = False
    try:
        yield
    finally:
        for t in frozen:
            t.update = True


def truncate_metrics(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """Drop ``metrics.jsonl`` rows logged after ``step`` (and a torn last line) and return the rows kept."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if row.get("step", 0) <= step:
            kept.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"Cannot write to run.output_dir {folder} ({err.strerror or err}); choose a writable "
                              "folder with run.output_dir=PATH.") from None
