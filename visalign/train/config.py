"""The typed config of one training run, assembled from small sections (docs/extending.md#configuration).

A YAML recipe in ``pipelines/`` maps section names to fields; ``visalign train RECIPE key.sub=value`` overrides
any field. Every field's help string is its only documentation (``visalign train --help-config`` prints them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visalign.config import apply_overrides, from_dict, load_yaml
from visalign.rewards.advantages import AdvantageConfig
from visalign.text.config import TextConfig


@dataclass
class ModelConfig:
    model: str = field(default="", metadata={"help": "Generator: a hub id or a local diffusers pipeline folder."})
    dtype: str = field(default="float32", metadata={"help": "Compute dtype: float32, bfloat16 or float16."})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no | bf16 | fp16: autocast of the denoiser with float32 trainable weights (fp16 with loss "
                "scaling; a float16 model.dtype gets the scaling too). null = accelerate launch --mixed_precision "
                "(docs/architecture.md#scale)."})
    device: str = field(default="cpu", metadata={"help": "Device for the generator and scorers (cpu, cuda)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r; 0 fine-tunes the whole denoiser instead."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / rank)."})
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                    metadata={"help": "Denoiser layer names that get LoRA adapters."})
    gradient_checkpointing: bool = field(default=False,
                                         metadata={"help": "Recompute activations in backward to save memory."})
    resolution: int | None = field(default=None, metadata={"help": "Image side in pixels; null = the model's own."})
    init_lora: str | None = field(default=None, metadata={
        "help": "Start from a saved LoRA folder (a run's final/ or any diffusers LoRA) instead of a fresh one; its "
                "own rank, alpha and targets replace lora_rank, lora_alpha and lora_targets. null = fresh LoRA."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model.model is empty: give a hub id or a local pipeline folder.")
        if self.lora_rank < 0:
            raise ValueError(f"model.lora_rank must be >= 0 (0 = full fine-tune); got {self.lora_rank}.")
        if self.init_lora is not None and self.lora_rank == 0:
            raise ValueError("model.init_lora continues a LoRA, but lora_rank is 0 (full fine-tune); set lora_rank "
                             "> 0 or drop init_lora.")


@dataclass
class SampleConfig:
    prompts: str = field(default="", metadata={"help": "Training prompts of the online source: a .txt (one per "
                                                        "line) or a .jsonl/.csv with a 'prompt' column (other "
                                                        "columns reach the scorers as metadata); a relative path is "
                                                        "resolved against the recipe's folder, then the working "
                                                        "folder. Unused by offline sources."})
    prompts_per_step: int = field(default=4, metadata={"help": "Distinct prompts sampled per iteration, per "
                                                               "process (global: × the number of processes)."})
    images_per_prompt: int = field(default=4, metadata={"help": "Samples per prompt: the group size G of the "
                                                                "advantage normalisation (≥ 2)."})
    steps: int = field(default=10, metadata={"help": "Denoising steps per rollout."})
    guidance: float = field(default=4.0, metadata={"help": "Classifier-free guidance scale (≤ 1 disables CFG)."})
    eta: float = field(default=1.0, metadata={"help": "DDIM η / SDE noise level of rollouts (> 0 for log-probs)."})
    negative_prompt: str = field(default="", metadata={"help": "Negative prompt of the unconditional branch."})
    train_fraction: float = field(default=1.0, metadata={"help": "Train on the first ⌊f·steps⌋ steps of each "
                                                                 "rollout (flow_grpo's timestep_fraction)."})
    train_steps_per_update: int | None = field(default=None, metadata={
        "help": "Random subset of that many trained steps per update (ddpo-style); null = all of them."})
    sde_window: list[int] | None = field(default=None, metadata={
        "help": "[start, stop): only these steps are sampled with eta, the rest deterministically (MixGRPO / "
                "Flow-GRPO-Fast); e.g. [0, 3] with train_fraction 0.3 keeps the untrained steps on the sampler "
                "you evaluate with. null = eta on every step."})

    def __post_init__(self) -> None:
        if self.sde_window is not None and (len(self.sde_window) != 2 or not 0 <= self.sde_window[0]
                                            < self.sde_window[1] <= self.steps):
            raise ValueError(f"sample.sde_window {self.sde_window} must be [start, stop) with 0 <= start < stop <= "
                             f"sample.steps ({self.steps}).")
        if self.images_per_prompt < 2:
            raise ValueError(f"sample.images_per_prompt must be >= 2 (a group needs two samples to compare); "
                             f"got {self.images_per_prompt}.")
        if self.prompts_per_step < 1 or self.steps < 1:
            raise ValueError("sample.prompts_per_step and sample.steps must be >= 1.")


@dataclass
class RewardConfig:
    terms: list[Any] = field(default_factory=list, metadata={
        "help": "Scorers: ids, or mappings {scorer, weight, transform, name, params}."})
    aggregation: Any = field(default="weighted-sum", metadata={
        "help": "weighted-sum | gdpo | pareto | worst-case | mean-minus-var (or {kind: ..., params})."})
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig, metadata={
        "help": "Group advantage normalisation."})

    pareto: bool = field(default=False, metadata={"help": "Parrot-style: only the batch's non-dominated samples "
                                                          "(over the reward terms) carry the update."})
    uncertainty_weights: bool = field(default=True, metadata={
        "help": "Multiply per-sample losses by extras['weight'] of uncertainty-aware scorers when present."})
    deployments: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Named places scorers run, used as '@name' in terms: {name: {kind: local|http|openai, scorer, url, "
                "model, token_env, params}} (docs/serving.md#deployments)."})
    dtype: str = field(default="float32", metadata={"help": "Compute dtype of the scorers: float32, bfloat16 or "
                                                            "float16 (rewards are float32 either way)."})
    retries: int = field(default=2, metadata={"help": "A scorer that raises (a flaky server) is called again this "
                                                      "many times, with backoff, before its step is skipped "
                                                      "(docs/architecture.md#faults)."})
    retry_backoff_s: float = field(default=1.0, metadata={"help": "Wait before the first retry, doubled per retry."})
    max_consecutive_skips: int = field(default=3, metadata={
        "help": "More steps skipped in a row than this stop the run with the scorer's error."})

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"reward.dtype is {self.dtype!r}; use float32, bfloat16 or float16.")
        if self.retries < 0 or self.retry_backoff_s < 0 or self.max_consecutive_skips < 0:
            raise ValueError("reward.retries, reward.retry_backoff_s and reward.max_consecutive_skips must be >= 0.")


@dataclass
class ObjectiveConfig:
    name: str = field(default="grpo", metadata={"help": "Objective id: grpo, prdp, dragon, raft, draft, alignprop, "
                                                        "refl, diffusion-dpo, rpo-harmonic, nft, awm, rg-lcm, r0; "
                                                        "text: text-grpo, text-rloo, text-dpo, text-best-of-n (or "
                                                        "pkg.module:Class)."})
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Objective hyper-parameters: the fields of the objective's Params (listed by --help-config)."})
    pareto: bool | None = field(default=None, metadata={"help": "Deprecated: use reward.pareto."})
    uncertainty_weights: bool | None = field(default=None, metadata={
        "help": "Deprecated: use reward.uncertainty_weights."})


@dataclass
class PairsConfig:
    path: str = field(default="", metadata={"help": "Preference pairs: a .jsonl/.csv (image paths relative to it), "
                                                    "a datasets save_to_disk folder, or a hub dataset id."})
    split: str = field(default="train", metadata={"help": "Split of a datasets folder or hub dataset."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column of the preferred image (image 0 with "
                                                                   "label_column)."})
    rejected_column: str = field(default="rejected", metadata={"help": "Column of the rejected image (image 1 with "
                                                                       "label_column)."})
    label_column: str | None = field(default=None, metadata={
        "help": "Column with P(image 0 preferred) for two-image rows (Pick-a-Pic style); null = chosen/rejected."})
    label_scorer: str | None = field(default=None, metadata={
        "help": "Label each pair with σ(R(chosen) − R(rejected)) of this reference-based scorer (e.g. "
                "lambda-harmonic-vit-b32 for RPO), the chosen image serving as the reference; null = hard labels."})
    pairs_per_step: int = field(default=4, metadata={"help": "Pairs per iteration, per process."})
    limit: int | None = field(default=None, metadata={"help": "Read at most this many rows (first N)."})

    def __post_init__(self) -> None:
        if self.pairs_per_step < 1:
            raise ValueError(f"source.pairs.pairs_per_step must be >= 1; got {self.pairs_per_step}.")


@dataclass
class SourceConfig:
    name: str = field(default="", metadata={"help": "Experience source: online (sample → score → advantages) or "
                                                    "pairs (offline preference pairs) or teacher (teacher ODE "
                                                    "trajectories for a few-step student); empty = the "
                                                    "objective's default (pairs for diffusion-dpo and "
                                                    "rpo-harmonic, teacher for rg-lcm and r0)."})
    pairs: PairsConfig = field(default_factory=PairsConfig, metadata={"help": "The pairs source's data."})


@dataclass
class OptimConfig:
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global grad norm to this (0 = off)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up, in optimizer steps."})
    ema_decay: float | None = field(default=None, metadata={"help": "EMA of trainable weights (e.g. 0.99); null = "
                                                                    "off. Eval and the final save use the EMA."})
    grad_accumulation: int = field(default=1, metadata={
        "help": "Objective micro-steps (ctx.optimizer_step calls) per optimizer step; the step uses their mean "
                "gradient. Leftovers are stepped at the end of each iteration (no gradient crosses iterations)."})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adamw-8bit (bitsandbytes; 8-bit moments)."})
    lr_scheduler: str | None = field(default=None, metadata={
        "help": "null (linear warm-up, then constant) or a diffusers.optimization.get_scheduler name: linear, "
                "cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup."})
    lr_schedule_steps: int | None = field(default=None, metadata={
        "help": "Length of a decaying lr_scheduler, in optimizer steps."})

    def __post_init__(self) -> None:
        if self.grad_accumulation < 1:
            raise ValueError(f"optim.grad_accumulation must be >= 1 (1 = step on every micro-step); got "
                             f"{self.grad_accumulation}.")


@dataclass
class EvalConfig:
    prompts: str | None = field(default=None, metadata={"help": "Held-out prompt file; null = no evaluation."})
    every: int = field(default=0, metadata={"help": "Evaluate every N iterations (0 = only at start and end)."})
    scorers: list[Any] = field(default_factory=list, metadata={
        "help": "Held-out scorers (ids); default: the training reward terms."})
    steps: int | None = field(default=None, metadata={"help": "Sampling steps for eval; null = sample.steps."})
    eta: float = field(default=0.0, metadata={"help": "η / noise level for eval samples (0 = deterministic)."})
    max_prompts: int = field(default=16, metadata={"help": "At most this many eval prompts (first N)."})
    seed: int = field(default=1234, metadata={"help": "Eval seed: the same noise every time, so evals pair."})
    early_stop_metric: str | None = field(default=None, metadata={
        "help": "Stop when this eval metric (e.g. eval/reward) has not improved for early_stop_patience evals, and "
                "save the best weights as final/ (RPO's validation λ-Harmonic); null = run every iteration."})
    early_stop_patience: int = field(default=3, metadata={"help": "Evals without improvement before stopping."})


@dataclass
class RunConfig:
    output_dir: str = field(default="runs/train", metadata={"help": "Run folder: config, metrics, grids, "
                                                                    "checkpoints, final weights."})
    iterations: int = field(default=50, metadata={"help": "Rollout → score → update iterations."})
    seed: int = field(default=0, metadata={"help": "Seed of prompts, noise and step subsets."})
    checkpoint_every: int = field(default=10, metadata={"help": "Save a resumable checkpoint every N iterations."})
    keep_last: int = field(default=2, metadata={"help": "Keep this many checkpoints (older ones are deleted)."})
    grid_every: int = field(default=0, metadata={"help": "Write an image grid of the eval prompts every N "
                                                         "iterations (0 = at start and end)."})
    tensorboard: bool = field(default=True, metadata={"help": "Also log to TensorBoard when it is installed."})
    wandb: bool = field(default=False, metadata={"help": "Also log to Weights & Biases (needs wandb installed)."})
    report_to: list[str] | None = field(default=None, metadata={
        "help": "Trackers: any of tensorboard, wandb; null = from run.tensorboard and run.wandb. metrics.jsonl is "
                "written either way; grids go to every tracker."})
    wandb_project: str | None = field(default=None, metadata={"help": "wandb project (null: wandb's default)."})
    wandb_name: str | None = field(default=None, metadata={"help": "wandb run name (null: wandb's default)."})
    wandb_resume_id: str | None = field(default=None, metadata={
        "help": "wandb run id to continue (resume='allow'), so a resumed training run logs into the same run."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar with the live reward."})

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.checkpoint_every < 1 or self.keep_last < 1:
            raise ValueError("run.iterations, run.checkpoint_every and run.keep_last must be >= 1.")


@dataclass
class DistillConfig:
    student_steps: int = field(default=2, metadata={
        "help": "Sampling steps of the few-step student (1-4 typical); the saved pipeline's LCMScheduler samples it "
                "with num_inference_steps = this (teacher source; docs/methods.md#distillation)."})
    student_guidance: float = field(default=1.0, metadata={
        "help": "CFG scale the student samples with; <= 1 runs the conditional branch only (the teacher's guidance "
                "is distilled into the weights): call the saved pipeline with guidance_scale=this."})
    teacher_steps: int = field(default=20, metadata={
        "help": "Teacher ODE steps N (DDIM eta 0 on LCM's skip grid of N timesteps, 999 ... T/N - 1); the saved "
                "LCMScheduler's original_inference_steps."})
    teacher_guidance: float = field(default=4.0, metadata={"help": "CFG scale of the teacher's ODE."})

    def __post_init__(self) -> None:
        if not 1 <= self.student_steps <= self.teacher_steps:
            raise ValueError(f"distill.student_steps is {self.student_steps}; LCMScheduler samples 1 to "
                             f"distill.teacher_steps ({self.teacher_steps}) steps (use 1-4 for a few-step student).")


@dataclass
class TrainConfig:
    model: ModelConfig = field(metadata={"help": "The generator and how it is trained."})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={
        "help": "Rollouts: prompts, group size, sampler (the eval sampler too)."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={
        "help": "The reward: scorers, transforms, aggregation, advantages."})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "The objective."})
    source: SourceConfig = field(default_factory=SourceConfig, metadata={"help": "Where experience comes from."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer and schedule."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Held-out evaluation."})
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Output, length, checkpoints, logs."})
    text: TextConfig = field(default_factory=TextConfig, metadata={
        "help": "Text generation of causal-LM runs (text-* objectives; docs/methods.md#text-core)."})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={
        "help": "Few-step student and teacher schedules (source.name: teacher; visalign distill)."})

    def __post_init__(self) -> None:
        o = self.objective
        for key in ("pareto", "uncertainty_weights"):  # moved to the reward: post-processing lives in RewardSpec
            value = getattr(o, key)
            if value is not None:
                warnings.warn(f"objective.{key} is deprecated and will be removed in visalign 0.3; use reward.{key}.",
                              FutureWarning, stacklevel=2)
                setattr(self.reward, key, value)
                setattr(o, key, None)
        if (self.source.name or _default_source(o.name)) in ("online", "text-online"):
            if not self.sample.prompts:
                raise ValueError("sample.prompts is empty: give a prompt file (.txt, .jsonl or .csv).")
            if not self.reward.terms:
                raise ValueError("reward.terms is empty: name at least one scorer, e.g. terms: [brightness].")
        elif self.source.name == "teacher" or (not self.source.name and _default_source(o.name) == "teacher"):
            if not self.sample.prompts:
                raise ValueError("sample.prompts is empty: the teacher source samples the teacher on a prompt file "
                                 "(.txt, .jsonl or .csv).")
        elif not self.source.pairs.path and (self.source.name or _default_source(o.name)) == "pairs":
            raise ValueError("source.pairs.path is empty: give a pair file (.jsonl/.csv with prompt, chosen, "
                             "rejected columns), a datasets folder or a hub dataset id.")


def _default_source(objective: str) -> str:
    """The objective's default source, or "online" when the id does not resolve (the trainer reports that)."""
    from visalign.objectives.base import OBJECTIVES

    try:
        return OBJECTIVES.get(objective).default_source
    except Exception:  # an unknown id: the trainer raises the registry's error with the known ids
        return "online"


def load_train_config(recipe: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe (or nothing), apply ``key.sub=value`` overrides, validate, and return the config.

    Relative prompt paths are resolved against the recipe's folder when they exist there, else the working folder.
    """
    data = load_yaml(recipe) if recipe else {}
    data = apply_overrides(data, overrides or [])
    if "model" not in data:
        raise ValueError("The recipe has no 'model' section; see pipelines/ for examples.")
    config = from_dict(TrainConfig, data)
    if recipe:
        base = Path(recipe).resolve().parent
        config.sample.prompts = _resolve(config.sample.prompts, base)
        if config.source.pairs.path:
            config.source.pairs.path = _resolve(config.source.pairs.path, base)
        if config.eval.prompts:
            config.eval.prompts = _resolve(config.eval.prompts, base)
        config.model.model = _resolve(config.model.model, base)
    return config


def _resolve(path: str, base: Path) -> str:
    if Path(path).is_absolute() or Path(path).exists() or not (base / path).exists():
        return path
    return str(base / path)
