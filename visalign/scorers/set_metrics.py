"""Distances and diversity of embedding sets: Fréchet distance, Vendi score, MMD, and per-sample credit.

Pure tensor functions, no models; ``visalign.scorers.distributional`` turns them into rewards. Formulas follow
docs/methods.md#frechet, #vendi, #mmd and #dragon (leave-one-out credit for set-level rewards):

- FD(S1, S2) = ||μ1 − μ2||² + tr Σ1 + tr Σ2 − 2·tr sqrt(Σ2^{1/2} Σ1 Σ2^{1/2}), computed by the *eigh route* in
  float64 (no complex ``scipy.linalg.sqrtm``). The reference side's square root comes from its cached
  eigendecomposition; when the batch has fewer samples than dimensions the trace term is read from the
  ``N × N`` Gram matrix instead of the ``D × D`` one (same non-zero eigenvalues).
- Vendi: exp(−Σ λ log λ) over the eigenvalues of K/n, K the cosine kernel; dual form ``XᵀX/n`` when d < n.
- MMD²_u with the RBF kernel exp(−||x − y||² / (2σ²)), and its witness function as a per-sample value.

FD and Vendi are for black-box rewards only: gradients through ``eigh`` are unstable for near-degenerate spectra.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["covariance", "frechet_distance", "frechet_distance_to_reference", "leave_one_out_frechet",
           "leave_one_out_vendi", "mmd2_unbiased", "mmd_witness", "psd_sqrt", "rbf_kernel", "vendi_score"]


def covariance(x: Tensor) -> Tensor:
    """Unbiased covariance of the rows of ``x``.

    Args:
        x: ``[N, D]`` with N ≥ 2, any float dtype.

    Returns:
        float64 ``[D, D]``, symmetric positive semi-definite.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"A covariance needs at least 2 samples as [N, D]; got shape {tuple(x.shape)}.")
    d = x.double() - x.double().mean(0)
    return d.T @ d / (x.shape[0] - 1)


