"""``model.init_lora``: a stage that continues a saved LoRA starts from exactly its weights and trains them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import FAST, TINY_RECIPE
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer

# lr large enough that one update visibly moves a freshly initialised LoRA's B matrices off zero.
FIRST = [*FAST, "run.iterations=1", "optim.lr=0.05", "eval.prompts=null"]


def test_second_stage_starts_from_the_first_stages_lora_and_trains_it(tiny_sd, tmp_path):
    first = Trainer(load_train_config(TINY_RECIPE, [*FIRST, f"model.model={tiny_sd}",
                                                    f"run.output_dir={tmp_path / 'one'}"]))
    first.run(resume=False)
    trained = {n: p.detach().clone() for n, p in first.params.items()}
    assert any(bool(t.abs().sum() > 0) for n, t in trained.items() if "lora_B" in n)

    second = Trainer(load_train_config(TINY_RECIPE, [
        *FIRST, f"model.model={tiny_sd}", f"run.output_dir={tmp_path / 'two'}", "model.lora_rank=4",
        f"model.init_lora={tmp_path / 'one' / 'final'}"]))
    # The saved adapter's own rank (the recipe's) wins over model.lora_rank=4, and every weight is the saved one.
    assert set(second.params) == set(trained)
    for name, value in second.params.items():
        assert torch.equal(value.detach(), trained[name]), name
    second.run(resume=False)
    moved = load_file(str(tmp_path / "two" / "final" / "pytorch_lora_weights.safetensors"))
    before = load_file(str(tmp_path / "one" / "final" / "pytorch_lora_weights.safetensors"))
    assert set(moved) == set(before)
    assert any(not torch.equal(moved[k], before[k]) for k in moved)


def test_init_lora_with_a_full_fine_tune_is_refused(tmp_path):
    with pytest.raises(ValueError, match="init_lora"):
        load_train_config(TINY_RECIPE, [f"model.init_lora={tmp_path}", "model.lora_rank=0"])
