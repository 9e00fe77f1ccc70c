"""Batched scoring throughput vs a one-sample-at-a-time loop over the same scorer, in the same run.

Scorers with weights are built tiny and offline with the test suite's builders (tests/tiny), so this runs
from a checkout with no network. Median of ``--repeats`` runs for each mode.

    python benchmarks/score_throughput.py --scorer clip-vit-b32,laion-aesthetic-v2,brightness --images 64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up: lazy weight loading and first-call allocations are not throughput
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scorer", default="clip-vit-b32,brightness")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="Image side in pixels.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--distinct-prompts", action="store_true",
                        help="Give every image its own prompt (default: one prompt for all, as in a prompt group).")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 also makes the Rust tokenizers serial.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
    load_before = os.getloadavg()[0]

    from tests.tiny import build_tiny_scorer
    from visalign.scorers import ScoreBatch

    torch.manual_seed(0)
    media = torch.rand(args.images, 3, args.size, args.size)
    prompts = [f"{i if args.distinct_prompts else 'a'} red circle to the left of a blue square"
               for i in range(args.images)]
    references = torch.rand(args.images, 3, args.size, args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scorer.split(","):
            scorer = build_tiny_scorer(name, Path(tmp))
            refs = references if "reference" in scorer.needs else None

            def batched(scorer=scorer, refs=refs) -> None:
                for s in range(0, args.images, args.batch_size):
                    sl = slice(s, s + args.batch_size)
                    scorer(ScoreBatch(prompts=prompts[sl], media=media[sl],
                                      references=None if refs is None else refs[sl]))

            def one_by_one(scorer=scorer, refs=refs) -> None:
                for i in range(args.images):
                    scorer(ScoreBatch(prompts=prompts[i:i + 1], media=media[i:i + 1],
                                      references=None if refs is None else refs[i:i + 1]))

            t_batch = time_call(batched, args.repeats)
            t_loop = time_call(one_by_one, args.repeats)
            rows.append((name, args.images / t_batch, args.images / t_loop, t_loop / t_batch))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.images} images {args.size}px, batch {args.batch_size}, "
          f"median of {args.repeats}; {'distinct prompts' if args.distinct_prompts else 'one prompt'}; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| scorer (tiny) | batched img/s | one-at-a-time img/s | speed-up |\n|---|---|---|---|")
    for name, fast, slow, ratio in rows:
        print(f"| {name} | {fast:.0f} | {slow:.0f} | {ratio:.1f}× |")


if __name__ == "__main__":
    main()
