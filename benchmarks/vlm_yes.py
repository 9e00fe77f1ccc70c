"""Yes-token (VQAScore) scoring cost per image at batch 1, 8 and 32 on a tiny offline VLM, in one process.

The tiny Qwen2-VL of the test suite (tests/tiny/vlm.py: text hidden 32, 2 layers, 1-layer vision tower) is
written to a temporary folder and loaded through the real path. Each batch size is timed as the median of
``--repeats`` runs after one warm-up; the speed-up is per-image cost at batch 1 over per-image cost at the
largest batch, and must reach ``--min-speedup`` (the whole point of the one-forward-pass design), at every thread
count in ``--threads``. The tables are written into the "VLM yes-token scoring" section of BENCHMARKS.md, other
sections kept.

    python benchmarks/vlm_yes.py --repeats 7 --threads 1,2
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## VLM yes-token scoring"


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of ``fn()``.

    CPU time is reported beside wall time because the 2-core machines these run on are shared: wall time
    swings with other people's load, CPU time much less.
    """
    fn()  # warm-up: lazy loading and first-call allocations are not the steady-state cost
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the ``SECTION`` of a markdown file, keeping every other section intact."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    new = [SECTION, "", *body.rstrip().splitlines()]
    if start is None:
        lines = [*lines, "", *new] if lines and lines[-1].strip() else [*lines, *new]
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        lines = [*lines[:start], *new, "", *lines[end:]]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="vqascore-qwen2-vl-2b", help="Yes-token card whose tiny family is timed.")
    parser.add_argument("--batch-sizes", default="1,8,32", help="Comma-separated batch sizes.")
    parser.add_argument("--size", type=int, default=32, help="Image side in pixels.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per batch size (median reported).")
    parser.add_argument("--min-speedup", type=float, default=5.0, help="Required per-image speed-up, largest vs 1.")
    parser.add_argument("--threads", default="1",
                        help="Comma-separated torch intra-op thread counts, each timed in turn in this process; 1 "
                             "also turns off the Rust tokenizer's batch parallelism, so the run is single-threaded.")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="Markdown file to update.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    thread_counts = [int(t) for t in args.threads.split(",")]

    from tests.tiny.vlm import build_vlm_yes
    from visalign.scorers import ScoreBatch, get_scorer, scorer_card

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    generator = torch.Generator().manual_seed(0)
    media = torch.rand(max(sizes), 3, args.size, args.size, generator=generator)
    prompts = [f"{n} red circles to the left of a blue square" for n in range(max(sizes))]
    command = f"python benchmarks/vlm_yes.py --repeats {args.repeats} --threads {args.threads}"
    body = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU (a shared machine: "
        f"wall times move with other people's load, CPU times less). Command: `{command}`.",
        f"Tiny Qwen2-VL family model of `{args.card}` (text hidden 32, 2 layers; {args.size}px images), one "
        f"forward pass per batch; median of {args.repeats} runs per batch size after a warm-up. CPU ms is the "
        "process's CPU time (all threads).",
    ]
    speedups = []
    with tempfile.TemporaryDirectory() as tmp:
        scorer = get_scorer(args.card, **build_vlm_yes(scorer_card(args.card), Path(tmp)))
        for threads in thread_counts:
            torch.set_num_threads(threads)
            os.environ["TOKENIZERS_PARALLELISM"] = "false" if threads == 1 else "true"
            rows = []
            load_before = os.getloadavg()[0]
            for batch_size in sizes:
                batch = ScoreBatch(prompts=prompts[:batch_size], media=media[:batch_size])
                seconds, cpu_seconds = median_seconds(lambda batch=batch: scorer(batch), args.repeats)
                rows.append((batch_size, seconds, seconds / batch_size, cpu_seconds / batch_size))
            speedups.append(rows[0][2] / rows[-1][2])
            body += ["", f"{threads} thread(s); 1-min load average {load_before:.1f} before, "
                     f"{os.getloadavg()[0]:.1f} after.", "",
                     "| batch size | wall ms per batch | wall ms per image | speed-up vs batch 1 (wall) | "
                     "CPU ms per image | speed-up (CPU) |", "|---|---|---|---|---|---|"]
            for batch_size, seconds, per_image, cpu_per_image in rows:
                body.append(f"| {batch_size} | {seconds * 1e3:.1f} | {per_image * 1e3:.2f} | "
                            f"{rows[0][2] / per_image:.1f}× | {cpu_per_image * 1e3:.2f} | "
                            f"{rows[0][3] / cpu_per_image:.1f}× |")
            verdict = "meets" if speedups[-1] >= args.min_speedup else "MISSES"
            body += ["", f"{threads} thread(s): batch {rows[-1][0]} is {speedups[-1]:.1f}× cheaper per image than "
                     f"batch 1 in wall time ({verdict} the ≥{args.min_speedup:g}× target)."]
    print("\n".join(body))
    write_section(Path(args.output), "\n".join(body))
    return 0 if min(speedups) >= args.min_speedup else 1


if __name__ == "__main__":
    sys.exit(main())
