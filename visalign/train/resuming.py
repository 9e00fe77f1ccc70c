"""Checkpoints of the training engine: what :class:`~visalign.train.loop.Trainer` writes and how a run resumes
(docs/architecture.md#faults). A mixin, so the engine's state stays on one object; the file format itself is
``visalign/train/checkpoint.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visalign.config import to_dict
from visalign.rewards import RewardSpec
from visalign.train import sharding
from visalign.train.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from visalign.train.faults import config_changes
from visalign.train.sources.online import TrainingError


class CheckpointingMixin:
    """``save_checkpoint`` / ``resume`` of the engine; the attributes they read are the :class:`Trainer`'s."""

    # The engine's state these methods use (set by Trainer.__init__ and its set-up).
    config: Any
    dist: Any
    run_dir: Path
    iteration: int

    def save_checkpoint(self) -> Path:
        """Write a checkpoint (the main process writes; every process must call this, since each one's RNG and
        reward-transform state is gathered into it). Weights, optimizer, EMA, schedule and the source's position
        are the same on every process and saved once."""
        # Only RNG and stateful reward transforms differ between processes (each sees its own samples).
        own = (torch.get_rng_state(), _state(self.reward))
        gathered = self.dist.gather_objects(own)
        path = checkpoint_dir(self.run_dir) / f"step-{self.iteration:06d}"
        weights = {}
        if self.ema is not None:
            weights.update({f"ema.{n}": t for n, t in self.ema.items()})
        # The objective's own state (e.g. DRAGON's frozen reference of a full fine-tune), the same everywhere.
        weights.update({f"objective.{k}": t for k, t in self.objective.state_tensors().items()})
        if self.best_params is not None:  # the early stop's best weights so far: final/ is saved from them
            weights.update({f"best.{n}": t for n, t in self.best_params.items()})
        params, optimizer = self.params, self.optimizer
        if self.fsdp is not None:  # full tensors, gathered by every process: the single-process checkpoint format
            weights = sharding.gather_full(weights)
            params = sharding.full_model_state(self.adapter.denoiser, list(self.params))
            optimizer = sharding.full_optimizer_state(self.adapter.denoiser, self.optimizer, list(self.params))
        if self.dist.is_main:
            extra = {"torch_rng": gathered[0][0]}
            extra.update({f"torch_rng.rank{r}": g[0] for r, g in enumerate(gathered) if r > 0})
            extra.update(weights)
            state = {"iteration": self.iteration, "optimizer_steps": self.optimizer_steps,
                     "scheduler": self.scheduler.state_dict(), "source": self.source.state_dict(),
                     "reward": _state(self.reward), "eval_reward": _state(self.eval_reward),
                     "first_eval": self.first_eval, "early_stop": self.early_stop,
                     "skipped_steps": self.skipped_steps, "config": to_dict(self.config),
                     "precision": self.precision.state_dict(), "mixed_precision": self.precision.mode}
            if self.dist.multi:
                state["num_processes"] = self.dist.num_processes
                state["reward_other_ranks"] = [g[1] for g in gathered[1:]]
            try:
                path = save_checkpoint(self.run_dir, self.iteration, params=params, optimizer=optimizer,
                                       extra_tensors=extra, state=state, keep_last=self.config.run.keep_last)
            except OSError as err:  # disk full, quota: the half-written folder is gone, the previous one intact
                previous = latest_checkpoint(self.run_dir)
                kept = f"the previous checkpoint {previous.name} is intact" if previous else "there is no earlier one"
                raise TrainingError(f"Could not write checkpoint {path.name} ({err.strerror or err}); {kept}. Free "
                                    "space (or lower run.keep_last) and re-run the same command to resume.") from None
        self.dist.wait()
        return path

    def resume(self, resume_changed: bool = False) -> bool:
        """Restore the newest complete checkpoint of ``run.output_dir``; False when there is none.

        A checkpoint written with a different recipe (other than its length and logging,
        :data:`~visalign.train.faults.RESUMABLE_CHANGES`) is refused with the differences, unless
        ``resume_changed`` (then they are printed as a warning and the run continues with the new recipe).

        Restores weights, optimizer (AdamW moments and step counts), LR schedule, EMA, RNG state, the source's
        state (prompt-stream or pair position, the diagnostics' baselines), stateful reward transforms; metrics rows
        logged after the checkpoint (by a run that was killed later) are dropped, since the resumed run logs those
        steps again.
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
        changes = config_changes(state["config"], to_dict(self.config)) if "config" in state else []
        saved_mode = state.get("mixed_precision", self.precision.mode)  # as resolved (recipe or launcher)
        if saved_mode != self.precision.mode:
            changes.append(f"mixed precision (model.mixed_precision or accelerate launch): {saved_mode!r} → "
                           f"{self.precision.mode!r}")
        if changes:
            more = f"\n  ... and {len(changes) - 20} more" if len(changes) > 20 else ""
            listed = "\n  ".join(changes[:20]) + more
            if not resume_changed:
                raise TrainingError(f"The recipe differs from the one checkpoint {path} was written with:\n  "
                                    f"{listed}\nResume with --resume-changed to continue with the new values anyway, "
                                    "start over with --no-resume, or pick another run.output_dir.")
            if self.dist.is_main:
                self._write(f"warning: resuming {path} with a changed recipe (--resume-changed):\n  {listed}")
        self._load_weights(params, optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.source.load_state_dict(state["source"])
        self._load_process_state(state, extra)
        if self.eval_reward is not None and self.eval_reward is not self.reward:
            self.eval_reward.load_state_dict(state.get("eval_reward", {}))
        if self.ema is not None:
            self.ema = {n: sharding.shard_like(extra[f"ema.{n}"], p).clone() for n, p in self.params.items()}
        self.objective.load_state_tensors({k.removeprefix("objective."): t for k, t in extra.items()
                                           if k.startswith("objective.")}, self.adapter)
        self.iteration = int(state["iteration"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.first_eval = dict(state.get("first_eval", {}))
        self.early_stop = dict(state.get("early_stop", self.early_stop))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.precision.load_state_dict(state.get("precision", {}))
        best = {n: sharding.shard_like(extra[f"best.{n}"], p).clone() for n, p in self.params.items()
                if f"best.{n}" in extra}
        self.best_params = best or None
        rows = truncate_metrics(self.run_dir, self.iteration) if self.dist.is_main else None
        rows = self.dist.broadcast_object(rows)
        self.history = [r for r in rows if "lr" in r]  # iteration rows (evaluation-only rows have no lr)
        return True

    def _load_weights(self, params: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> None:
        """A checkpoint's trainable weights and optimizer state (full tensors; sharded into place under FSDP)."""
        if self.fsdp is not None:
            sharding.load_full_model_state(self.adapter.denoiser, {n: params[n] for n in self.params})
            sharding.load_full_optimizer_state(self.adapter.denoiser, self.optimizer, optimizer, list(self.params))
            return
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(params[name])
        self.optimizer.load_state_dict(optimizer)

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
        if self.reward is not None:
            self.reward.load_state_dict(reward_state)
        torch.set_rng_state(extra.get(f"torch_rng.rank{rank}", extra["torch_rng"]))


def _state(spec: RewardSpec | None) -> dict[str, Any]:
    return {} if spec is None else spec.state_dict()


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
