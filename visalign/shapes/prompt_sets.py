"""The shipped prompt sets of the shapes world (``assets/shapes/prompts/*.txt``), written deterministically.

Regenerate with ``python -m visalign.shapes.prompt_sets --out assets/shapes/prompts``; a test checks the
committed files equal this module's output, so the sets can never drift from the grammar or the split.

Files (one caption per line):

- ``train.txt``: every training composition once (singles, counts 2-4, relations outside the held-out pairs).
- ``heldin_eval.txt``: evaluation prompts drawn from training compositions with the training mix.
- ``heldout_compositions.txt``: relation prompts containing a held-out colour-shape pair, never in training.
- ``video_train.txt``: every training motion composition once.
- ``video_eval.txt``: held-in motion prompts, then every held-out motion composition (twice, two wordings).

Wordings are drawn from the grammar's paraphrases with the seed, so evaluation also covers paraphrases.
:func:`visalign.shapes.world.split_of` of a parsed line tells which split any prompt belongs to.

Recipes and the trainer read these sets as plain files (``../assets/shapes/prompts/train.txt`` from ``pipelines/``);
:func:`prompt_file` gives the path of a shipped one, in a checkout or after an install.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from visalign.registry import UnknownIdError, unknown_id_message
from visalign.shapes.demo import resolve_asset
from visalign.shapes.grammar import all_captions, caption
from visalign.shapes.world import PromptSpec, prompt_specs, sample_motion_spec, sample_prompt_spec

DEFAULT_SEED = 0
SHIPPED_DIR = "assets/shapes/prompts"
# In this order: set i draws from the child generator [seed, i], so the order is part of every shipped file.
SET_NAMES = ("train", "heldin_eval", "heldout_compositions", "video_train", "video_eval")
HELDIN_EVAL_SIZE = 192
HELDOUT_EVAL_SIZE = 192
VIDEO_HELDIN_EVAL_SIZE = 24


def build_prompt_sets(seed: int = DEFAULT_SEED) -> dict[str, list[str]]:
    """File name → captions, a pure function of ``seed``.

    Each set draws from its own child generator, so growing one set never reshuffles another.
    """
    rngs = {name: np.random.default_rng([seed, i]) for i, name in enumerate(SET_NAMES)}

    def one_each(specs: list[PromptSpec], rng: np.random.Generator) -> list[str]:
        return [caption(s, rng) for s in specs]

    train_specs = [s for kind in ("single", "count", "relation") for s in prompt_specs(kind, "train")]
    heldout = prompt_specs("relation", "heldout")
    pick = rngs["heldout_compositions"].choice(len(heldout), size=min(HELDOUT_EVAL_SIZE, len(heldout)), replace=False)
    video_heldout = prompt_specs("motion", "heldout")
    video_rng = rngs["video_eval"]
    video_eval = [caption(sample_motion_spec(video_rng, "train"), video_rng) for _ in range(VIDEO_HELDIN_EVAL_SIZE)]
    video_eval += [c for s in video_heldout for c in all_captions(s)[:2]]
    heldin_rng = rngs["heldin_eval"]
    return {
        "train.txt": one_each(train_specs, rngs["train"]),
        "heldin_eval.txt": [caption(sample_prompt_spec(heldin_rng, "train"), heldin_rng)
                            for _ in range(HELDIN_EVAL_SIZE)],
        "heldout_compositions.txt": one_each([heldout[int(i)] for i in pick], rngs["heldout_compositions"]),
        "video_train.txt": one_each(prompt_specs("motion", "train"), rngs["video_train"]),
        "video_eval.txt": video_eval,
    }


def write_prompt_sets(folder: str | Path, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write every prompt set into ``folder`` (created if missing); returns the written paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, lines in build_prompt_sets(seed).items():
        path = out / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def list_prompt_sets() -> list[str]:
    """Names of the shipped prompt sets (``heldin_eval``, ``train``, ...; the file stems), sorted."""
    return sorted(SET_NAMES)


def prompt_file(name: str) -> Path:
    """Path of the shipped prompt file of set ``name`` (``assets/shapes/prompts/<name>.txt``), found as
    :func:`visalign.shapes.demo.resolve_asset` finds every shipped asset.

    Raises:
        UnknownIdError: naming the known sets when ``name`` is not one of them.
    """
    if name not in list_prompt_sets():
        raise UnknownIdError(unknown_id_message("shapes prompt set", name, list_prompt_sets()))
    return resolve_asset(f"{SHIPPED_DIR}/{name}.txt")


def read_prompt_set(path: str | Path) -> list[str]:
    """The captions of one prompt file (blank lines skipped)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the shapes world's prompt sets.")
    parser.add_argument("--out", default=SHIPPED_DIR, help="Folder to write the .txt files into.")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="Seed of the wordings and samples.")
    args = parser.parse_args(argv)
    for path in write_prompt_sets(args.out, args.seed):
        print(f"wrote {path} ({len(read_prompt_set(path))} prompts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
