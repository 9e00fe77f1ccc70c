"""The generator contract, once, for every registered family (docs/architecture.md#generators).

Each family in ``visalign.generators.GENERATORS`` must (1) replay its own stochastic steps with importance ratio 1,
(2) at η = 0 produce what the stock diffusers pipeline produces for the same seeds, and (3) train a LoRA that stock
diffusers loads with ``load_lora_weights`` and samples identically (or refuse LoRA with an error naming the fix, where
diffusers itself cannot load one). Family-specific behaviour (SDXL's added conditioning, CogVideoX's terminal step,
SDE windows...) stays in the per-family modules.

A family registered without a :data:`CASES` row fails :func:`test_every_registered_family_has_a_contract_case`, so a
new adapter cannot skip the contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.generators import conftest as unet_fixtures
from tests.generators import flow_fixtures
from visalign.generators import LoraSpec, list_generators, load_generator

PROMPTS = ["a red cube", "two blue circles"]
SEQ_LEN = 16  # T5 / CogVideoX text tokens; the stock call gets the same value
flow_dir = flow_fixtures.flow_dir  # the session fixture, shared with the flow test modules


@dataclass(frozen=True)
class Case:
    """How to build one family's tiny pipeline and call it.

    Attributes:
        build: ``(unet_dir, flow_dir) → folder`` of a saved tiny pipeline.
        size: extra kwargs for both the adapter's rollout and the stock call (height/width/num_frames).
        stock: extra kwargs for the stock call only (``max_sequence_length`` for T5-conditioned families).
        lora: False where stock diffusers cannot load a LoRA into this family's denoiser.
    """

    build: Callable[[Path, Path], Path]
    size: dict = field(default_factory=dict)
    stock: dict = field(default_factory=dict)
    lora: bool = True


T5 = {"max_sequence_length": SEQ_LEN}
CASES: dict[str, Case] = {
    "StableDiffusionPipeline": Case(lambda u, f: unet_fixtures.build_sd(u / "sd")),
    "StableDiffusionXLPipeline": Case(lambda u, f: unet_fixtures.build_sdxl(u / "sdxl")),
    "AnimateDiffPipeline": Case(lambda u, f: unet_fixtures.build_animatediff(u / "animatediff"), {"num_frames": 3}),
    # diffusers 0.42's UNet3DConditionModel is no PeftAdapterMixin: the stock pipeline cannot load any LoRA.
    "TextToVideoSDPipeline": Case(lambda u, f: unet_fixtures.build_text_to_video(u / "t2v"), {"num_frames": 3},
                                  lora=False),
    "StableDiffusion3Pipeline": Case(lambda u, f: flow_fixtures.build_sd3(f), {"height": 16, "width": 16}, T5),
    "FluxPipeline": Case(lambda u, f: flow_fixtures.build_flux(f), {"height": 16, "width": 16}, T5),
    "WanPipeline": Case(lambda u, f: flow_fixtures.build_wan(f), {"height": 16, "width": 16, "num_frames": 5}, T5),
    "LTXPipeline": Case(lambda u, f: flow_fixtures.build_ltx(f), {"height": 32, "width": 32, "num_frames": 9}, T5),
    "CogVideoXPipeline": Case(lambda u, f: flow_fixtures.build_cogvideox(f),
                              {"height": 16, "width": 16, "num_frames": 9}, T5),
}


def test_every_registered_family_has_a_contract_case():
    assert sorted(CASES) == list_generators()


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, unet_dir, flow_dir) -> tuple[str, Case, Path]:
    case = CASES[request.param]
    return request.param, case, case.build(unet_dir, flow_dir)


def _load(path: Path, lora: Path | None = None):
    gen = load_generator(path, lora=lora)
    if hasattr(gen, "max_sequence_length"):
        gen.max_sequence_length = SEQ_LEN
    return gen


@pytest.fixture(scope="module")
def stock(family):
    """The family's stock diffusers pipeline, loaded by ``DiffusionPipeline.from_pretrained`` (no visalign code)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(family[2])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_media(pipe, case: Case, seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
    """The stock call's output as float32 ``[B, 3, H, W]`` or ``[B, T, 3, H, W]`` in [0, 1], one generator per
    sample."""
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
               generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **case.size, **case.stock)
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images).float()


