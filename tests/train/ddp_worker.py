"""One process of the data-parallel test (``tests/train/test_distributed.py``), run under ``accelerate launch``.

Trains through the real :class:`Trainer` and then records what only this process knows: its trainable weights
(``rank{R}.safetensors``) and, per iteration, the prompts it drew and the rewards of its own samples
(``rank{R}.json``). Usage: ``accelerate launch ... ddp_worker.py [--resume] RECORD_DIR RECIPE [key=value ...]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from visalign.train.config import load_train_config
from visalign.train.loop import Trainer
from visalign.train.sharding import gather_full


class RecordingTrainer(Trainer):
    """The real trainer; its online source's ``score`` also keeps this process's prompts and per-sample rewards."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local: list[dict[str, Any]] = []
        score = self.source.score

        def recording_score(rollout: Any) -> Any:
            batch = score(rollout)
            self.local.append({"prompts": list(rollout.prompts), "rewards": self.source.reward_output.total.tolist(),
                               "active": int(((batch.effective_weights > 0) & (batch.advantages != 0)).sum())})
            return batch

        self.source.score = recording_score


def main(argv: list[str]) -> int:
    resume = argv[:1] == ["--resume"]
    record_dir, recipe, *overrides = argv[1:] if resume else argv
    trainer = RecordingTrainer(load_train_config(recipe, overrides))
    trainer.run(resume=resume)
    rank = trainer.dist.process_index
    out = Path(record_dir)
    # Under FSDP each process holds shards: every process gathers the full weights (a collective) and writes them.
    full = gather_full(trainer.params)
    save_file({n: p.contiguous() for n, p in full.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"num_processes": trainer.dist.num_processes,
                                                      "iterations": trainer.local}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
