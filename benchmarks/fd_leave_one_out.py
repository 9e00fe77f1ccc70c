"""Leave-one-out Fréchet credit: the closed-form update against N + 1 full recomputations, same data, same run.

Both reuse the reference's cached Σ_ref^{1/2}; the brute force recomputes every FD(S without i) by the eigh route
(a D × D eigendecomposition each), the update reads each from the (N−1) × (N−1) Gram of the other samples (N ≤ D)
or a rank-one update of the D × D matrix (N > D). Prints timings and the largest difference.

    python benchmarks/fd_leave_one_out.py --dim 512 --batch 32 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from visalign.scorers.set_metrics import covariance, frechet_distance, leave_one_out_frechet, psd_sqrt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512, help="Embedding dimension D (CLIP ViT-B/32: 512).")
    parser.add_argument("--batch", type=int, default=32, help="Samples N in the scored batch.")
    parser.add_argument("--exemplars", type=int, default=2000, help="Reference embeddings for Σ_ref.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(args.exemplars, args.dim, generator=g, dtype=torch.float64)
    mu, cov = ref.mean(0), covariance(ref)
    root = psd_sqrt(*torch.linalg.eigh(cov))
    x = torch.randn(args.batch, args.dim, generator=g, dtype=torch.float64)

    start = time.perf_counter()
    delta, _ = leave_one_out_frechet(x, mu, cov, root)
    fast_s = time.perf_counter() - start

    start = time.perf_counter()
    full = frechet_distance(x.mean(0), covariance(x), mu, cov, root)
    subsets = (torch.cat([x[:i], x[i + 1:]]) for i in range(args.batch))
    brute = torch.stack([frechet_distance(s.mean(0), covariance(s), mu, cov, root) for s in subsets]) - full
    brute_s = time.perf_counter() - start

    print(f"D={args.dim} N={args.batch} threads={args.threads}: leave_one_out_frechet {fast_s * 1e3:.1f} ms, "
          f"brute force {brute_s * 1e3:.0f} ms ({brute_s / fast_s:.0f}x), max |diff| "
          f"{(delta - brute).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
