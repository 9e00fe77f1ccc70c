"""Few-step students (``visalign distill``, ``rg-lcm``, ``r0``; docs/methods.md#distillation) on the tiny bright SD:
the consistency loss vanishes where the student is its own target, the reward term raises the student's reward,
resume is bit-exact, bad step counts and teacher families fail with clear errors, and the saved student folder is
sampled by stock diffusers in a clean interpreter that never imports visalign, to the student's own samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visalign.generators import LoraSpec, load_generator
from visalign.generators.consistency import make_student_schedule, student_sample, teacher_trajectory
from visalign.generators.rollout import per_sample_seeds
from visalign.objectives.base import UpdateContext, build_objective
from visalign.objectives.batches import TeacherBatch
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red cube", "two blue circles"]
RES = 8  # 4×4 latents: a brightness reward moves within a few updates (tests/objectives/conftest.py)


def distill_overrides(model: Path, prompts: Path, out: Path, objective: str, *, iterations: int,
                      params: dict | None = None, lora_rank: int = 4, checkpoint_every: int | None = None
                      ) -> list[str]:
    """A tiny distillation run: 2 prompts × 2 samples, a 4-point teacher grid, a 2-step student, brightness."""
    overrides = [f"model.model={model}", f"model.lora_rank={lora_rank}", f"model.lora_alpha={lora_rank}",
                 f"model.resolution={RES}", f"sample.prompts={prompts}", "sample.prompts_per_step=2",
                 "sample.images_per_prompt=2", "reward.terms=[brightness]", f"objective.name={objective}",
                 "distill.teacher_steps=4", "distill.student_steps=2", "distill.teacher_guidance=2.0",
                 "optim.lr=1e-2", f"run.output_dir={out}", f"run.iterations={iterations}",
                 f"run.checkpoint_every={checkpoint_every or iterations}", "run.keep_last=2",
                 "run.tensorboard=false", "run.progress=false"]
    overrides += [f"objective.params.{k}={v}" for k, v in (params or {}).items()]
    return overrides


def _batch(adapter, schedule, guidance: float, seed: int = 3) -> TeacherBatch:
    prompts = [p for p in PROMPTS for _ in range(2)]
    condition = adapter.encode_condition(prompts, [""] * len(prompts), max(guidance, 1.0), height=RES, width=RES)
    trajectory = teacher_trajectory(adapter, schedule, condition, guidance, seeds=per_sample_seeds(seed, 4),
                                    height=RES, width=RES)
    return TeacherBatch(prompts=prompts, condition=condition, trajectory=trajectory, schedule=schedule,
                        size=(RES, RES))


def test_consistency_loss_vanishes_where_the_student_is_its_target(bright_sd_path):
    """Student = teacher (a fresh LoRA), no CFG, the last grid point: the target is the teacher's DDIM step onto
    ᾱ = 1, i.e. its own x̂0, which is what f_θ returns up to LCM's c_skip ≈ 1e-6, so the loss is ~0; moving the
    student's weights (or training earlier grid points, which the ODE does not map to themselves) makes it > 0."""
    adapter = load_generator(str(bright_sd_path))
    adapter.add_lora(LoraSpec(rank=4, alpha=4.0))
    schedule = make_student_schedule(adapter, 2, 4)
    batch = _batch(adapter, schedule, guidance=1.0)
    objective = build_objective("rg-lcm")
    ctx = UpdateContext(adapter, [], lambda: 0.0, torch.Generator().manual_seed(0))
    chunk = list(range(len(batch)))
    last = torch.full((len(batch),), schedule.grid.numel() - 1)
    distance, _ = objective.consistency_loss(batch, ctx, chunk, last)
    assert float(distance.detach().max()) < 1e-8
    first = torch.zeros(len(batch), dtype=torch.long)
    assert float(objective.consistency_loss(batch, ctx, chunk, first)[0].detach().min()) > 1e-5
    with torch.no_grad():
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    moved, _ = objective.consistency_loss(batch, ctx, chunk, last)
    assert float(moved.detach().min()) > 1e-4


