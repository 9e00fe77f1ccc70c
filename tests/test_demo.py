"""``visalign demo``: prompt split, a shortened end-to-end run on the shipped assets, and the rendered report.

The end-to-end test runs the real stages (shipped base model, LoRA, the Trainer's GRPO loop, oracle and proxy
evaluation, report) with two iterations and a handful of prompts. The screenshot test renders report.html in
headless Chromium when it is installed (``apt-get install -y chromium``) and checks that the before/after images
were actually drawn, not just referenced.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from visalign.shapes.demo import DemoConfig, demo_prompts, resolve_asset
from visalign.shapes.grammar import parse_prompt

BASE = resolve_asset("assets/shapes/t2i")
PROXY = resolve_asset("assets/shapes/clip-tuned")
needs_assets = pytest.mark.skipif(
    not (BASE / "model_index.json").is_file() or not (PROXY / "config.json").is_file(),
    reason="assets/shapes/t2i or assets/shapes/clip-tuned is not built (visalign shapes build)")


def test_alignment_prompts_never_contain_an_evaluation_composition():
    kinds = {"align_kinds": ["count", "relation"], "eval_kinds": ["single", "count", "relation"]}
    config = DemoConfig(eval_heldin=48, eval_heldout=48, **kinds)
    prompts = demo_prompts(config)
    evaluated = {parse_prompt(p) for ps in prompts.eval_sets.values() for p in ps}
    aligned = {parse_prompt(p) for p in prompts.align}
    assert len(evaluated) > 60 and len(aligned) > 500
    assert not evaluated & aligned
    assert {s.kind for s in aligned} == {"count", "relation"}
    # Held-out compositions are never in the training file, so only held-in ones had to be removed.
    wider = demo_prompts(DemoConfig(eval_heldin=0, eval_heldout=48, **kinds))
    assert len(wider.align) > len(prompts.align)


def test_eval_kinds_pick_the_held_in_prompts_and_the_alignment_stays_disjoint():
    config = DemoConfig(align_kinds=["single", "count"], eval_kinds=["single", "count"], eval_heldin=96,
                        eval_heldout=8)
    prompts = demo_prompts(config)
    assert {parse_prompt(p).kind for p in prompts.eval_sets["heldin"]} == {"single", "count"}
    assert len(prompts.eval_sets["heldin"]) == 88  # every single/count prompt of heldin_eval.txt (fewer than 96)
    assert {parse_prompt(p).kind for p in prompts.eval_sets["heldout"]} == {"relation"}
    aligned = {parse_prompt(p) for p in prompts.align}
    assert aligned and {s.kind for s in aligned} == {"single", "count"}
    assert not aligned & {parse_prompt(p) for ps in prompts.eval_sets.values() for p in ps}
    with pytest.raises(ValueError, match="eval_kinds"):
        DemoConfig(eval_kinds=["motion"])


def test_config_rejects_an_empty_evaluation():
    with pytest.raises(ValueError, match="evaluation prompts"):
        DemoConfig(eval_heldin=0, eval_heldout=0)
    with pytest.raises(ValueError, match="train_fraction 0.3 of 3 steps trains none"):
        DemoConfig(steps=3)  # the default fraction trains ⌊0.9⌋ = 0 steps: said before any model loads
    with pytest.raises(ValueError, match="eta"):
        DemoConfig(eta=0.0, objective="grpo")  # a deterministic rollout has no log-probs to train on
    assert DemoConfig(eta=0.0, objective="draft").eta == 0.0  # reward backprop trains on the deterministic sampler


def test_command_line_knobs_reach_the_training_config(tmp_path):
    from visalign.cli import build_parser
    from visalign.shapes.demo import polish_config, train_config

    args = build_parser().parse_args(["demo", "--objective", "grpo", "--eta", "0.3", "--sde-window", "0", "3",
                                      "--lora-targets", "attn2.to_k", "attn2.to_v",
                                      "--set", "optim.betas=[0.98, 0.999]", "--set", "objective.params.beta=0.1"])
    config = DemoConfig(objective=args.objective, eta=args.eta, sde_window=args.sde_window,
                        lora_targets=args.lora_targets, train_overrides=args.train_overrides)
    train = train_config(config, tmp_path / "align.txt", tmp_path)
    assert train.sample.eta == 0.3 and train.sample.sde_window == [0, 3]
    assert tuple(train.optim.betas) == (0.98, 0.999) and train.objective.params == {"beta": 0.1}
    with pytest.raises(ValueError, match="optim.beta"):  # a misspelt key is named, with the close match
        train_config(DemoConfig(train_overrides=["optim.beta=[0.9, 0.99]"]), tmp_path / "align.txt", tmp_path)
    assert train.model.lora_targets == ["attn2.to_k", "attn2.to_v"]
    defaults = train_config(DemoConfig(), tmp_path / "align.txt", tmp_path)
    assert defaults.objective.name == "grpo" and defaults.objective.params == {}
    assert defaults.sample.eta == 1.0 and defaults.sample.sde_window == [0, 3]
    assert defaults.sample.prompts_per_step == 8 and defaults.sample.images_per_prompt == 8
    assert [(t["scorer"], t["weight"]) for t in defaults.reward.terms] == [
        ("shapes-clip-tuned-contrast", 1.0), ("shapes-colour", 1.0), ("shapes-oracle", 0.0)]
    assert defaults.model.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    polish = train_config(polish_config(DemoConfig()), tmp_path / "align.txt", tmp_path, stage="polish",
                          init_lora=tmp_path / "train" / "final")
    assert polish.objective.name == "draft" and polish.objective.params == {"backprop": "last-k", "k": 2}
    assert polish.sample.eta == 0.0 and polish.sample.sde_window is None and polish.optim.lr == 1e-3
    assert (polish.sample.prompts_per_step, polish.sample.images_per_prompt, polish.run.iterations) == (4, 4, 40)
    # By default the polish backpropagates the alignment's own differentiable terms; the oracle stays the monitor.
    assert [(t["scorer"], t["weight"]) for t in polish.reward.terms] == [
        ("shapes-clip-tuned-contrast", 1.0), ("shapes-colour", 1.0), ("shapes-oracle", 0.0)]
    oracle_run = DemoConfig(reward="shapes-oracle", extra_rewards=["shapes-colour:0.5"])
    assert oracle_run.polish_terms() == [("shapes-colour", 0.5)]  # the pixel-graded oracle has no gradient
    chosen = polish_config(DemoConfig(polish_rewards=["shapes-colour:2", "shapes-clip-tuned-contrast:1"]))
    assert (chosen.reward, chosen.extra_rewards) == ("shapes-colour", ["shapes-clip-tuned-contrast:0.5"])
    with pytest.raises(ValueError, match="no differentiable reward term"):
        DemoConfig(reward="shapes-oracle", extra_rewards=[])
    assert DemoConfig(reward="shapes-oracle", extra_rewards=[], polish_iterations=0).polish_iterations == 0
    assert polish.model.init_lora == str(tmp_path / "train" / "final")
    assert polish.run.output_dir == str(tmp_path / "polish")
    for bad in ({"polish_k": 0}, {"polish_iterations": -1}, {"polish_lr": 0.0}):
        with pytest.raises(ValueError, match="polish"):
            DemoConfig(**bad)
    draft = train_config(DemoConfig(objective="draft"), tmp_path / "align.txt", tmp_path)  # DRaFT's own recipe
    assert draft.objective.params == {"k": 0} and draft.sample.eta == 0.0 and draft.sample.sde_window is None
    assert draft.sample.prompts_per_step == 4 and draft.sample.images_per_prompt == 4


def test_extra_rewards_become_weighted_terms_beside_the_main_reward(tmp_path):
    from visalign.cli import build_parser
    from visalign.shapes.demo import train_config

    args = build_parser().parse_args(["demo", "--extra-reward", "shapes-colour:0.5", "--extra-reward", "brightness"])
    assert build_parser().parse_args(["demo"]).extra_rewards is None  # None: DemoConfig's default applies
    config = DemoConfig(extra_rewards=args.extra_rewards)
    terms = train_config(config, tmp_path / "align.txt", tmp_path).reward.terms
    assert [(t["scorer"], t["weight"]) for t in terms] == [
        ("shapes-clip-tuned-contrast", 1.0), ("shapes-colour", 0.5), ("brightness", 1.0), ("shapes-oracle", 0.0)]
    # The oracle as an extra term is trained on, so it is not added a second time as the zero-weight gold curve.
    oracle_terms = train_config(DemoConfig(extra_rewards=["shapes-oracle:2"]), tmp_path / "a.txt", tmp_path)
    assert [(t["scorer"], t["weight"]) for t in oracle_terms.reward.terms] == [
        ("shapes-clip-tuned-contrast", 1.0), ("shapes-oracle", 2.0)]
    for bad, match in [("shapes-colour:x", "must be a number"),
                       ("shapes-clip-tuned-contrast:1", "other than the main"), (":1", "must name a scorer")]:
        with pytest.raises(ValueError, match=match):
            DemoConfig(extra_rewards=[bad])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from visalign.shapes.build_proxies import torch_threads
    from visalign.shapes.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(iterations=2, prompts_per_step=1, images_per_prompt=2, steps=3, train_fraction=0.34,
                        eval_steps=4, eval_heldin=3, eval_heldout=3, grid_prompts=3, polish_iterations=2,
                        output_dir=str(out))
    with torch_threads(1):  # two threads on a shared CPU made this fixture 10x slower (tiny matrices, spinning)
        return out, run_demo(config, log=lambda _: None)


@needs_assets
def test_short_demo_writes_a_report_with_paired_images(demo_run):
    out, result = demo_run
    report = (out / "report.html").read_text(encoding="utf-8")
    for name in ("heldin", "heldout"):
        for i in range(3):
            for stage in ("before", "after"):
                rel = f"images/{name}-{i:03d}-{stage}.png"
                assert rel in report and (out / rel).is_file()
        assert (out / f"grid-{name}.png").is_file()
    assert "curves.png" in report and (out / "curves.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    k = result.before.images_per_prompt
    for numbers in summary["sets"].values():
        assert numbers["prompts"] == 3 and numbers["n"] == 3 * k and 0.0 <= numbers["oracle_all"][0] <= 1.0
        assert set(numbers["attributes"]) >= {"colour", "shape", "count"}
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/oracle/mean" in r] == [1, 2]  # the gold curve rides along
    # The polish stage continued the aligned LoRA on the same reward, and its LoRA is the one evaluated and named.
    polish = [json.loads(line) for line in (out / "polish" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in polish if "reward/shapes-colour/mean" in r] == [1, 2]
    assert [r["step"] for r in result.history if r.get("stage") == "polish"] == [3, 4]
    assert summary["lora_dir"] == str(out / "polish" / "final") == str(result.lora_dir)
    assert (out / "polish" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "polish stage: 2 iterations of DRaFT-K" in report
    first = np.asarray(Image.open(out / "images" / "heldin-000-before.png"))
    assert first.shape == (128, 128, 3) and first.max() > 0
    # The report shows each prompt's first evaluation sample: prompt 1's is sample k of the set, not sample 1.
    second = np.asarray(Image.open(out / "images" / "heldin-001-before.png")).astype(np.float32) / 255
    shown = result.before.media["heldin"][k].permute(1, 2, 0).numpy()
    assert np.abs(second[::4, ::4] - shown).mean() < 0.02


@needs_assets
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(demo_run):
    out, _ = demo_run
    shot = out / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,2400", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1100
    # Shapes-world images are mostly black background; on the white page, text, table and plot are ~2% dark pixels
    # and the 12 drawn 128-px images add ~5% more (measured 6.7% in all). Broken <img> links draw small grey icons.
    dark = (pixels.max(axis=2) < 60).mean()
    assert dark > 0.04, f"the before/after images were not drawn (dark share {dark:.3f})"


def _fake_result():
    from types import SimpleNamespace

    def evaluation(all_, reward, position, proxy):
        oracle = {"n": 10, "all": all_, "reward": reward, "kinds": {"relation": all_},
                  "attributes": {"colour": 1.0, "shape": 0.9, "count": 1.0, "position": position}}
        return SimpleNamespace(oracle={"heldout": oracle}, proxy={"heldout": proxy})

    return SimpleNamespace(prompts=SimpleNamespace(eval_sets={"heldout": ["a red circle left of a blue square"] * 10}),
                           before=evaluation(0.4, 0.85, 0.5, 0.60), after=evaluation(0.5, 0.875, 0.6, 0.70),
                           config={"reward": "shapes-clip"})


def test_report_table_and_gap_show_signed_point_changes():
    from visalign.shapes.demo_report import attribute_table, gap_paragraph

    table = attribute_table(_fake_result())
    assert "<td>oracle: all attributes</td><td>40.0</td><td>50.0</td><td>+10.0</td>" in table
    assert "<td>oracle: position</td><td>50.0</td><td>60.0</td><td>+10.0</td>" in table
    assert "<td>proxy: shapes-clip</td><td>60.0</td><td>70.0</td><td>+10.0</td>" in table
    gap = gap_paragraph(_fake_result())
    # proxy +10 pts, oracle reward +2.5 pts → the proxy outran the gold metric by 7.5 pts.
    assert "proxy reward +10.0 pts, oracle reward +2.5 pts, gap (proxy − oracle) +7.5 pts" in gap


@needs_assets
def test_shapes_eval_grades_the_demo_lora_against_its_base_through_stock_diffusers(demo_run, capsys):
    from visalign.cli import main
    from visalign.shapes.evaluate import EVAL_SET_FILES, EvalConfig, evaluate_folder
    from visalign.shapes.prompt_sets import read_prompt_set

    out, _ = demo_run
    record_file = out / "eval.json"
    assert main(["shapes", "eval", "--lora", str(out / "train" / "final"), "--prompts", "3", "--steps", "3",
                 "--eta", "1", "--json", str(record_file)]) == 0
    printed = capsys.readouterr().out
    assert "heldin   gain" in printed and "heldout  gain" in printed
    record = json.loads(record_file.read_text())
    assert set(record["sets"]) == {"base", "lora"} and record["sampler"]["eta"] == 1.0
    # The base numbers are the oracle's grades of the same seeded samples the library's evaluator draws.
    prompts = {n: read_prompt_set(resolve_asset("assets/shapes/prompts") / f)[:3] for n, f in EVAL_SET_FILES.items()}
    direct = evaluate_folder(BASE, prompts, EvalConfig(steps=3, eta=1.0))
    assert record["sets"]["base"] == json.loads(json.dumps(direct))
    for which in ("base", "lora"):
        for numbers in record["sets"][which].values():
            assert numbers["n"] == 3 and 0.0 <= numbers["all"] <= 1.0


def test_shapes_eval_names_bad_inputs(tmp_path):
    from visalign.cli import main

    with pytest.raises(SystemExit, match="unknown set"):
        main(["shapes", "eval", "--sets", "heldin,nope"])
    with pytest.raises(SystemExit, match="no pytorch_lora_weights"):
        main(["shapes", "eval", "--lora", str(tmp_path), "--prompts", "1", "--steps", "1", "--sets", "heldin"])
