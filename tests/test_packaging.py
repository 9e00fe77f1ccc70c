"""Cards and recipes ship as package data: a non-editable install finds every card without the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_every_card_and_a_plain_install_lists_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("visalign-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    cards = sorted(p.name for p in (ROOT / "scorers").glob("*.yaml"))
    assert cards and all(f"visalign/cards/{c}" in names for c in cards)
    recipes = sorted(p.name for p in (ROOT / "pipelines").glob("*.yaml"))
    assert all(f"visalign/recipes/{r}" in names for r in recipes)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import visalign, visalign.scorers as s; print(visalign.__file__); print(','.join(s.list_scorers()))"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True,
                         text=True).stdout.splitlines()
    assert out[0].startswith(str(target))  # imported from the install, not the checkout
    assert set(out[1].split(",")) >= {c[: -len(".yaml")] for c in cards}

    # A card whose data ships in assets/ (an exemplar folder) works from the install, from another folder.
    code = ("import torch; from visalign.scorers import ScoreBatch, get_scorer; "
            "s = get_scorer('exemplar-centroid-color', params={'cache_dir': '.'}); "
            "print(float(s(ScoreBatch(prompts=['x'], media=torch.rand(1, 3, 32, 32))).reward[0]))")
    value = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True,
                           text=True).stdout.strip()
    assert 0.0 <= float(value) <= 1.0

    # A shipped recipe's prompt files (../assets/... relative to the recipe) and the shapes world's prompt_file
    # resolve inside the install, where pipelines/ is visalign/recipes and assets/ is visalign/assets.
    code = ("import visalign, pathlib; from visalign.train.config import load_train_config; "
            "from visalign.shapes.prompt_sets import prompt_file; "
            "c = load_train_config(pathlib.Path(visalign.__file__).parent / 'recipes' / 'shapes-grpo-clip.yaml'); "
            "print(c.sample.prompts); print(c.eval.prompts); print(prompt_file('train').resolve())")
    paths = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True,
                           text=True).stdout.splitlines()
    installed = target.resolve()
    assert len(paths) == 3 and all(Path(p).is_file() and Path(p).resolve().is_relative_to(installed) for p in paths)
    shipped = (ROOT / "assets" / "shapes" / "prompts" / "train.txt").read_text()
    assert Path(paths[0]).read_text() == Path(paths[2]).read_text() == shipped
