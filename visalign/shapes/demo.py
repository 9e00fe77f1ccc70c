"""``visalign demo``: align the shipped shapes-world model with a learned proxy reward and show what changed.

Stages (each announced on the console):

1. load the shipped base pipeline (``assets/shapes/t2i``) through the ``visalign train`` Trainer (LoRA attached);
2. *before*: sample the evaluation prompts with fixed seeds (DDIM, η = 0) and grade them with the exact oracle
   (:mod:`visalign.shapes.oracle`) and with the proxy reward;
3. align: the Trainer's own loop (GRPO with an SDE window by default) against the proxy
   (``shapes-clip-tuned-contrast``, the CLIP proxy tuned on the base model's own samples, plus the ``shapes-colour``
   fidelity term by default); the oracle rides along as a zero-weight reward term so its curve on the training
   samples is logged next to the proxy's. Then a short polish stage (DRaFT-K on the same reward's differentiable
   terms, η = 0) continues the aligned LoRA and re-renders the hues the policy gradient let drift;
4. *after*: the same prompts and seeds again, so every image pairs with its before image;
5. ``report.html``: before/after images per prompt, reward and oracle curves, a per-attribute table and the gap
   between what the proxy says and what the oracle measures (docs/methods.md#hacking-diagnostics, proxy vs gold).

Evaluation prompts are never trained on: the alignment prompts are the shipped training compositions minus every
composition that occurs in the evaluation sets (``heldin_eval.txt``: training compositions; ``heldout_compositions
.txt``: relations the base model never saw).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
ORACLE_TERM = "oracle"


# Per objective, the demo's tuned values of the fields left at None (assets/shapes/README.md, "Demo"): full DRaFT
# trains on the η = 0 sampler that is evaluated, 16 samples per step, each with a graph through the 10-step chain;
# GRPO samples groups of 8 with noise on the three high-noise steps only (MixGRPO-style window), so every training
# image ends the way the evaluation sampler ends it. An objective not listed gets GENERIC_RECIPE.
OBJECTIVE_RECIPES: dict[str, dict[str, Any]] = {
    "draft": {"objective_params": {"k": 0}, "eta": 0.0, "prompts_per_step": 4, "images_per_prompt": 4},
    "grpo": {"eta": 1.0, "sde_window": [0, 3]},
}
GENERIC_RECIPE: dict[str, Any] = {"objective_params": {}, "prompts_per_step": 8, "images_per_prompt": 8,
                                  "sde_window": None}


@dataclass
class DemoConfig:
    """Everything ``visalign demo`` can change; defaults finish in under 10 minutes on 2 CPU cores.

    Fields left at None take the objective's recipe (``OBJECTIVE_RECIPES``, else ``GENERIC_RECIPE``; η falls back to
    1 for objectives that train on log-probs and 0 for the others) when the config is built.
    """

    base_model: str = field(default="assets/shapes/t2i", metadata={"help": "Base pipeline folder to align."})
    prompts_dir: str = field(default="assets/shapes/prompts", metadata={"help": "Folder of the shipped prompt sets."})
    # Why the tuned proxy: the render-trained one ranks the base model's own samples worse (count 87 % vs 97 % on
    # held-back samples), and GRPO only needs the ranking inside each group (assets/shapes/README.md, Proxies).
    reward: str = field(default="shapes-clip-tuned-contrast", metadata={
        "help": "Scorer id of the training reward: shapes-clip-tuned-contrast (the CLIP proxy tuned on the base "
                "model's samples, as a zero-shot classifier), shapes-clip-contrast (the render-trained one), "
                "shapes-clip (its cosine), shapes-vlm, shapes-oracle or any registered id."})
    # Why a colour term: every reward here pays for fewer extra objects with hues that drift and darken, and the
    # oracle only notices a hue once it crosses to another palette colour (assets/shapes/README.md, Demo, point 20).
    extra_rewards: list[str] = field(default_factory=lambda: ["shapes-colour:1"], metadata={
        "help": "More reward terms beside --reward, each ID or ID:WEIGHT (weight 1 by default), summed with it, "
                "e.g. shapes-colour:1 (continuous colour fidelity to the named palette colours)."})
    objective: str = field(default="grpo", metadata={
        "help": "Objective id of the visalign train loop (grpo: group policy gradient; draft: reward backprop "
                "through the whole chain; raft, ...)."})
    objective_params: dict[str, Any] | None = field(default=None, metadata={
        "help": "Objective hyper-parameters; null = the objective's demo recipe."})
    iterations: int = field(default=80, metadata={"help": "Rollout → score → update iterations."})
    prompts_per_step: int | None = field(default=None, metadata={
        "help": "Distinct prompts per iteration; null = the objective's recipe (draft 4, others 8)."})
    images_per_prompt: int | None = field(default=None, metadata={
        "help": "Group size G per prompt; null = the objective's recipe (draft 4, others 8)."})
    steps: int = field(default=10, metadata={"help": "DDIM steps of training rollouts."})
    train_steps_per_update: int | None = field(default=None, metadata={
        "help": "Random denoising steps trained per update; null = all trained steps."})
    # Why only the first steps: the count of objects is decided there, and the late low-noise steps' log-prob
    # gradients are pure noise that dominates the sum (step 8 of 10 had a 30x larger gradient norm than steps 0-2
    # on the shapes base; assets/shapes/README.md, Demo).
    train_fraction: float | None = field(default=0.3, metadata={
        "help": "Train only the first ⌊f·steps⌋ (high-noise) steps; null = every stochastic step."})
    eta: float | None = field(default=None, metadata={
        "help": "DDIM η of the training rollouts (> 0 for policy gradients, 0 for reward backprop; the evaluation "
                "uses 0); null = the objective's recipe."})
    sde_window: list[int] | None = field(default=None, metadata={
        "help": "[start, stop) of the training steps sampled with η; the rest use η = 0 like the evaluation "
                "sampler. null = the objective's recipe (grpo: 0 3; others: η on every step)."})
    guidance: float = field(default=4.0, metadata={"help": "Classifier-free guidance scale."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the LoRA weights."})
    # Why a polish stage: the count the policy gradient gains comes with hues that drift on the deterministic
    # sampler, and no guard inside GRPO kept the one without freezing the other (assets/shapes/README.md, Demo,
    # points 20-22). Reward backprop of the same reward through the last steps of the η = 0 chain re-renders the
    # colours where they are drawn, after the early steps have settled what is drawn.
    polish_iterations: int = field(default=40, metadata={
        "help": "Iterations of the polish stage after alignment: DRaFT-K (4 prompts x 4 samples, η = 0) continuing "
                "the aligned LoRA; 0 = no polish stage."})
    polish_rewards: list[str] | None = field(default=None, metadata={
        "help": "Reward terms (ID or ID:WEIGHT) the polish stage backpropagates; null = the differentiable terms of "
                "the alignment's own reward (by default the CLIP proxy and shapes-colour)."})
    polish_k: int = field(default=2, metadata={"help": "Polish stage: last denoising steps the gradient flows "
                                                      "through (DRaFT-K's K)."})
    polish_lr: float = field(default=1e-3, metadata={"help": "Polish stage: AdamW learning rate."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (0 = full fine-tune)."})
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={
        "help": "UNet layer names that get LoRA adapters (e.g. attn2.to_k attn2.to_v: cross-attention only)."})
    # Why singles and counts: the base model's designed error (one object too many, on 40 % of its training images)
    # lives in every kind, but relations also carry an order coin flip no reward fine-tuning of minutes fixes, which
    # hides a count gain in whole-prompt accuracy (assets/shapes/README.md, Demo).
    align_kinds: list[str] = field(default_factory=lambda: ["single", "count"], metadata={
        "help": "Prompt kinds aligned on."})
    eval_kinds: list[str] = field(default_factory=lambda: ["single", "count"], metadata={
        "help": "Prompt kinds of the held-in evaluation set (the held-out compositions, all relations, are "
                "reported beside it)."})
    eval_heldin: int = field(default=96, metadata={
        "help": "Held-in evaluation prompts (the first N of heldin_eval of the eval kinds; it has 88 single and "
                "count prompts)."})
    eval_heldout: int = field(default=48, metadata={"help": "Held-out prompts (first N of heldout_compositions)."})
    eval_steps: int = field(default=20, metadata={"help": "DDIM steps of the η = 0 evaluation samples."})
    # Why several: with one sample per prompt, a before/after gain on 88 prompts moves by about ±6 points with which
    # prompts happen to flip; four samples per prompt halve that.
    eval_images_per_prompt: int = field(default=4, metadata={
        "help": "Evaluation samples per prompt (fixed seeds; the report shows the first)."})
    grid_prompts: int = field(default=16, metadata={"help": "Prompts per set shown before/after in the report."})
    seed: int = field(default=0, metadata={"help": "Seed of the alignment run (prompts, noise)."})
    train_overrides: list[str] = field(default_factory=list, metadata={
        "help": "section.key=value overrides of the alignment's training config, applied last, e.g. "
                "optim.betas=[0.98,0.999] (keys as in `visalign train --help-config`)."})
    eval_seed: int = field(default=1234, metadata={"help": "Seed of the evaluation noise (same before and after)."})
    output_dir: str = field(default="runs/demo", metadata={"help": "Run folder; report.html is written here."})

    def __post_init__(self) -> None:
        self._fill_recipe()
        if self.steps < 2:
            raise ValueError(f"steps ({self.steps}) must be >= 2: the last DDIM step is deterministic, never trained.")
        if self.train_fraction is not None and int(self.train_fraction * self.steps) < 1:
            raise ValueError(f"train_fraction {self.train_fraction} of {self.steps} steps trains none; raise it to "
                             f">= {1 / self.steps:.3g} or use more steps.")
        if self.eta < 0 or (self.eta == 0 and _needs_log_probs(self.objective)):
            raise ValueError(f"eta ({self.eta}) must be > 0 for {self.objective!r}: a deterministic rollout has no "
                             "log-probs to train on (reward backprop objectives such as draft take eta 0).")
        if self.polish_iterations < 0 or self.polish_k < 1 or self.polish_lr <= 0:
            raise ValueError(f"polish_iterations ({self.polish_iterations}) must be >= 0 (0 = off), polish_k "
                             f"({self.polish_k}) >= 1 and polish_lr ({self.polish_lr}) > 0.")
        if self.polish_iterations:
            self.polish_terms()  # refuses a polish stage with nothing to backpropagate before any model loads
        if self.iterations < 1 or self.eval_heldin < 0 or self.eval_heldout < 0 or self.eval_images_per_prompt < 1:
            raise ValueError("iterations and eval_images_per_prompt must be >= 1 and eval_heldin / eval_heldout "
                             ">= 0.")
        if self.eval_heldin + self.eval_heldout == 0:
            raise ValueError("The demo needs evaluation prompts: set eval_heldin or eval_heldout above 0.")
        self.reward_terms()  # refuses a malformed entry now, not after the base evaluation
        for name in ("align_kinds", "eval_kinds"):
            kinds = getattr(self, name)
            if not kinds or set(kinds) - {"single", "count", "relation"}:
                raise ValueError(f"{name} {kinds} must be a non-empty subset of single, count, relation.")

    def reward_terms(self) -> list[dict[str, Any]]:
        """The training reward as train-config ``reward.terms``: ``reward`` (weight 1), then ``extra_rewards``."""
        terms: list[dict[str, Any]] = [{"scorer": self.reward, "weight": 1.0}]
        for entry in self.extra_rewards:
            scorer, value = parse_extra_reward(entry)
            if not scorer or scorer in (self.reward, ORACLE_TERM):
                raise ValueError(f"extra reward {entry!r} must name a scorer other than the main reward "
                                 f"{self.reward!r} (and not {ORACLE_TERM!r}).")
            terms.append({"scorer": scorer, "weight": value})
        return terms

    def polish_terms(self) -> list[tuple[str, float]]:
        """(scorer id, weight) of the polish stage's reward: ``polish_rewards``, else the differentiable terms of
        the alignment's reward (a pixel-graded oracle has no gradient to follow)."""
        if self.polish_rewards is not None:
            terms = [parse_extra_reward(entry) for entry in self.polish_rewards]
        else:
            terms = differentiable_terms([(t["scorer"], t["weight"]) for t in self.reward_terms()])
        if not terms:
            raise ValueError("The polish stage has no differentiable reward term to backpropagate (the alignment's "
                             f"terms: {[t['scorer'] for t in self.reward_terms()]}); pass --polish-reward ID "
                             "(e.g. shapes-colour) or --polish-iterations 0.")
        return terms

    def _fill_recipe(self) -> None:
        """Replace the None fields by the objective's recipe (see ``OBJECTIVE_RECIPES``)."""
        recipe = {**GENERIC_RECIPE, **OBJECTIVE_RECIPES.get(self.objective, {})}
        recipe.setdefault("eta", 1.0 if _needs_log_probs(self.objective) else 0.0)
        for key, value in recipe.items():
            if getattr(self, key) is None:
                setattr(self, key, copy.deepcopy(value))