def psd_sqrt(eigvals: Tensor, eigvecs: Tensor) -> Tensor:
    """Σ^{1/2} = V·diag(sqrt(max(λ, 0)))·Vᵀ from an ``eigh`` result (λ ``[D]``, V ``[D, D]``), float64."""
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def _trace_sqrt_psd(mats: Tensor) -> Tensor:
    """Σ sqrt(max(eigvalsh(M), 0)) for symmetric PSD ``[..., K, K]`` (symmetrised first against round-off).

    Eigenvalues below 1e-12 of the largest are round-off of exact zeros (centring and N < D make M singular);
    their square roots (~1e-7 relative) would otherwise add up, so they count as zero.
    """
    lam = torch.linalg.eigvalsh(0.5 * (mats + mats.transpose(-1, -2)))
    floor = 1e-12 * lam.amax(-1, keepdim=True).clamp(min=0)
    return torch.where(lam > floor, lam, torch.zeros_like(lam)).sqrt().sum(-1)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, cov2_sqrt: Tensor | None = None) -> Tensor:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) by the eigh route, in float64.

    tr sqrt(Σ1Σ2) = tr sqrt(M) with M = Σ2^{1/2} Σ1 Σ2^{1/2}, because Σ1Σ2 is similar to M; M is symmetric
    PSD, so ``eigvalsh`` gives real eigenvalues where ``sqrtm(Σ1Σ2)`` may return complex noise.

    Args:
        mu1, mu2: means ``[D]``.
        cov1, cov2: covariances ``[D, D]``.
        cov2_sqrt: Σ2^{1/2} ``[D, D]`` if already known (a cached reference set), else computed.

    Returns:
        float64 0-d tensor, ≥ 0 up to round-off.
    """
    mu1, mu2, cov1, cov2 = mu1.double(), mu2.double(), cov1.double(), cov2.double()
    if cov2_sqrt is None:
        cov2_sqrt = psd_sqrt(*torch.linalg.eigh(0.5 * (cov2 + cov2.T)))
    root = cov2_sqrt.double()
    cross = _trace_sqrt_psd(root @ cov1 @ root)
    return ((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * cross


def frechet_distance_to_reference(x: Tensor, ref_mean: Tensor, ref_cov: Tensor, ref_cov_sqrt: Tensor) -> Tensor:
    """FD between the rows of ``x`` and cached reference statistics.

    Args:
        x: batch embeddings ``[N, D]``, N ≥ 2.
        ref_mean: float64 ``[D]``; ref_cov: float64 ``[D, D]``; ref_cov_sqrt: its square root ``[D, D]``.

    Returns:
        float64 0-d tensor.
    """
    x = x.double()
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"The Fréchet distance of a batch needs at least 2 samples; got {n}.")
    centred = x - x.mean(0)
    z = centred @ ref_cov_sqrt.double()  # rows of Z: Σ_ref^{1/2} (x_i − μ); Zᵀ Z/(n−1) = Σ_ref^{1/2} Σ Σ_ref^{1/2}
    gram = z @ z.T if n <= x.shape[1] else z.T @ z  # same non-zero eigenvalues; take the smaller side
    cross = _trace_sqrt_psd(gram / (n - 1))
    mean_term = ((x.mean(0) - ref_mean.double()) ** 2).sum()
    return mean_term + (centred**2).sum() / (n - 1) + ref_cov.double().trace() - 2 * cross


def leave_one_out_frechet(x: Tensor, ref_mean: Tensor, ref_cov: Tensor, ref_cov_sqrt: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample credit Δ_i = FD(S \\ {i}) − FD(S) against a reference, exact, with rank-one updates.

    Δ_i > 0 means removing sample i would move the batch further from the reference, so i helps: larger is
    better. Removing x_i updates the statistics in closed form (d_i = x_i − μ, S = Σ_j d_j d_jᵀ the scatter):

        μ_{−i} = (n·μ − x_i)/(n − 1),   S_{−i} = S − n/(n − 1)·d_i d_iᵀ,   Σ_{−i} = S_{−i}/(n − 2)

    and the cross term needs eigenvalues of Σ_ref^{1/2} Σ_{−i} Σ_ref^{1/2}: from the rank-one update of the
    ``D × D`` matrix when n > D, or of the re-centred ``(n−1) × (n−1)`` Gram matrix of the other samples when
    n ≤ D. Either way one batched ``eigvalsh`` call, no per-sample recomputation of Σ_ref^{1/2}.

    Args:
        x: batch embeddings ``[N, D]``, N ≥ 3 (a set of N − 1 ≥ 2 samples must still have a covariance).
        ref_mean, ref_cov, ref_cov_sqrt: float64 reference statistics, ``[D]``, ``[D, D]``, ``[D, D]``.

    Returns:
        ``(delta [N], fd_full 0-d)``, both float64.
    """
    x = x.double()
    n, dim = x.shape
    if n < 3:
        raise ValueError(f"Leave-one-out Fréchet credit needs a batch of at least 3 samples; got {n}.")
    mu = x.mean(0)
    d = x - mu
    root = ref_cov_sqrt.double()
    z = d @ root
    ref_trace = ref_cov.double().trace()
    fd_full = frechet_distance_to_reference(x, ref_mean, ref_cov, root)

    mu_minus = (n * mu - x) / (n - 1)  # row i: the mean without sample i
    mean_term = ((mu_minus - ref_mean.double()) ** 2).sum(-1)
    scatter_trace = (d**2).sum() - n / (n - 1) * (d**2).sum(-1)
    if n - 1 <= dim:
        gram = z @ z.T
        keep = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, n)]) for i in range(n)])  # [N, N−1]
        sub = gram[keep[:, :, None], keep[:, None, :]]  # [N, N−1, N−1]
        centre = torch.eye(n - 1, dtype=x.dtype) - 1.0 / (n - 1)  # re-centre on the mean of the N−1 kept samples
        mats = centre @ sub @ centre
    else:
        mats = z.T @ z - n / (n - 1) * z[:, :, None] * z[:, None, :]  # [N, D, D]
    cross = _trace_sqrt_psd(mats / (n - 2))
    fd_minus = mean_term + scatter_trace / (n - 2) + ref_trace - 2 * cross
    return fd_minus - fd_full, fd_full


