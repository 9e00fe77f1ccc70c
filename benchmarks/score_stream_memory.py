"""Peak memory of streaming ``visalign score`` over many small images: it must stay flat.

Writes N random 32 px PNGs, scores them with the CLI's library path (``collect_items`` → ``score_items`` →
``RowWriter``) and records the process's peak RSS after every 1 000 rows.

    python benchmarks/score_stream_memory.py --images 10000 --scorer brightness,jpeg-compressibility
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--scorer", default="brightness,jpeg-compressibility")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from visalign.scorers import get_scorer
    from visalign.scoring import RowWriter, collect_items, score_items

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
        ids = args.scorer.split(",")
        scorers = [get_scorer(i) for i in ids]
        items = collect_items(folder)
        marks = []
        start = time.perf_counter()
        with RowWriter(Path(tmp) / "out.csv", ids) as writer:
            for n, row in enumerate(score_items(scorers, items, batch_size=args.batch_size), 1):
                writer.write(row)
                if n % 1000 == 0:
                    marks.append((n, current_rss_mb(), peak_rss_mb()))
        seconds = time.perf_counter() - start
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
          f"scorers {ids}; batch {args.batch_size}; {args.images} images in {seconds:.1f} s "
          f"({args.images / seconds:.0f} img/s)")
    print("| rows scored | RSS now (MB) | peak RSS (MB) |\n|---|---|---|")
    for n, now, peak in marks:
        print(f"| {n} | {now:.1f} | {peak:.1f} |")
    growth = marks[-1][2] - marks[0][2]
    print(f"peak growth from row {marks[0][0]} to row {marks[-1][0]}: {growth:+.1f} MB")


if __name__ == "__main__":
    main()