def differentiable_terms(terms: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The (scorer id, weight) terms a reward-backprop stage can follow: weighted and differentiable (a pixel-graded
    oracle has no gradient)."""
    from visalign.scorers import scorer_card

    return [(scorer, weight) for scorer, weight in terms if weight and scorer_card(scorer).differentiable]


def parse_extra_reward(entry: str) -> tuple[str, float]:
    """``"ID"`` or ``"ID:WEIGHT"`` → (scorer id, weight; 1 when left out)."""
    scorer, _, weight = entry.partition(":")
    try:
        return scorer, float(weight) if weight else 1.0
    except ValueError:
        raise ValueError(f"extra reward {entry!r}: the weight after ':' must be a number, e.g. "
                         "shapes-colour:0.5.") from None


def _needs_log_probs(objective: str) -> bool:
    from visalign.objectives.base import OBJECTIVES

    return "log_probs" in OBJECTIVES.get(objective).needs


def resolve_asset(path: str | Path) -> Path:
    """A shipped asset path: absolute as is, else the working directory's, else the repository's, else the installed
    package's (a non-editable install ships ``assets/`` as ``visalign/assets``)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    if not (REPO_ROOT / p).exists() and (PACKAGE_ROOT / p).exists():
        return PACKAGE_ROOT / p
    return REPO_ROOT / p


@dataclass
class DemoPrompts:
    align: list[str]
    eval_sets: dict[str, list[str]]


def demo_prompts(config: DemoConfig) -> DemoPrompts:
    """Alignment prompts (training compositions of ``align_kinds``) disjoint from the evaluation compositions."""
    from visalign.shapes.evaluate import EVAL_SET_FILES
    from visalign.shapes.grammar import parse_prompt
    from visalign.shapes.prompt_sets import read_prompt_set

    folder = resolve_asset(config.prompts_dir)
    sizes = {"heldin": config.eval_heldin, "heldout": config.eval_heldout}
    kinds = {"heldin": set(config.eval_kinds), "heldout": {"relation"}}
    eval_sets = {}
    for name, file in EVAL_SET_FILES.items():
        chosen = [p for p in read_prompt_set(folder / file) if parse_prompt(p).kind in kinds[name]]
        eval_sets[name] = chosen[: sizes[name]]
    eval_sets = {k: v for k, v in eval_sets.items() if v}
    evaluated = {parse_prompt(p) for prompts in eval_sets.values() for p in prompts}
    align = [p for p in read_prompt_set(folder / "train.txt")
             if parse_prompt(p).kind in config.align_kinds and parse_prompt(p) not in evaluated]
    if len(align) < config.prompts_per_step:
        raise ValueError(f"Only {len(align)} alignment prompts of kinds {config.align_kinds} remain after removing "
                         "the evaluation compositions; lower prompts_per_step or add kinds.")
    return DemoPrompts(align, eval_sets)


def polish_config(config: DemoConfig, terms: list[tuple[str, float]] | None = None) -> DemoConfig:
    """The polish stage as a demo config of its own: DRaFT-K on ``terms`` (default :meth:`DemoConfig.polish_terms`),
    η = 0, 4 × 4 samples (DRaFT's demo recipe), the alignment's training overrides left out."""
    (reward, first), *extra = terms if terms is not None else config.polish_terms()
    # The main reward's weight is 1, so the others keep their ratio to it (Adam's step does not see a common scale).
    return replace(
        config, objective="draft", objective_params={"backprop": "last-k", "k": config.polish_k},
        iterations=config.polish_iterations, lr=config.polish_lr, reward=reward,
        extra_rewards=[f"{scorer}:{weight / first}" for scorer, weight in extra], eta=None, sde_window=None,
        prompts_per_step=None, images_per_prompt=None, train_steps_per_update=None, train_overrides=[],
        polish_iterations=0)


def train_config(config: DemoConfig, align_file: Path, run_dir: Path, stage: str = "train",
                 init_lora: Path | None = None) -> Any:
    """The :class:`~visalign.train.config.TrainConfig` of one training stage (no Trainer-side evaluation).

    Args:
        stage: sub-folder of ``run_dir`` the stage writes (metrics, checkpoints, ``final/``).
        init_lora: a LoRA folder the stage continues (the polish stage starts from the alignment's ``final/``).
    """
    from visalign.config import apply_overrides, from_dict
    from visalign.train.config import TrainConfig

    terms: list[Any] = config.reward_terms()
    if "shapes-oracle" not in {t["scorer"] for t in terms}:
        # Weight 0: logged on every training batch (the gold curve), never part of the advantage.
        terms.append({"scorer": "shapes-oracle", "weight": 0.0, "name": ORACLE_TERM})
    data = {
        "model": {"model": str(resolve_asset(config.base_model)), "lora_rank": config.lora_rank,
                  "lora_alpha": float(max(config.lora_rank, 1)),
                  "lora_targets": list(config.lora_targets),
                  "init_lora": None if init_lora is None else str(init_lora)},
        "sample": {"prompts": str(align_file), "prompts_per_step": config.prompts_per_step,
                   "images_per_prompt": config.images_per_prompt, "steps": config.steps, "guidance": config.guidance,
                   "eta": config.eta, "train_steps_per_update": config.train_steps_per_update,
                   "sde_window": config.sde_window,
                   # The last DDIM step lands on alpha = 1 (set_alpha_to_one): its std is 0 and its log-prob NaN,
                   # which turns the LoRA weights NaN after one update; train on the stochastic steps only.
                   "train_fraction": config.train_fraction or (config.steps - 1) / config.steps},
        "reward": {"terms": terms},
        "objective": {"name": config.objective, "params": dict(config.objective_params)},
        "optim": {"lr": config.lr},
        "run": {"output_dir": str(run_dir / stage), "iterations": config.iterations, "seed": config.seed,
                "checkpoint_every": config.iterations, "keep_last": 1, "tensorboard": False},
    }
    return from_dict(TrainConfig, apply_overrides(data, list(config.train_overrides)))


@dataclass
class Evaluation:
    """Paired evaluation samples of one model state.

    Attributes:
        media: set name → float32 ``[N·k, 3, H, W]`` in [0, 1]: k = ``images_per_prompt`` samples per prompt,
            prompt-major (sample j of prompt i at ``i·k + j``), fixed seeds.
        oracle: set name → :func:`visalign.shapes.evaluate.summarise` dict (``all``, ``reward``, ``attributes``, ...)
            over all N·k samples.
        correct: set name → bool ``[N·k]``, every attribute right.
        proxy: set name → mean proxy reward.
        images_per_prompt: k.
    """

    media: dict[str, Any]  # torch.Tensor; imported lazily so `visalign --help` stays light
    oracle: dict[str, dict[str, Any]]
    correct: dict[str, Any]  # numpy bool arrays
    proxy: dict[str, float]
    images_per_prompt: int = 1

    def first(self, name: str, i: int) -> tuple[Any, bool]:
        """The first sample of prompt ``i`` of set ``name`` and whether the oracle passes it."""
        j = i * self.images_per_prompt
        return self.media[name][j], bool(self.correct[name][j])


def evaluate(adapter: Any, prompts: DemoPrompts, proxy: Any, config: DemoConfig, batch_size: int = 48) -> Evaluation:
    """Sample every evaluation prompt once (η = 0, fixed seeds) and grade with the oracle and the proxy."""
    import torch

    from visalign.scorers import ScoreBatch
    from visalign.shapes.evaluate import summarise
    from visalign.shapes.oracle import grade

    k = config.eval_images_per_prompt
    out = Evaluation({}, {}, {}, {}, images_per_prompt=k)
    per_call = max(1, batch_size // k)
    for name, set_prompts in prompts.eval_sets.items():
        chunks, repeated = [], []
        for start in range(0, len(set_prompts), per_call):
            chunk = set_prompts[start:start + per_call]
            # Seeds depend on the prompt's position only, so before and after pair sample by sample.
            rollout = adapter.rollout(chunk, images_per_prompt=k, steps=config.eval_steps, guidance=config.guidance,
                                      eta=0.0, seed=config.eval_seed + start * k)
            chunks.append(rollout.media.detach().float().cpu().clamp(0, 1))
            repeated += list(rollout.prompts)
        media = torch.cat(chunks)
        out.media[name] = media
        out.oracle[name] = summarise(media.numpy(), repeated)
        out.correct[name] = grade(media.numpy(), repeated).all
        out.proxy[name] = float(proxy(ScoreBatch(prompts=repeated, media=media)).reward.mean())
    return out


@dataclass
class DemoResult:
    config: dict[str, Any]
    before: Evaluation
    after: Evaluation
    prompts: DemoPrompts
    train_summary: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: dict[str, float]
    lora_dir: Path  # the final LoRA (stock diffusers load_lora_weights folder)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers: per set, oracle and proxy before/after and their gains."""
        sets = {}
        for name in self.prompts.eval_sets:
            b, a = self.before.oracle[name], self.after.oracle[name]
            sets[name] = {"n": b["n"], "prompts": len(self.prompts.eval_sets[name]),
                          "oracle_all": [b["all"], a["all"]], "oracle_reward": [b["reward"], a["reward"]],
                          "attributes": {k: [b["attributes"].get(k), a["attributes"].get(k)] for k in b["attributes"]},
                          "proxy": [self.before.proxy[name], self.after.proxy[name]],
                          "oracle_all_gain": a["all"] - b["all"],
                          "proxy_gain": self.after.proxy[name] - self.before.proxy[name]}
        return {"config": self.config, "sets": sets, "seconds": self.seconds, "lora_dir": str(self.lora_dir),
                "train_reward_first": self.train_summary.get("train_reward_first"),
                "train_reward_last": self.train_summary.get("train_reward_last")}


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run every stage and write ``report.html`` into ``config.output_dir``; returns the numbers."""
    from visalign.shapes.demo_report import write_report
    from visalign.train.logging import read_metrics
    from visalign.train.loop import Trainer

    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    base = resolve_asset(config.base_model)
    if not (base / "model_index.json").is_file():
        raise FileNotFoundError(f"No base pipeline at {base}: build it with 'visalign shapes build' or pass "
                                "--base-model FOLDER (a diffusers StableDiffusionPipeline folder).")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    prompts = demo_prompts(config)
    align_file = run_dir / "align_prompts.txt"
    align_file.write_text("\n".join(prompts.align) + "\n", encoding="utf-8")
    (run_dir / "eval_prompts.json").write_text(json.dumps(prompts.eval_sets, indent=1), encoding="utf-8")
    log(f"[1/5] loading {base} with a rank-{config.lora_rank} LoRA; reward {config.reward!r}, objective "
        f"{config.objective!r}; {len(prompts.align)} alignment prompts, evaluation on "
        + ", ".join(f"{len(v)} {k}" for k, v in prompts.eval_sets.items()))
    trainer = Trainer(train_config(config, align_file, run_dir))
    # The training reward's own instance (its weights load once); terms are keyed by scorer id, which for a card
    # file (visalign rm train's card.yaml) is the id inside it.
    from visalign.scorers import scorer_card

    scorers = trainer.reward.scorers
    proxy = scorers[config.reward] if config.reward in scorers else scorers[scorer_card(config.reward).id]
    seconds["load"] = time.perf_counter() - clock

    log("[2/5] evaluating the base model (oracle + proxy, fixed seeds)")
    clock = time.perf_counter()
    before = evaluate(trainer.adapter, prompts, proxy, config)
    seconds["eval_before"] = time.perf_counter() - clock
    log("      " + _line(before))

    log(f"[3/5] aligning: {config.iterations} iterations of {config.prompts_per_step} prompts x "
        f"{config.images_per_prompt} samples")
    clock = time.perf_counter()
    train_summary = trainer.run(resume=False)
    seconds["align"] = time.perf_counter() - clock
    history = read_metrics(run_dir / "train")
    final = run_dir / "train" / "final"
    polish_terms = config.polish_terms() if config.polish_iterations else []
    if polish_terms:
        polish = polish_config(config, polish_terms)
        log(f"      polish: {polish.iterations} iterations of DRaFT-K (K = {config.polish_k}, η = 0) on "
            + " + ".join(f"{w:g}·{name}" for name, w in polish_terms) + ", continuing the aligned LoRA")
        clock = time.perf_counter()
        trainer = Trainer(train_config(polish, align_file, run_dir, stage="polish", init_lora=final))
        trainer.run(resume=False)
        seconds["polish"] = time.perf_counter() - clock
        # One step axis for the report: the polish rows follow the alignment's, tagged with their stage.
        history += [{**row, "step": row["step"] + config.iterations, "stage": "polish"}
                    for row in read_metrics(run_dir / "polish")]
        final = run_dir / "polish" / "final"

    log("[4/5] evaluating the aligned model (same prompts and seeds)")
    clock = time.perf_counter()
    after = evaluate(trainer.adapter, prompts, proxy, config)
    seconds["eval_after"] = time.perf_counter() - clock
    log("      " + _line(after))

    recorded = {**asdict(config), "polish_terms": polish_terms}
    result = DemoResult(recorded, before, after, prompts, train_summary, history, seconds, final)
    log("[5/5] writing the report")
    report = write_report(run_dir, result)
    (run_dir / "summary.json").write_text(json.dumps(result.summary(), indent=1), encoding="utf-8")
    log(f"      {report}")
    return result


def _line(evaluation: Evaluation) -> str:
    return "; ".join(f"{name}: oracle all {o['all']:.3f}, reward {o['reward']:.3f}, proxy {evaluation.proxy[name]:.3f}"
                     for name, o in evaluation.oracle.items())
