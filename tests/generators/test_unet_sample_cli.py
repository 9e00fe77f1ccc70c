"""``visalign sample``: files, grid and seeds.json from a tiny SD, and the seeds regenerate the files."""

from __future__ import annotations

import json

import pytest
import torch

from visalign.cli import main
from visalign.media import load_image


def test_sample_writes_files_grid_and_seeds(sd_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\n# a comment\ntwo blue circles\nthree dogs\n")
    out = tmp_path / "out"
    code = main(["sample", "--model", str(sd_path), "--prompts", str(prompts), "--out", str(out),
                 "--images-per-prompt", "2", "--steps", "2", "--seed", "5", "--batch-size", "2"])
    assert code == 0
    record = json.loads((out / "seeds.json").read_text())["samples"]
    assert [r["prompt"] for r in record] == ["a red cube"] * 2 + ["two blue circles"] * 2 + ["three dogs"] * 2
    assert [r["seed"] for r in record] == [5, 6, 7, 8, 9, 10]  # seeds run on across batches
    assert load_image(out / "grid.png").shape[-2:] == (3 * 34 + 2, 2 * 34 + 2)
    # A file is regenerated from its recorded prompt and seed alone (batch of one), up to 8-bit rounding.
    from visalign.generators import load_generator

    again = load_generator(sd_path).rollout([record[4]["prompt"]], steps=2, guidance=5.0, eta=0.0,
                                            seed=record[4]["seed"]).media[0]
    torch.testing.assert_close(load_image(out / record[4]["file"]), again, atol=1 / 255 + 1e-6, rtol=0)


def test_sample_rejects_an_empty_prompt_file(sd_path, tmp_path):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        main(["sample", "--model", str(sd_path), "--prompts", str(prompts), "--out", str(tmp_path / "o")])