def _student_brightness(trainer: Trainer) -> float:
    sample = trainer.source.eval_sampler()
    with torch.no_grad():
        return float(sample(PROMPTS * 4, 777).mean())


@pytest.mark.parametrize(("objective", "params"), [
    ("r0", {"weight_reg": 0.0, "distribution_reg": 0.0, "checkpoint_steps": False}),
    ("rg-lcm", {}),
])
def test_reward_term_raises_the_students_reward(bright_sd_path, prompt_file, tmp_path, objective, params):
    """Six seeded updates with the reward term raise the brightness of the student's fixed-seed 2-step samples over
    the start, and over the same run with reward_scale 0."""
    results = {}
    for scale in (0.0, 5.0):
        config = load_train_config(None, distill_overrides(
            bright_sd_path, prompt_file, tmp_path / f"{objective}-{scale}", objective, iterations=6, lora_rank=0,
            params={**params, "reward_scale": scale}))
        config.optim.lr = 1e-3
        trainer = Trainer(config)
        before = _student_brightness(trainer)
        trainer.run(resume=False)
        results[scale] = (before, _student_brightness(trainer))
    (before, plain), (_, rewarded) = results[0.0], results[5.0]
    assert rewarded > before + 0.01
    assert rewarded > plain + 0.01


@pytest.mark.parametrize(("objective", "params", "lora_rank"), [
    ("rg-lcm", {"target_decay": 0.5, "points_per_sample": 2}, 4),  # the EMA target travels in checkpoints
    ("r0", {"checkpoint_steps": False}, 0),  # a full fine-tune: the frozen teacher copy travels in checkpoints
])
def test_resume_is_bit_exact(bright_sd_path, prompt_file, tmp_path, objective, params, lora_rank):
    """4 iterations in one go equal 2 iterations, a checkpoint, and a resumed run to 4, bit for bit."""
    def run(out: Path, iterations: int) -> None:
        config = load_train_config(None, distill_overrides(bright_sd_path, prompt_file, out, objective,
                                                           iterations=iterations, params=params,
                                                           lora_rank=lora_rank, checkpoint_every=2))
        Trainer(config).run(resume=True)

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4)
    name = "pytorch_lora_weights.safetensors" if lora_rank else "unet/diffusion_pytorch_model.safetensors"
    straight, resumed = (load_file(str(tmp_path / r / "final" / name)) for r in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "lr" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize(("override", "message"), [
    ("distill.student_steps=0", "distill.student_steps is 0"),
    ("distill.student_steps=5", "distill.student_steps is 5"),  # more than the 4-point grid holds
    ("objective.name=grpo", "visalign distill trains a few-step student"),
])
def test_bad_step_counts_and_objectives_are_refused(bright_sd_path, prompt_file, tmp_path, override, message):
    args = [sys.executable, "-m", "visalign", "distill", "--no-resume",
            str(REPO / "pipelines" / "tiny-sd-distill-r0.yaml"), "eval.prompts=null",
            *distill_overrides(bright_sd_path, prompt_file, tmp_path / "run", "r0", iterations=1), override]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 2
    assert message in done.stderr


def test_schedule_refuses_what_the_lcm_scheduler_cannot_do(bright_sd_path):
    adapter = load_generator(str(bright_sd_path))
    with pytest.raises(ValueError, match="distill.teacher_steps is 2000"):
        make_student_schedule(adapter, 2, 2000)
    with pytest.raises(ValueError, match="distill.student_steps is 8"):
        make_student_schedule(adapter, 8, 4)
    schedule = make_student_schedule(adapter, 2, 4)
    assert schedule.timesteps.tolist() == [999, 499] and schedule.grid.tolist() == [999, 749, 499, 249]


def test_a_teacher_the_student_cannot_host_is_refused(tmp_path, prompt_file):
    """A video UNet (AnimateDiff) has no LCM student: the Trainer stops at attach, naming the families that can."""
    from tests.generators.conftest import build_animatediff

    folder = build_animatediff(tmp_path / "animatediff")
    config = load_train_config(None, distill_overrides(folder, prompt_file, tmp_path / "run", "r0", iterations=1))
    with pytest.raises(ValueError, match=r"cannot host a few-step student.*stable-diffusion"):
        Trainer(config)


STOCK_SCRIPT = """
import sys, torch
from diffusers import DiffusionPipeline
folder, out, steps, guidance = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
pipe = DiffusionPipeline.from_pretrained(folder)
prompts = {prompts!r}
gens = [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, height={res}, width={res},
              output_type="pt").images
assert not any(m == "visalign" or m.startswith("visalign.") for m in sys.modules), "visalign was imported"
torch.save({{"images": images, "scheduler": type(pipe.scheduler).__name__,
             "timesteps": pipe.scheduler.timesteps.tolist()}}, out)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_stock_diffusers_samples_the_saved_student(bright_sd_path, prompt_file, tmp_path, lora_rank):
    """``visalign distill`` writes student/; a clean interpreter (``python -I``, visalign never imported) loads it
    with ``DiffusionPipeline.from_pretrained`` and samples the student's 2 steps to the student's own samples."""
    out = tmp_path / "run"
    recipe = REPO / "pipelines" / "tiny-sd-distill-rg-lcm.yaml"
    cli = [sys.executable, "-m", "visalign", "distill", str(recipe), "eval.prompts=null",
           *distill_overrides(bright_sd_path, prompt_file, out, "rg-lcm", iterations=2, lora_rank=lora_rank)]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    folder = out / "student"
    card = json.loads((folder / "student.json").read_text())
    assert card["num_inference_steps"] == 2 and card["scheduler"] == "LCMScheduler"

    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT.format(prompts=PROMPTS, res=RES))
    stock_out = tmp_path / "stock.pt"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([sys.executable, "-I", str(script), str(folder), str(stock_out), "2", "1.0"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**clean,
                                                                                          "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    stock = torch.load(stock_out)
    assert stock["scheduler"] == "LCMScheduler" and stock["timesteps"] == [999, 499]

    # The student as visalign trains and evaluates it: the run's final weights on the teacher, the LCM sampler.
    adapter = load_generator(str(folder if lora_rank == 0 else bright_sd_path))
    if lora_rank:
        adapter.load(out / "final")
    schedule = make_student_schedule(adapter, 2, 4)
    condition = adapter.encode_condition(PROMPTS, ["", ""], 1.0, height=RES, width=RES)
    latents = student_sample(adapter, schedule, condition, seeds=[100, 101], height=RES, width=RES)
    ours = adapter.decode(latents)
    torch.testing.assert_close(stock["images"].float(), ours, atol=1e-4, rtol=0)
    # A trained student differs from the teacher sampled the same way.
    teacher = load_generator(str(bright_sd_path))
    base = teacher.decode(student_sample(teacher, make_student_schedule(teacher, 2, 4), condition, seeds=[100, 101],
                                         height=RES, width=RES))
    assert (base - ours).abs().max() > 1e-3


def test_a_non_differentiable_reward_is_refused_before_the_model_loads(bright_sd_path, prompt_file, tmp_path):
    """The reward term backpropagates: a weighted non-differentiable scorer (JPEG size, like the shapes oracle) is
    refused, naming the term and where differentiable scorers are listed; at weight 0 it is a monitor and allowed."""
    base = distill_overrides(bright_sd_path, prompt_file, tmp_path / "run", "r0", iterations=1)
    config = load_train_config(None, [*base, "reward.terms=[brightness, jpeg-compressibility]"])
    with pytest.raises(ValueError, match=r"jpeg-compressibility.*differentiable scorers"):
        Trainer(config)
    monitor = load_train_config(None, [*base, "reward.terms=[brightness, {scorer: jpeg-compressibility, weight: 0}]"])
    Trainer(monitor)
