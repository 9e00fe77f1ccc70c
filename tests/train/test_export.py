"""visalign export: the LoRA, its adapter config and a manifest whose hashes match; --merge writes a pipeline that
stock diffusers loads and whose UNet carries the LoRA update; an unfinished run and an offline push are refused."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.train.conftest import FAST, TINY_RECIPE
from visalign.cli import main
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer


def test_export_writes_lora_adapter_config_manifest_and_a_merged_pipeline(tiny_sd, tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(load_train_config(TINY_RECIPE, [*FAST, f"model.model={tiny_sd}", f"run.output_dir={run}",
                                            "eval.prompts=null", "run.iterations=2", "optim.lr=0.05"])).run()
    out = tmp_path / "export"
    assert main(["export", str(run), str(out), "--merge"]) == 0
    manifest = json.loads((out / "visalign_manifest.json").read_text())
    assert manifest["base_model"] == str(tiny_sd) and manifest["objective"]["name"] == "grpo"
    assert manifest["seed"] == 0 and manifest["iterations"] == 2
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert "pytorch_lora_weights.safetensors" in manifest["files"]
    assert any(k.startswith("merged/") for k in manifest["files"])
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter and any(k.endswith(".r") and v == 4 for k, v in adapter.items())

    from diffusers import StableDiffusionPipeline

    merged = StableDiffusionPipeline.from_pretrained(out / "merged")
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    changed = [n for n, p in merged.unet.named_parameters() if not torch.equal(p, base.unet.get_parameter(n))]
    assert changed and all("attn" in n for n in changed)  # the LoRA targets, fused in

    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        from visalign.train.export import export_run

        export_run(run, tmp_path / "push", push_to_hub="me/model")