def test_on_policy_replay_has_ratio_one(family):
    name, case, path = family
    gen = _load(path)
    r = gen.rollout(PROMPTS, steps=3, guidance=4.0, eta=0.8, seed=3, **case.size)
    # Stochastic steps carry a density; a deterministic terminal step (CogVideoX's ᾱ = 1) carries NaN.
    steps = [i for i in range(r.num_steps) if torch.isfinite(r.log_probs[:, i]).all()]
    assert len(steps) >= 2, (name, r.log_probs)
    for reduction, stored in (("mean", r.log_probs), ("sum", r.log_probs_sum)):
        ratio = torch.exp(gen.step_log_prob(r, steps, reduction=reduction) - stored[:, steps])
        assert (ratio - 1).abs().max() < 1e-4, (name, reduction, ratio)
    # Scoring a different x_{t'} must change the density, or the ratio above would prove nothing.
    moved = r.select(range(len(r)))
    moved.latents = r.latents.clone()
    moved.latents[:, steps[0] + 1] += 0.5
    assert (gen.step_log_prob(moved, steps[:1]) - r.log_probs[:, steps[:1]]).abs().min() > 1e-3


def test_eta_zero_reproduces_the_stock_pipeline(family, stock):
    name, case, path = family
    ours = _load(path).rollout(PROMPTS, steps=3, guidance=5.0, eta=0.0, seed=8, **case.size)
    theirs = stock_media(stock, case, ours.seeds, steps=3, guidance=5.0)
    assert theirs.shape == ours.media.shape
    assert (ours.media - theirs).abs().max() < 1e-4, name
    assert torch.isnan(ours.log_probs).all()  # η = 0 has no density: NaN, never a made-up number


def test_lora_trains_and_round_trips_through_stock_diffusers(family, stock, tmp_path):
    name, case, path = family
    gen = _load(path)
    if not case.lora:
        assert not hasattr(stock.unet, "load_lora_adapter")
        with pytest.raises(NotImplementedError, match="train_full"):
            gen.add_lora(LoraSpec(rank=2, alpha=2.0))
        assert gen.lora is None and not gen.trainable_parameters()
        return
    params = gen.add_lora(LoraSpec(rank=2, alpha=4.0))
    trainable = {n for m in gen.modules().values() for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.Adam(params, lr=5e-2)  # Adam: a visible change whatever the gradient's scale
    r = gen.rollout(PROMPTS, steps=2, guidance=3.0, eta=0.8, seed=0, **case.size)
    steps = [i for i in range(r.num_steps) if torch.isfinite(r.log_probs[:, i]).all()]
    (-(torch.tensor([1.0, -1.0])[:, None] * gen.step_log_prob(r, steps)).mean()).backward()
    assert all(p.grad is not None for p in params)
    assert any(p.grad.abs().sum() > 0 for n, p in gen.denoiser.named_parameters() if "lora_B" in n)
    frozen = [p for m in gen.modules().values() for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    optimizer.step()

    ours = gen.rollout(PROMPTS, steps=2, guidance=3.0, eta=0.0, seed=6, **case.size).media
    out = gen.save(tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    base = stock_media(stock, case, [6, 7], steps=2, guidance=3.0)
    stock.load_lora_weights(str(out))
    try:
        with_lora = stock_media(stock, case, [6, 7], steps=2, guidance=3.0)
    finally:
        stock.unload_lora_weights()
    assert (with_lora - ours).abs().max() < 1e-4, name
    assert (base - ours).abs().max() > 1e-3  # the LoRA changed the sample, so the match above means something
    again = _load(path, lora=out).rollout(PROMPTS, steps=2, guidance=3.0, eta=0.0, seed=6, **case.size).media
    assert (again - ours).abs().max() < 1e-4