def vendi_score(x: Tensor) -> Tensor:
    """Vendi score (order 1) of the rows of ``x`` under the cosine kernel: the effective number of distinct samples.

    VS = exp(−Σ λ_i log λ_i), λ the eigenvalues of K/n with K_ij = cos(x_i, x_j) (zeros dropped). When d < n the
    dual ``XᵀX/n`` (X row-normalised) has the same non-zero eigenvalues at ``d × d`` cost.

    Args:
        x: ``[N, D]``, N ≥ 1, rows not all zero.

    Returns:
        float64 0-d tensor in [1, N].
    """
    xn = F.normalize(x.double(), dim=-1)
    n, dim = xn.shape
    mat = xn.T @ xn if dim < n else xn @ xn.T
    lam = torch.linalg.eigvalsh(0.5 * (mat + mat.T) / n).clamp(min=0)
    lam = lam[lam > 1e-12]
    return torch.exp(-(lam * lam.log()).sum())


def leave_one_out_vendi(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample diversity credit Δ_i = VS(S) − VS(S \\ {i}), by exact recomputation on each subset.

    N eigen-decompositions of size ≤ min(D, N − 1); cheap at training batch sizes. Larger Δ_i: sample i adds
    more distinct content.

    Args:
        x: ``[N, D]``, N ≥ 2.

    Returns:
        ``(delta [N], vendi_full 0-d)``, float64.
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"Leave-one-out Vendi credit needs at least 2 samples; got {n}.")
    full = vendi_score(x)
    without = torch.stack([vendi_score(torch.cat([x[:i], x[i + 1:]])) for i in range(n)])
    return full - without, full


def rbf_kernel(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """k(x, y) = exp(−||x − y||² / (2σ²)) for rows ``x [M, D]``, ``y [N, D]`` → ``[M, N]`` in (0, 1].

    Squared distances are expanded and clamped, not taken from ``cdist``: its sqrt has no gradient at 0.
    """
    sq = (x * x).sum(-1, keepdim=True) + (y * y).sum(-1) - 2 * x @ y.T
    return torch.exp(-sq.clamp(min=0) / (2 * bandwidth**2))


def mmd2_unbiased(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """Unbiased MMD² between samples ``x [M, D]`` and ``y [N, D]`` (M, N ≥ 2) with the RBF kernel.

    MMD²_u = Σ_{i≠j} k(x_i, x_j)/(M(M−1)) + Σ_{i≠j} k(y_i, y_j)/(N(N−1)) − 2·Σ_{i,j} k(x_i, y_j)/(MN).

    Returns:
        0-d tensor in the dtype of ``x``; may be slightly negative (unbiased estimator).
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"Unbiased MMD² needs at least 2 samples on each side; got {m} and {n}.")
    kxx, kyy, kxy = rbf_kernel(x, x, bandwidth), rbf_kernel(y, y, bandwidth), rbf_kernel(x, y, bandwidth)
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
            - 2 * kxy.mean())


def mmd_witness(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """Witness of the MMD between reference ``y [N, D]`` and batch ``x [M, D]``, evaluated at each batch sample.

    f(x_i) = mean_j k(x_i, y_j) − mean_{j≠i} k(x_i, x_j): high when x_i sits where the reference has mass and the
    rest of the batch does not. Excluding j = i matches the unbiased MMD² (and k(x_i, x_i) = 1 carries no
    information). Differentiable.

    Args:
        x: ``[M, D]``, M ≥ 2; y: ``[N, D]``.

    Returns:
        ``[M]`` in [−1, 1], dtype of ``x``.
    """
    m = x.shape[0]
    if m < 2:
        raise ValueError(f"The MMD witness over a batch needs at least 2 samples; got {m}.")
    kxx = rbf_kernel(x, x, bandwidth)
    return rbf_kernel(x, y, bandwidth).mean(1) - (kxx.sum(1) - kxx.diagonal()) / (m - 1)
